"""Speed owner records (speed.group.claim_epoch): racing claims of one partition get distinct, increasing epochs,
never below what is published; a claim whose answer was lost is recognised as its own."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from lambdalake.layout import Layout
from lambdalake.storage.base import StorageError
from speed.group import claim_epoch, member_name

KEY = ("clickstream.pageviews", 3)


def test_racing_claims_get_distinct_epochs_above_the_published_floor(tmp_path):
    root = Layout(tmp_path / "lake")
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: claim_epoch(root, KEY, f"w{i}", floor=4), range(16)))
    assert sorted(got) == list(range(5, 21))
    assert claim_epoch(root, KEY, "late", floor=2) == 21  # the record, not the floor, when it is higher
    assert claim_epoch(root, ("clickstream.pageviews", 0), "first") == 0


def test_a_claim_whose_answer_was_lost_is_its_own(tmp_path, monkeypatch):
    root = Layout(tmp_path / "lake")
    store = root.store
    real = store.swap

    def lost_answer(key, data, expected):
        real(key, data, expected)
        raise StorageError("connection reset")

    monkeypatch.setattr(store, "swap", lost_answer)
    assert claim_epoch(root, KEY, "w") == 0
    monkeypatch.setattr(store, "swap", real)
    assert claim_epoch(root, KEY, "w") == 1  # one epoch given out per claim, not two


def test_member_names_are_worker_directory_names():
    from lambdalake.layout import SPEED_WORKER_DIR

    assert SPEED_WORKER_DIR.match(member_name(0)) and SPEED_WORKER_DIR.match(member_name(63))
    assert SPEED_WORKER_DIR.match(member_name(3, "a1b2c3")) and member_name(3, "a1b2c3") != member_name(3, "d4e5f6")
