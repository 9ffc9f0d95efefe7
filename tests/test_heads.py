"""Per-partition master heads (lambdalake.heads) on both stores: claims fence earlier writers, a roll counts only once
its head lists it, a lost answer is recognised, a rewrite and a roll racing on one head both land."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lambdalake.heads import Fenced, HeadFile, PartitionHead, file_key, replace_files, stored_head
from lambdalake.layout import Layout
from lambdalake.storage.base import StorageError

SRC = "pageviews"


@pytest.fixture(params=["local", "s3"])
def layout(request, tmp_path) -> Layout:
    if request.param == "local":
        return Layout(tmp_path / "lake")
    return Layout(tmp_path / "unused", store=request.getfixturevalue("s3_store"))


def _roll(held: PartitionHead, start: int, end: int) -> HeadFile:
    """A roll's file written (bytes stand in for Parquet: the head protocol never reads them) and its entry."""
    name = held.new_name(start, end)
    held.layout.store.put(file_key("master", SRC, 0, name), b"rows")
    return HeadFile(name=name, start=start, end=end, rows=end - start)


def _listed(layout: Layout) -> list[tuple[int, int]]:
    head, _ = stored_head(layout, SRC, 0)
    return [(f.start, f.end) for f in head.files]


def test_rolls_commit_in_order_and_a_new_claim_fences_the_old_writer(layout):
    a = PartitionHead.claim(layout, SRC, 0, "writer-a")
    assert a.epoch == 1 and a.end is None
    a.commit(0, 10, _roll(a, 0, 10))
    a.commit(10, 25, _roll(a, 10, 25))
    b = PartitionHead.claim(layout, SRC, 0, "writer-b")
    assert b.epoch == 2 and b.end == 25
    zombie = _roll(a, 25, 40)  # a woke up and cut its next roll differently from b
    with pytest.raises(Fenced, match="epoch 2"):
        a.commit(25, 40, zombie)
    with pytest.raises(Fenced):
        a.check_epoch()  # what the archiver asks before sending dead letters
    b.check_epoch()
    b.commit(25, 30, _roll(b, 25, 30))
    assert _listed(layout) == [(0, 10), (10, 25), (25, 30)]
    with pytest.raises(Fenced):  # and it stays fenced
        a.commit(25, 40, zombie)
    head, _ = stored_head(layout, SRC, 0)
    assert zombie.name not in {f.name for f in head.files} and head.owner == "writer-b"


def test_a_roll_must_continue_the_archived_end(layout):
    a = PartitionHead.claim(layout, SRC, 0, "writer-a")
    a.commit(0, 10, _roll(a, 0, 10))
    with pytest.raises(Exception, match="does not continue"):
        a.commit(12, 20, _roll(a, 12, 20))


def test_a_swap_whose_answer_was_lost_is_recognised_as_its_own(layout, monkeypatch):
    a = PartitionHead.claim(layout, SRC, 0, "writer-a")
    store = layout.store
    real = store.swap

    def answer_lost(key, data, expected):
        real(key, data, expected)  # the swap happens ...
        raise StorageError("connection reset")  # ... and its answer never arrives

    monkeypatch.setattr(store, "swap", answer_lost)
    a.commit(0, 10, _roll(a, 0, 10))
    monkeypatch.setattr(store, "swap", real)
    a.commit(10, 20, _roll(a, 10, 20))  # the writer's view of the head is the stored one
    assert _listed(layout) == [(0, 10), (10, 20)]


def test_a_rewrite_between_two_rolls_is_kept_and_the_roll_appends_after_it(layout):
    a = PartitionHead.claim(layout, SRC, 0, "writer-a")
    first, second = _roll(a, 0, 10), _roll(a, 10, 20)
    a.commit(0, 10, first)
    a.commit(10, 20, second)
    merged = HeadFile(name=f"{0:020d}-{20:020d}.parquet", start=0, end=20)
    layout.store.put(file_key("master", SRC, 0, merged.name), b"rows")
    assert replace_files(layout, "master", SRC, 0, [first.name, second.name], merged)
    assert replace_files(layout, "master", SRC, 0, [first.name, second.name], merged)  # idempotent
    a.commit(20, 30, _roll(a, 20, 30))  # its ETag is stale: it reads the rewritten head and appends again
    head, _ = stored_head(layout, SRC, 0)
    assert [(f.name, f.start, f.end) for f in head.files][0] == (merged.name, 0, 20)
    assert _listed(layout) == [(0, 20), (20, 30)] and head.generation == 1 and head.epoch == 1


def test_racing_claims_get_distinct_epochs(layout):
    with ThreadPoolExecutor(8) as pool:
        held = list(pool.map(lambda i: PartitionHead.claim(layout, SRC, 0, f"w{i}"), range(8)))
    assert sorted(h.epoch for h in held) == list(range(1, 9))
    head, _ = stored_head(layout, SRC, 0)
    assert head.epoch == 8 and head.owner == next(h.head.owner for h in held if h.epoch == 8)
    fenced = 0
    for h in held:
        try:
            h.commit(0, 5, _roll(h, 0, 5))
        except Fenced:
            fenced += 1
    assert fenced == 7 and _listed(layout) == [(0, 5)]


def test_claim_deletes_the_fenced_epochs_unlisted_files_only(tmp_path: Path):
    layout = Layout(tmp_path / "lake")
    a = PartitionHead.claim(layout, SRC, 0, "writer-a")
    kept = _roll(a, 0, 10)
    a.commit(0, 10, kept)
    orphan = _roll(a, 10, 20)  # written, never listed (the writer died before its swap)
    merging = f"{0:020d}-{10:020d}.parquet"  # a compaction's file before its swap: within the end, no epoch
    layout.store.put(file_key("master", SRC, 0, merging), b"x")
    beyond = f"{10:020d}-{30:020d}.parquet"  # the first release's roll that crashed before its rename
    layout.store.put(file_key("rejected", SRC, 0, beyond), b"x")
    PartitionHead.claim(layout, SRC, 0, "writer-b")
    pdir = layout.master_partition(SRC, 0)
    assert (pdir / kept.name).exists() and (pdir / merging).exists()
    assert not (pdir / orphan.name).exists() and not (layout.rejected / SRC / "p=0" / beyond).exists()
