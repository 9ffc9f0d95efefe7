"""Unit tests (no Spark, no Kafka) of the batch publish protocol on the storage seam (docs/design.md "Publish
protocol"): one compare-and-swap of ``views/batch/CURRENT`` publishes a version staged under its run's own prefix.
Racing publishers, a swap whose answer was lost, rollback then publish (no ABA), kill -9 before the swap, and a
pointer of the first release read and replaced."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lambdalake import contracts
from lambdalake.contracts import BatchManifest, BatchPointer, Positions
from lambdalake.exceptions import InvariantViolation
from lambdalake.layout import (
    BATCH_POINTER_KEY,
    Layout,
    batch_pointer,
    current_batch_manifest,
    kept_batch_versions,
    read_batch_manifest,
    read_batch_pointer,
)
from lambdalake.storage.base import StorageError
from lambdalake.storage.local import LocalStore
from lambdalake.versions import new_staging_dir, publish, retire_versions, rollback
from serving.published import resolve_pair
from tests.test_batch_publish import TOPIC, _manifest, _publish

REPO = Path(__file__).resolve().parent.parent


def _check_pointer(layout: Layout) -> BatchPointer:
    """The pointer's invariants: new shape, current among the kept, one prefix per version and one version per
    prefix, every kept prefix holding the manifest of exactly that version."""
    ptr = read_batch_pointer(layout)
    assert ptr is not None and ptr.format == 2
    versions = [r.version for r in ptr.kept]
    assert versions == sorted(versions, reverse=True) and len(set(versions)) == len(versions)
    assert len({r.prefix for r in ptr.kept}) == len(ptr.kept)
    assert (ptr.version, ptr.prefix) in {(r.version, r.prefix) for r in ptr.kept}
    for r in ptr.kept:
        assert read_batch_manifest(layout, r.version).version == r.version
        assert contracts.read(layout.home / r.prefix / "manifest.json", BatchManifest).version == r.version
    return ptr


def test_the_pointer_maps_versions_to_prefixes_and_nothing_is_renamed(tmp_path):
    layout = Layout(tmp_path)
    staging = new_staging_dir(layout)
    (staging / "pageviews_hourly").mkdir()
    m = publish(layout, staging, _manifest(50))
    assert staging.is_dir() and (staging / "manifest.json").is_file()  # the version lives where it was staged
    ptr = _check_pointer(layout)
    assert (ptr.version, ptr.prefix, ptr.last, ptr.seq) == (m.version, f"views/batch/{staging.name}", "v000001", 1)
    assert layout.batch_version("v000001") == staging and current_batch_manifest(layout) == m
    assert [v for v, _ in kept_batch_versions(layout)] == ["v000001"]


def test_a_pointer_of_the_first_release_is_read_then_replaced_by_the_new_shape(tmp_path):
    """The first release: versions in views/batch/v<n>/, CURRENT = {"version": ...} (here after a rollback to v2),
    a half-deleted .trash- directory. Readers take it as it is; the first publish writes the new shape with the
    kept versions derived once from those directories and never reuses v3's number."""
    layout = Layout(tmp_path)
    for n in (1, 2, 3):
        d = layout.batch_views / f"v00000{n}"
        (d / "pageviews_hourly").mkdir(parents=True)
        (d / "manifest.json").write_bytes(contracts.encode(
            BatchManifest(pipeline="clickstream", version=f"v00000{n}",
                          watermark=Positions.of_topics({TOPIC: {0: 50 * n}}), block=50)))
    (layout.batch_views / ".trash-v000000-0badc0de").mkdir()
    layout.batch_pointer.write_bytes(b'{"version": "v000002"}\n')
    assert batch_pointer(layout) == "v000002" and current_batch_manifest(layout).version == "v000002"
    assert layout.batch_versions() == ["v000001", "v000002", "v000003"]
    assert layout.batch_version("v000003") == layout.batch_views / "v000003"
    assert resolve_pair(tmp_path).batch_version == "v000002"
    # a watermark below the current one (v2: 100) is refused against the old pointer, which stays as it was
    with pytest.raises(InvariantViolation, match="below the published"):
        _publish(layout, 50)
    assert layout.batch_pointer.read_bytes() == b'{"version": "v000002"}\n'
    m = _publish(layout, 150, keep=2)
    assert m.version == "v000004"  # v3 existed: its number is never given out again
    ptr = _check_pointer(layout)
    assert [(r.version, r.prefix) for r in ptr.kept][1:] == [("v000003", "views/batch/v000003")]
    assert ptr.last == "v000004" and {r.version for r in ptr.retired} == {"v000001", "v000002"}
    assert not (layout.batch_views / "v000001").exists() and not (layout.batch_views / "v000002").exists()
    assert not (layout.batch_views / ".trash-v000000-0badc0de").exists()
    assert rollback(tmp_path) == ("v000004", "v000003")
    assert current_batch_manifest(layout).version == "v000003"
    assert resolve_pair(tmp_path).batch_dir == layout.batch_views / "v000003"


