"""Upgrading: a lake written by the previous release keeps working with this code.

The previous release (lambdalake 0.1, commit ``PREVIOUS``: untyped manifests without ``format``/``published_at``,
repr-based view fingerprints, speed snapshots and checkpoints without per-view fingerprints) is extracted from git
and run as a user ran it — its own ``lambdalake`` CLI over the same real broker — to build a lake with master,
a batch version and a speed checkpoint. Then this code takes over: serving answers exactly (or refuses with its one
line, never a wrong number), the speed layer resumes or rebuilds by itself, the next batch writes the new format,
and every view equals the oracle.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from lambdalake.clients import ensure_topics
from lambdalake.contracts import MANIFEST_FORMAT, BatchManifest
from lambdalake.exceptions import LambdalakeError
from lambdalake.layout import Layout, current_batch_manifest, read_batch_pointer
from serving import connect
from tests.oracle import assert_rows_equal, oracle_views, read_log
from tests.releases import extract
from tests.releases import run_cli as run_release
from wiring.demo_stream import demo_messages
from wiring.produce import send

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parent.parent
PREVIOUS = "e721bda"  # the last commit of lambdalake 0.1 formats


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory) -> Path:
    return extract(PREVIOUS, tmp_path_factory.mktemp("previous-release"))


@pytest.fixture
def settings(settings, tmp_path):
    """The demo pipeline as lambdalake 0.1 declared it (without the later ``unique_users``), loadable by both
    releases: this test is about formats; a changed definition is test_view_evolution's."""
    f = tmp_path / "pipeline_0_1.py"
    f.write_text(
        "from lambdalake.pipeline import Pipeline, View, load_pipeline\n"
        f"_p = load_pipeline({settings.pipeline!r})\n"
        "pipeline = Pipeline(_p.name, sources=_p.sources, views=[View(name=v.name, source=v.source, keys=v.keys, "
        "bucket=v.bucket, aggregates=[a for a in v.aggregates if getattr(a, 'kind', '') != 'approx_distinct']) "
        "for v in _p.views])\n")
    return settings.with_(pipeline=str(f))


def _old_cli(tree: Path, env: dict, *args: str) -> None:
    run_release(tree, "lambdalake.cli", env, *args)


def _views(settings, pipeline) -> dict[str, list]:
    con = connect(settings=settings, pipeline=pipeline)
    try:
        return {v.name: con.execute(f"SELECT * FROM {v.name}").fetchall() for v in pipeline.views}
    finally:
        con.close()


def test_a_lake_of_the_previous_release_keeps_serving_exactly(settings, pipeline, cli_env, run_cli,
                                                             previous_release):
    ensure_topics(settings, pipeline)
    topics = [s.topic for s in pipeline.sources]
    messages = list(demo_messages(pipeline, 3000, late_fraction=0.1, duplicate_fraction=0.05,
                                  malformed_fraction=0.02, seed=5))
    send(settings, iter(messages[:2000]), progress=False)
    _old_cli(previous_release, cli_env, "ingest", "--until-caught-up")
    _old_cli(previous_release, cli_env, "batch")
    send(settings, iter(messages[2000:]), progress=False)
    _old_cli(previous_release, cli_env, "ingest", "--until-caught-up")
    _old_cli(previous_release, cli_env, "speed", "--until-caught-up")
    layout = Layout(settings.home)
    old_manifest = current_batch_manifest(layout)
    assert isinstance(old_manifest, BatchManifest) and old_manifest.format == 1

    log = read_log(settings.bootstrap, topics)
    expected = oracle_views(pipeline, log)

    # 1. this code reads the old lake: exact, or a clear refusal until the speed layer caught up — never wrong
    try:
        got = _views(settings, pipeline)
    except (LambdalakeError, duckdb.Error) as exc:  # a refusal must say why
        assert "rebuil" in str(exc) or "pending" in str(exc), exc
    else:
        for v in pipeline.views:
            assert_rows_equal(got[v.name], expected[v.name], v.name)

    # 2. the new speed layer takes over the old checkpoint by itself (no manual step), serving is exact
    run_cli("speed", "--until-caught-up")
    got = _views(settings, pipeline)
    for v in pipeline.views:
        assert_rows_equal(got[v.name], expected[v.name], v.name)

    # 3. the next batch writes the new format; still exact
    run_cli("batch", env={"LAMBDALAKE_SPARK_MASTER": "local[2]"})
    manifest = current_batch_manifest(layout)
    assert manifest.format == MANIFEST_FORMAT and manifest.published_at
    assert manifest.version != old_manifest.version
    # ... and the pointer's new shape, keeping the old version where the old release wrote it (for rollback)
    ptr = read_batch_pointer(layout)
    assert ptr.format == 2 and ptr.version == manifest.version and ptr.prefix != f"views/batch/{manifest.version}"
    assert (old_manifest.version, f"views/batch/{old_manifest.version}") in [(r.version, r.prefix) for r in ptr.kept]
    got = _views(settings, pipeline)
    for v in pipeline.views:
        assert_rows_equal(got[v.name], expected[v.name], v.name)
