"""The journal of the master rewrites (:mod:`batch.rewrite`) without a broker: a lake written before the journal
records became typed contracts (:class:`lambdalake.contracts.CompactionRecord`,
:class:`lambdalake.contracts.ErasureRecord`) — an interrupted compaction or erasure left ``started`` on disk in the
previous format, built here as a literal copy of what the previous code wrote — is read by the readers' rules and
recovered exactly as before: rolled forward when the new file is in place with its recorded sha256, rolled back
otherwise. And what the code writes now has the same keys as that format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from batch.compact import compact, recover_compactions
from batch.erase import forget, recover_erasures
from batch.master import master_table, sha256_file, write_parquet_atomic
from lambdalake import erasure
from lambdalake.config import load_settings
from lambdalake.contracts import ErasureRequest
from lambdalake.heads import master_files
from lambdalake.layout import Layout, MasterFile
from lambdalake.schema import OFFSET_COL
from lambdalake.validation import Validator
from wiring.demo_stream import demo_messages

STAMP = "20260101T000000000000Z"
OLD_TIME = "2026-01-01T00:00:00.000000+00:00"  # the previous compaction's timestamps (erasure's ended in Z)

# the keys the previous code wrote (before ``done``: no finished_at)
COMPACT_KEYS = {"kind", "status", "source", "partition", "start", "end", "started_at", "pid", "replaced", "merged"}
ERASE_KEYS = {"kind", "status", "dataset", "source", "partition", "start", "end", "name", "requests", "offsets",
              "started_at", "pid", "old", "new"}


def _old_dump(rec: dict) -> bytes:
    """The previous code's encoding of a journal record (``json.dumps``, keys sorted)."""
    return (json.dumps(rec, indent=1, sort_keys=True) + "\n").encode()


def _lake(tmp_path: Path, clickstream, n_files: int = 3) -> tuple[Layout, object, list[MasterFile]]:
    """``n_files`` adjacent master files of pageviews, partition 0, written by the archiver's own writers."""
    src = clickstream.source("pageviews")
    msgs = [m for m in demo_messages(clickstream, 90, malformed_fraction=0.0, duplicate_fraction=0.0, seed=3)
            if m.topic == src.topic]
    validate = Validator(src)
    layout = Layout(tmp_path)
    cut = [round(i * len(msgs) / n_files) for i in range(n_files + 1)]
    for start, end in zip(cut, cut[1:], strict=False):
        recs = [validate(m.value).record for m in msgs[start:end]]
        cols = {f.name: [r[f.name] for r in recs] for f in src.fields}
        write_parquet_atomic(master_table(src, cols, 0, list(range(start, end)), [0] * (end - start)),
                             layout.master_file(src.name, 0, start, end))
    return layout, src, master_files(layout, src.name)


def _write_old(layout: Layout, name: str, rec: dict) -> Path:
    layout.master_log().mkdir(parents=True, exist_ok=True)
    path = layout.master_log() / name
    path.write_bytes(_old_dump(rec))
    return path


def _old_compaction(layout: Layout, src, group: list[MasterFile], *, renamed: bool) -> tuple[Path, Path, Path]:
    """What the previous compaction left when killed after its intent record: renamed (the merged file in place,
    the replaced files still there) or not (the merged file still under its temporary name)."""
    pdir = group[0].path.parent
    final = pdir / f"{group[0].start:020d}-{group[-1].end:020d}.parquet"
    tmp = pdir / f".{final.name}.0123abcd.tmp"
    merged = pa.concat_tables([pq.read_table(f.path) for f in group])
    pq.write_table(merged, tmp)
    rec = {"kind": "compact", "status": "started", "source": src.name, "partition": 0, "start": group[0].start,
           "end": group[-1].end, "started_at": OLD_TIME, "pid": 4242,
           "replaced": [{"name": f.path.name, "rows": pq.ParquetFile(f.path).metadata.num_rows,
                         "bytes": f.path.stat().st_size, "sha256": sha256_file(f.path)} for f in group],
           "merged": {"name": final.name, "tmp": tmp.name, "rows": merged.num_rows, "bytes": tmp.stat().st_size,
                      "sha256": sha256_file(tmp)}}
    path = _write_old(layout, f"{STAMP}-compact-{src.name}-p0-{group[0].start:020d}-{group[-1].end:020d}.json", rec)
    if renamed:
        os.replace(tmp, final)
    return path, final, tmp


@pytest.mark.parametrize("renamed", [True, False])
def test_a_compaction_interrupted_by_the_previous_code_is_recovered(tmp_path, clickstream, renamed):
    layout, src, files = _lake(tmp_path, clickstream)
    group = files[:2]
    rows = {f.path.name: pq.read_table(f.path).num_rows for f in files}
    path, final, tmp = _old_compaction(layout, src, group, renamed=renamed)
    counted = [f.path.name for f in master_files(layout, src.name)]  # THE rule, before any recovery
    if renamed:
        assert counted == [final.name, files[2].path.name]  # the replaced files are left out: each offset once
    else:
        assert counted == [f.path.name for f in files]
    got = recover_compactions(layout)
    assert got == [f"{path.name}: {'done' if renamed else 'aborted'}"]
    after = json.loads(path.read_text())
    assert after["status"] == ("done" if renamed else "aborted") and after.get("recovered", False) is renamed
    assert after["recovered_at"] and after["pid"] == 4242 and after["started_at"] == OLD_TIME
    assert not tmp.exists()
    on_disk = [f.path.name for f in layout.master_files_on_disk(src.name)]
    assert on_disk == ([final.name, files[2].path.name] if renamed else [f.path.name for f in files])
    assert sum(pq.read_table(f.path).num_rows for f in master_files(layout, src.name)) == sum(rows.values())
    assert recover_compactions(layout) == []  # nothing left started


