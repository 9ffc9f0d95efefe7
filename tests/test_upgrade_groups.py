"""Upgrading a running lake to group members by default and fenced dead letters (issue 29), tested on a lake made by
the previous commit's own CLI (``PREVIOUS``, extracted from git): it archives with plain (non-transactional) dead
letters and runs its static speed worker; then this code's ``lambdalake ingest`` and ``lambdalake speed`` daemons —
group members, transactional dead letters — take over on the same log. No command in between: the old dead
letters count as committed records (the high-water mark skips them), the members' epochs outrank the static
worker's snapshot, and master + DLQ and serving stay exact."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from lambdalake.clients import committed_counts
from lambdalake.procs import stop_group
from tests.conftest import LAMBDALAKE
from tests.releases import extract
from tests.releases import run_cli as run_release
from tests.test_archiver import check_exact, dlq_records
from tests.test_group_kill_loop import _caught_up
from tests.test_speed import produce
from tests.test_speed_group import _served
from tests.test_speed_workers import served_equals_oracle

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PREVIOUS = "6f68bd4dc8bdd7578d5a0dd729f31ffa8f7655f5"  # static speed daemons, dead letters without transactions


@pytest.fixture(scope="module")
def previous(tmp_path_factory) -> Path:
    return extract(PREVIOUS, tmp_path_factory.mktemp("previous"))


def test_a_lake_of_the_previous_commit_goes_on_with_group_members_and_fenced_dead_letters(settings, pipeline,
                                                                                          cli_env, previous):
    produce(settings, pipeline, 1200, seed=61)
    env = {**cli_env, "LAMBDALAKE_ARCHIVE_ROLL_ROWS": "40"}
    run_release(previous, "wiring.cli", env, "ingest", "--until-caught-up")
    run_release(previous, "wiring.cli", env, "speed", "--until-caught-up")
    old_dlq = sum(committed_counts(settings, [s.dlq_topic for s in pipeline.sources]).values())
    assert old_dlq > 0
    served_equals_oracle(settings, pipeline)

    produce(settings, pipeline, 800, seed=62)
    procs = [subprocess.Popen([LAMBDALAKE, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, start_new_session=True)
             for args in (["ingest"], ["speed", "--checkpoint-interval", "0.1"])]
    try:
        holders = _served(settings, pipeline, 1, procs=procs[1:])
        assert all(w.startswith("g-") for w in holders.values()), holders  # the member outranks the static worker
        _caught_up(settings, pipeline)
    finally:
        errs = []
        for proc in procs:
            stop_group(proc, timeout=60, first=signal.SIGTERM)
            errs.append(proc.communicate()[1].decode(errors="replace"))
    assert all("Traceback" not in e for e in errs), [e[-2000:] for e in errs]
    check_exact(settings, pipeline)  # each invalid offset once in the DLQ: old plain records + new transactions
    assert len([r for rs in dlq_records(settings, pipeline).values() for r in rs]) > old_dlq
    served_equals_oracle(settings, pipeline)
