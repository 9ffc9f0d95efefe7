"""`make run`'s demo, end to end on a small stream: exact results, and nothing left running afterwards."""

from __future__ import annotations

import os
import re
import subprocess

import psutil
import pytest

from lambdalake.embedded import free_port
from tests.conftest import LAMBDALAKE

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_the_whole_lambda_pipeline_and_cleans_up(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDALAKE_")}
    home = tmp_path / "lake"
    res = subprocess.run([LAMBDALAKE, "demo", "--events", "3000", "--rate", "1500", "--port", str(free_port()),
                          "--home", str(home)], env=env, capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    assert "published batch version v000001" in out
    # the cross-check of every view against the log itself
    checks = re.findall(r"(\w+): sum\(\w+\) = ([\d,]+) vs ([\d,]+) valid deduplicated events .* → (\w+)", out)
    assert {c[0] for c in checks} == {"pageviews_hourly", "revenue_daily", "user_activity_daily"}, out[-2000:]
    assert all(c[1] == c[2] and c[3] == "equal" for c in checks), checks
    assert "every message of the log is now visible to queries" in out
    # nothing the demo started is still running
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if p.info["cmdline"] and str(home) in " ".join(p.info["cmdline"])]
    assert leftovers == []
    # the lake stays queryable without Kafka
    q = subprocess.run([LAMBDALAKE, "sql", "SELECT sum(orders) FROM revenue_daily", "--format", "csv"],
                       env={**env, "LAMBDALAKE_HOME": str(home)}, capture_output=True, text=True, timeout=120)
    assert q.returncode == 0, q.stderr
    revenue_check = next(c for c in checks if c[0] == "revenue_daily")
    assert q.stdout.strip().splitlines()[-1] == revenue_check[1].replace(",", "")


def test_demo_on_s3_runs_the_same_pipeline_with_the_lake_in_a_bucket_and_cleans_up(tmp_path):
    """`make run-s3`: the demo with the lake in a bucket of the embedded S3 server it starts and stops."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAMBDALAKE_", "AWS_"))}
    home = tmp_path / "lake"
    res = subprocess.run([LAMBDALAKE, "demo", "--s3", "--events", "2000", "--rate", "1500", "--port",
                          str(free_port()), "--home", str(home)], env=env, capture_output=True, text=True,
                         timeout=600, stdin=subprocess.DEVNULL)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    assert "lake: s3://lake/demo" in out and "published batch version v000001" in out
    checks = re.findall(r"(\w+): sum\(\w+\) = ([\d,]+) vs ([\d,]+) valid deduplicated events .* → (\w+)", out)
    assert {c[0] for c in checks} == {"pageviews_hourly", "revenue_daily", "user_activity_daily"}, out[-2000:]
    assert all(c[1] == c[2] and c[3] == "equal" for c in checks), checks
    assert "every message of the log is now visible to queries" in out and "stopped the S3 server" in out
    # the lake is in the bucket: no lake file in the local directories, only the server's own data and the mirror
    local = [p for p in home.rglob("*.parquet") if "s3" not in p.relative_to(home).parts[0]]
    assert local == [], local
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if p.info["cmdline"] and str(home) in " ".join(p.info["cmdline"])]
    assert leftovers == []