def test_the_test_suites_short_old_compaction_record_still_decodes(tmp_path, clickstream):
    """The smallest record the previous recovery accepted (no ranges, sizes, pid; ``tmp`` null)."""
    layout, src, files = _lake(tmp_path, clickstream)
    group = files[:2]
    final = layout.master_file(src.name, 0, group[0].start, group[-1].end)
    write_parquet_atomic(pa.concat_tables([pq.read_table(f.path) for f in group]), final)
    path = _write_old(layout, f"{STAMP}-compact-x.json", {
        "kind": "compact", "status": "started", "source": src.name, "partition": 0,
        "replaced": [{"name": f.path.name} for f in group],
        "merged": {"name": final.name, "tmp": None, "sha256": sha256_file(final)}})
    assert [f.path for f in master_files(layout, src.name)] == [final, files[2].path]
    assert recover_compactions(layout) == [f"{path.name}: done"]
    assert not any(f.path.exists() for f in group)


@pytest.mark.parametrize("renamed", [True, False])
def test_an_erasure_interrupted_by_the_previous_code_is_recovered(tmp_path, clickstream, renamed):
    layout, src, files = _lake(tmp_path, clickstream, n_files=1)
    f = files[0]
    table = pq.read_table(f.path)
    subject = table.column(src.key)[0].as_py()
    keep = pc.invert(pc.equal(table.column(src.key), subject))
    offsets = table.column(OFFSET_COL).filter(pc.invert(keep)).to_pylist()
    kept = table.filter(keep)
    tmp = f.path.with_name(f".{f.path.name}.89abcdef.tmp")
    pq.write_table(kept, tmp)
    rec = {"kind": "erase", "status": "started", "dataset": "master", "source": src.name, "partition": 0,
           "start": f.start, "end": f.end, "name": f.path.name, "requests": ["r1"], "offsets": offsets,
           "started_at": "2026-01-01T00:00:00.000000Z", "pid": 4242,
           "old": {"rows": table.num_rows, "bytes": f.path.stat().st_size, "sha256": sha256_file(f.path)},
           "new": {"tmp": tmp.name, "rows": kept.num_rows, "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}}
    path = _write_old(layout, f"{STAMP}-erase-{src.name}-master-p0-{f.start:020d}-{f.end:020d}.json", rec)
    if renamed:
        os.replace(tmp, f.path)
    # the readers' rule: the offsets count as erased from the rename on
    assert erasure.erased_offsets(layout, src.name) == ({0: frozenset(offsets)} if renamed else {})
    assert [r.status for _, r in erasure.erase_records(layout)] == ["started"]
    got = recover_erasures(layout)
    assert got == [f"{path.name}: {'done' if renamed else 'aborted'}"]
    after = json.loads(path.read_text())
    assert after["status"] == ("done" if renamed else "aborted") and after.get("recovered", False) is renamed
    assert after["offsets"] == offsets and after["requests"] == ["r1"] and after["recovered_at"]
    assert not tmp.exists()
    assert pq.read_table(f.path).num_rows == (kept.num_rows if renamed else table.num_rows)
    assert erasure.erased_offsets(layout, src.name) == ({0: frozenset(offsets)} if renamed else {})
    req = ErasureRequest(id="r1", source=src.name, subject=subject, requested_at="", requested_at_unix=0.0,
                                 master_rewritten_at="x")
    want = {(str(f.path.relative_to(layout.home)), rec["old"]["sha256"])} if renamed else set()
    assert erasure.replaced_inputs(layout, req) == want


def test_the_journal_keeps_the_previous_format(tmp_path, clickstream):
    """A compaction and an erasure written now: the keys of the previous format, ``done``, read back typed."""
    layout, src, files = _lake(tmp_path, clickstream)
    report = compact(layout.home, clickstream, target_rows=1_000_000)
    assert report.groups == 1 and report.files_replaced == 3
    (rec_path,) = sorted(layout.master_log().glob("*-compact-*.json"))
    rec = json.loads(rec_path.read_text())
    assert set(rec) == COMPACT_KEYS | {"finished_at"} and rec["kind"] == "compact" and rec["status"] == "done"
    assert all(set(r) == {"name", "rows", "bytes", "sha256"} for r in rec["replaced"])
    assert set(rec["merged"]) == {"name", "tmp", "rows", "bytes", "sha256"}
    assert [r["name"] for r in rec["replaced"]] == [f.path.name for f in files]
    merged = master_files(layout, src.name)
    assert [f.path.name for f in merged] == [rec["merged"]["name"]]
    assert rec["merged"]["sha256"] == sha256_file(merged[0].path)

    settings = load_settings(home=layout.home, pipeline="lambdalake.pipelines.clickstream")
    subject = pq.read_table(merged[0].path).column(src.key)[0].as_py()
    out = forget(settings, clickstream, src.name, [subject], publish=False)
    assert out.master_rows >= 1
    (erase_path,) = sorted(layout.master_log().glob("*-erase-*.json"))
    assert f"-erase-{src.name}-master-p0-" in erase_path.name
    rec = json.loads(erase_path.read_text())
    assert set(rec) == ERASE_KEYS | {"finished_at"} and rec["kind"] == "erase" and rec["status"] == "done"
    assert set(rec["old"]) == {"rows", "bytes", "sha256"} and set(rec["new"]) == {"tmp", "rows", "bytes", "sha256"}
    assert rec["new"]["sha256"] == sha256_file(merged[0].path)
    assert rec["old"]["rows"] - rec["new"]["rows"] == out.master_rows == len(rec["offsets"])
    (_, typed), = erasure.erase_records(layout)
    assert typed.status == "done" and typed.offsets == rec["offsets"] and typed.requests == rec["requests"]