def test_racing_publishers_get_one_version_per_number_and_lose_nothing(tmp_path):
    """Threads publishing into one lake at once, equal watermarks: every publish gets its own number, numbers are
    1..N without a gap, and the pointer keeps every one of them with its own prefix."""
    layout = Layout(tmp_path)
    threads, per_thread = 4, 6
    results: list[BatchManifest] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def run() -> None:
        try:
            barrier.wait()
            for _ in range(per_thread):
                results.append(_publish(Layout(tmp_path), 100, keep=1000))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    assert not errors, errors
    n = threads * per_thread
    assert sorted(m.version for m in results) == [f"v{i:06d}" for i in range(1, n + 1)]
    ptr = _check_pointer(layout)
    assert len(ptr.kept) == n and ptr.seq == n and ptr.version == f"v{n:06d}"


def test_racing_publishers_in_order_or_refused_by_the_watermark_rule(tmp_path):
    """Publishers with different watermarks racing, with retention at 2: whoever publishes, versions are numbered
    in the order their swaps won, the watermark never goes back along the numbers, a refused publish leaves no
    version, and no kept prefix was deleted."""
    layout = Layout(tmp_path)
    _publish(layout, 50)
    outcome: dict[int, list] = {w: [] for w in (100, 150, 200, 250)}
    barrier = threading.Barrier(len(outcome))

    def run(w: int) -> None:
        barrier.wait()
        for _ in range(5):
            try:
                outcome[w].append(_publish(Layout(tmp_path), w, keep=2))
            except InvariantViolation as exc:
                outcome[w].append(exc)

    workers = [threading.Thread(target=run, args=(w,)) for w in outcome]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    published = sorted((m for ms in outcome.values() for m in ms if isinstance(m, BatchManifest)),
                       key=lambda m: m.version)
    refused = [e for es in outcome.values() for e in es if isinstance(e, InvariantViolation)]
    assert len(published) + len(refused) == 20 and outcome[250][-1].version  # the highest is never refused
    assert [m.version for m in published] == [f"v{i:06d}" for i in range(2, len(published) + 2)]
    marks = [m.watermark.at(TOPIC, 0) for m in published]
    assert marks == sorted(marks)
    assert all("below the published" in str(e) for e in refused)
    ptr = _check_pointer(layout)
    assert ptr.version == published[-1].version and len(ptr.kept) == 2


class LostAnswer(LocalStore):
    """The first swap of the pointer is made, but its answer is lost: ``None`` as a retried conditional PUT gets
    ("precondition failed"), or an error; ``meanwhile`` runs between the write and the lost answer."""

    def __init__(self, root, how: str, meanwhile=None):
        super().__init__(root)
        self.how, self.meanwhile, self.swaps = how, meanwhile, 0

    def swap(self, key, data, expected):
        etag = super().swap(key, data, expected)
        self.swaps += 1
        if key != BATCH_POINTER_KEY or self.swaps > 1 or etag is None:
            return etag
        if self.meanwhile is not None:
            self.meanwhile()
        if self.how == "error":
            raise StorageError("connection reset while waiting for the answer")
        return None


