"""Wrong arguments, config or environment: one actionable line, non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

LAMBDALAKE = str(Path(sys.executable).parent / "lambdalake")


def run(args, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDALAKE_")}
    e.update(env)
    return subprocess.run([LAMBDALAKE, *args], capture_output=True, text=True, env=e, timeout=60)


@pytest.mark.parametrize("args, env, expected", [
    (["produce", "--events", "10", "--pipeline", "/nope/p.py"], {}, "pipeline file '/nope/p.py' not found"),
    (["produce", "--events", "10", "--pipeline", "nope_mod.x"], {}, "pipeline module 'nope_mod.x' not found"),
    (["produce", "--events", "10"], {"LAMBDALAKE_BOOTSTRAP": "127.0.0.1:1"}, "cannot reach Kafka at 127.0.0.1:1"),
    (["produce", "--events", "10"], {"LAMBDALAKE_BOOTSTRAP": "nonsense"}, "is not host:port"),
    (["produce", "--events", "10"], {"LAMBDALAKE_PARTITIONS": "four"}, "LAMBDALAKE_PARTITIONS='four'"),
    (["produce", "--events", "10", "--start", "yesterday"], {"LAMBDALAKE_BOOTSTRAP": "127.0.0.1:1"},
     "--start 'yesterday' is not an RFC 3339"),
    (["produce", "--events", "-3"], {}, "--events"),
    (["produce", "--late-fraction", "2", "--events", "1"], {}, "--late-fraction"),
    (["load", "/nope.csv", "--source", "purchases"], {"LAMBDALAKE_BOOTSTRAP": "127.0.0.1:1"}, "not found"),
    (["nosuchcommand"], {}, "No such command"),
    (["forget", "--source", "pageviews", "u1"], {"LAMBDALAKE_HOME": "s3://bucket/lake"},
     "no S3 credentials for s3://bucket/lake"),
    (["kafka", "status"], {"LAMBDALAKE_HOME": "s3://bucket/lake"},
     "lake s3://bucket/lake: this command needs a local directory"),
    (["audit"], {"LAMBDALAKE_HOME": "s3://bucket/lake"}, "no S3 credentials for s3://bucket/lake"),
    (["status"], {"LAMBDALAKE_HOME": "s3://bucket/lake"}, "no S3 credentials for s3://bucket/lake"),
    (["batch", "--home", "s3://bucket/lake"], {}, "no S3 credentials for s3://bucket/lake"),
    (["ingest", "--home", "gs://bucket/lake"], {}, "no storage for gs:// lakes"),
    (["speed", "--group", "--until-caught-up"], {}, "--group takes the partitions the group assigns: not with"),
    (["ingest", "--group", "--share", "0/2"], {}, "--group takes the partitions the group assigns: not with"),
])
def test_bad_input_gets_one_actionable_line(args, env, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run(args, **{"LAMBDALAKE_HOME": str(tmp_path), **env})
    assert res.returncode != 0
    assert expected in res.stderr, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(":")], "a URL made a local directory"


def test_unknown_source_for_load(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text("{}\n")
    res = run(["load", str(f), "--source", "nope"], LAMBDALAKE_HOME=str(tmp_path),
              LAMBDALAKE_BOOTSTRAP="127.0.0.1:1")
    assert res.returncode != 0 and "unknown source 'nope'" in res.stderr and "Traceback" not in res.stderr


def test_group_ids_are_per_lake(tmp_path):
    """Two lakes fed by the same topics (staging and production) never share a consumer group, so they never split
    the partitions between them; every machine naming the same lake joins the same group."""
    from lambdalake.config import Settings, lake_url, load_settings

    a, b = load_settings(home=tmp_path / "a"), load_settings(home=tmp_path / "b")
    again = load_settings(home=str(tmp_path / "x" / ".." / "a"))
    # (an S3 lake's settings read its lake.json from the bucket: built here without one, from the URL alone)
    s3, s3_again = (Settings(home=tmp_path / w, pipeline="p", lake=lake_url("s3://bucket/lake/")) for w in "mn")
    assert a.group_id("speed", "clickstream") != b.group_id("speed", "clickstream")
    assert a.group_id("speed", "clickstream") == again.group_id("speed", "clickstream")
    assert s3.group_id("archiver", "p") == s3_again.group_id("archiver", "p") != a.group_id("archiver", "p")
    assert a.group_id("archiver", "clickstream").startswith("lambdalake-archiver.clickstream.")
