"""Upgrading a lake of lambdalake 0.2 (master files without heads) to per-partition master heads.

The 0.2 release (commit ``RELEASE_0_2``) is extracted from git and run as a user ran it — its own CLI over the same
real broker — to archive part of the log and compact it (first-release names, a compaction record). Then this code
archives the rest: each partition's first claim writes its head from the 0.2 rule (files on disk less what a
logged compaction replaced), the archiver continues exactly where 0.2 stopped, and a compaction of this code
rewrites through the head. Master and DLQ stay exact, every offset once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from batch.archiver import ingest
from batch.compact import compact
from batch.partition_buffer import RollPolicy
from lambdalake.clients import ensure_topics
from lambdalake.heads import MASTER_FILE, master_files, stored_head
from lambdalake.layout import Layout
from tests.releases import extract
from tests.releases import run_cli as run_release
from tests.test_archiver import check_exact
from wiring.demo_stream import demo_messages
from wiring.produce import send

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parent.parent
RELEASE_0_2 = "f3f6039"  # the last commit of lambdalake 0.2: master files without heads


@pytest.fixture(scope="module")
def release_0_2(tmp_path_factory) -> Path:
    return extract(RELEASE_0_2, tmp_path_factory.mktemp("release-0.2"))


def _old_cli(tree: Path, env: dict, *args: str) -> None:
    run_release(tree, "wiring.cli", env, *args)


def test_a_master_of_release_0_2_gets_heads_and_stays_exact(settings, pipeline, cli_env, release_0_2):
    ensure_topics(settings, pipeline)
    messages = list(demo_messages(pipeline, 2400, late_fraction=0.1, duplicate_fraction=0.05,
                                  malformed_fraction=0.05, seed=11))
    send(settings, iter(messages[:1200]), progress=False)
    env = {**cli_env, "LAMBDALAKE_ARCHIVE_ROLL_ROWS": "40"}
    _old_cli(release_0_2, env, "ingest", "--until-caught-up")
    _old_cli(release_0_2, env, "compact", "--target-rows", "100")
    layout = Layout(settings.home)
    src = pipeline.sources[0]
    before = {f.path.name for f in master_files(layout, src.name)}
    assert before and all(MASTER_FILE.match(n).group(3) is None for n in before)  # 0.2 names, no epoch
    assert stored_head(layout, src.name, 0) == (None, None)  # 0.2 wrote no heads

    send(settings, iter(messages[1200:]), progress=False)
    ingest(settings, pipeline, until_caught_up=True, policy=RollPolicy(max_rows=40))
    check_exact(settings, pipeline)
    for s in pipeline.sources:
        for f in master_files(layout, s.name):
            head, _ = stored_head(layout, s.name, f.partition)
            assert head is not None and head.epoch == 1 and head.owner
    after = {f.path.name for f in master_files(layout, src.name)}
    assert before <= after  # every 0.2 file listed as it was, the new ones appended
    assert any(MASTER_FILE.match(n).group(3) == "1" for n in after - before)

    listed = len(stored_head(layout, src.name, 0)[0].files)
    report = compact(settings.home, pipeline, target_rows=10_000)
    assert report.groups > 0
    check_exact(settings, pipeline)
    head, _ = stored_head(layout, src.name, 0)
    assert head.generation > 0 and len(head.files) < listed
    ingest(settings, pipeline, until_caught_up=True)  # a second claim after the rewrite: epoch 2, nothing new
    assert stored_head(layout, src.name, 0)[0].epoch == 2
    check_exact(settings, pipeline)