@pytest.mark.parametrize("how", ["none", "error"])
@pytest.mark.parametrize("overtaken", [False, True])
def test_a_swap_whose_answer_was_lost_recognises_its_own_success(tmp_path, how, overtaken):
    _publish(Layout(tmp_path), 50)
    meanwhile = (lambda: _publish(Layout(tmp_path), 100)) if overtaken else None
    layout = Layout(tmp_path, store=LostAnswer(tmp_path, how, meanwhile))
    m = _publish(layout, 100)
    assert m.version == "v000002" and layout.store.swaps == 1  # never swapped again: no second version
    ptr = _check_pointer(Layout(tmp_path))
    assert [r.version for r in ptr.kept] == (["v000003", "v000002", "v000001"] if overtaken
                                             else ["v000002", "v000001"])
    assert _publish(Layout(tmp_path), 150).version == ("v000004" if overtaken else "v000003")


@pytest.mark.parametrize("how", ["none", "error"])
def test_rollback_and_retention_with_a_lost_answer(tmp_path, how):
    for w in (50, 100, 150):
        _publish(Layout(tmp_path), w)
    assert rollback(tmp_path, layout=Layout(tmp_path, store=LostAnswer(tmp_path, how))) == ("v000003", "v000002")
    assert batch_pointer(Layout(tmp_path)) == "v000002"
    assert _publish(Layout(tmp_path), 200).version == "v000004"
    layout = Layout(tmp_path, store=LostAnswer(tmp_path, how))
    assert retire_versions(tmp_path, keep=2, layout=layout) == ["v000001", "v000002"]
    assert [r.version for r in _check_pointer(Layout(tmp_path)).kept] == ["v000004", "v000003"]


def test_rollback_then_publish_never_looks_like_an_old_body(tmp_path):
    layout = Layout(tmp_path)
    _publish(layout, 50)
    at_v1 = layout.store.get_versioned(BATCH_POINTER_KEY)
    _publish(layout, 100)
    assert rollback(tmp_path) == ("v000002", "v000001")
    now = layout.store.get_versioned(BATCH_POINTER_KEY)
    ptr = read_batch_pointer(layout)
    assert ptr.version == "v000001" and ptr.seq == 3 and now.etag != at_v1.etag  # same version, another body
    # a writer that read the pointer when v1 was first current cannot swap now (no ABA)
    assert layout.store.swap(BATCH_POINTER_KEY, b'{"version": "v000001"}', at_v1.etag) is None
    m = _publish(layout, 100)
    assert m.version == "v000003"  # v2 is kept: its number is never given out again
    assert [r.version for r in _check_pointer(layout).kept] == ["v000003", "v000002", "v000001"]


CRASHING_PUBLISH = """
import sys
from pathlib import Path
from lambdalake.layout import Layout
from lambdalake.versions import new_staging_dir, publish
from tests.test_batch_pointer import _manifest
layout = Layout(Path(sys.argv[1]))
staging = new_staging_dir(layout)
(staging / "pageviews_hourly").mkdir()
print(staging.name, flush=True)
publish(layout, staging, _manifest(100))
"""


def test_kill_9_between_the_staged_write_and_the_swap_serves_nothing_and_is_cleaned_up(tmp_path):
    layout = Layout(tmp_path)
    m1 = _publish(layout, 50)
    before = layout.batch_pointer.read_bytes()
    proc = subprocess.run([sys.executable, "-c", CRASHING_PUBLISH, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "LAMBDALAKE_BATCH_FAULT": "swap"})
    assert proc.returncode == -9, proc.stderr
    dead = layout.batch_views / proc.stdout.split()[0]
    assert (dead / "manifest.json").is_file()  # staged and stamped in full ...
    assert layout.batch_pointer.read_bytes() == before  # ... and nothing served
    assert layout.batch_versions() == ["v000001"] and resolve_pair(tmp_path).manifest == m1
    m2 = _publish(layout, 100)
    assert not dead.exists()  # the next run removed the dead run's prefix
    assert m2.version == "v000002" and _check_pointer(layout).version == "v000002"
