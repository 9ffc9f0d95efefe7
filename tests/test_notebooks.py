"""The comparison notebooks run, small, on the project's own kernel — and their numbers say what the prose claims.

Each notebook is executed with nbclient on the ``lambdalake`` kernel (the venv's python; the fixture installs the
kernel spec if ``make install`` has not). Small parameters are injected after the notebook's ``parameters`` cell
(papermill's convention); the notebook writes a JSON summary to ``summary_path``, which the test checks against
what the notebook's text claims: Lambda and Kappa equal the oracle (also after a view definition changes),
batch-only is stale, serving answers equal the raw events, dual writes diverge while the log-derived stores do not.
Every notebook starts its own Kafka broker; the tests also check it is gone afterwards, and that it dies with the
kernel if the kernel is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
KERNEL = "lambdalake"


@pytest.fixture(scope="module")
def kernel() -> str:
    """The ``lambdalake`` kernel spec, pointing at this very interpreter (installed into the venv if missing)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    def ours() -> bool:
        try:
            spec = KernelSpecManager().get_kernel_spec(KERNEL)
        except NoSuchKernel:
            return False
        return Path(spec.argv[0]).resolve() == Path(sys.executable).resolve()

    if not ours():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", KERNEL,
                        "--display-name", "lambdalake (.venv)"], check=True, capture_output=True)
    assert ours(), f"kernel spec {KERNEL!r} does not run {sys.executable}"
    return KERNEL


def _inject(nb, params: dict) -> None:
    """Add a cell with ``params`` right after the cell tagged ``parameters`` (which must exist)."""
    idx = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None)
    assert idx is not None, "the notebook has no cell tagged 'parameters'"
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx + 1, cell)


def run_notebook(name: str, kernel: str, tmp_path: Path, **params) -> tuple[dict, object]:
    """Execute ``notebooks/<name>`` with ``params``; returns (its JSON summary, the executed notebook)."""
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # committed without outputs
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name} is committed with outputs"
    summary_path = tmp_path / f"{path.stem}.summary.json"
    _inject(nb, {**params, "summary_path": str(summary_path)})
    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=900,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / name)  # the executed copy, for a look after a failure
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    summary = json.loads(summary_path.read_text())
    _assert_gone(summary["broker_pid"], f"{name}'s Kafka broker")
    return summary, nb


def _assert_gone(pid: int, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            p = psutil.Process(pid)
            if p.status() == psutil.STATUS_ZOMBIE or "kafka.Kafka" not in p.cmdline():
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} (pid {pid}) is still running")


def _figures(nb) -> int:
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if o.output_type == "display_data" and "image/png" in o.get("data", {}))


def test_lambda_vs_kappa(kernel, tmp_path):
    s, nb = run_notebook("lambda_vs_kappa.ipynb", kernel, tmp_path, events=1500, rounds=4, batch_every=2)
    final, worst = s["final"], s["max_error_after_processing"]
    assert s["log_duplicates"] > 0, "the stream must contain duplicates for the comparison to mean anything"
    # Lambda: exact after every round (not only at the end), nothing behind
    assert worst["lambda"] == 0
    assert final["lambda"] == {"error": 0.0, "events_off": 0, "rows_differing": 0, "messages_behind": 0,
                               "events_off_in_old_buckets": 0}
    # Kappa: the speed code replaying from offset 0 equals the oracle
    assert final["kappa"]["rows_differing"] == 0 and final["kappa"]["messages_behind"] == 0
    # batch-only is stale between runs
    assert worst["batch-only"] > 0
    assert final["speed-only"]["rows_differing"] == 0
    # Lambda's speed state is pruned at each handoff; speed-only and Kappa keep all of history
    rows = s["speed_state_rows_final"]
    assert rows["lambda"] < rows["speed-only"] and rows["kappa"] == rows["speed-only"]
    # costs were measured: the replays re-read the log, so Kappa reads more Kafka bytes than speed-only
    cost = s["cost"]
    assert all(cost[a]["cpu_seconds"] > 0 for a in cost)
    assert cost["kappa"]["bytes_read"] > cost["speed-only"]["bytes_read"] > 0
    assert s["batch_versions"] == 2
    assert _figures(nb) >= 3

    # A view definition changes (pageviews_hourly 1 h -> 30 min) on two copies of the lake: Lambda recomputes with
    # Spark from the master, Kappa replays the log; each then lets the speed layer rebuild the view.
    vc = s["view_change"]
    assert vc["new_bucket_s"] == 1800 and vc["old_bucket_s"] == 3600
    steps = {(x["approach"], x["step"].split()[1]): x for x in vc["steps"]}
    assert [a for a, _ in steps] == ["lambda", "lambda", "kappa", "kappa"]
    for a, first in (("lambda", "batch"), ("kappa", "replay")):
        r = vc["approaches"][a]
        # refused before, and still refused with one side rebuilt: never old rows under the new definition
        assert r["states"] == ["rebuilding", "rebuilding", "current"], (a, r["states"])
        assert "being rebuilt for its new definition" in r["refused_before"], r["refused_before"]
        assert "being rebuilt" in steps[a, first]["refused_after"]
        # then right: current, and equal to the independent recomputation with the new definition (all views)
        assert r["state"] == "current" and r["rows_differing"] == 0 and r["other_views_rows_differing"] == 0, r
        assert r["rows"] == vc["oracle_rows_new"] and r["windows_off_the_hour"] > 0, r
        assert r["seconds_until_right"] > 0 and r["cpu_seconds"] > 0
        assert r["bytes_read"] == sum(x["bytes_read"] for k, x in steps.items() if k[0] == a)
        # the speed rebuild's bytes are those of the messages it replayed, by its own count
        speed = steps[a, "speed"]
        assert speed["speed_says_replayed"] == speed["log_messages"] > 0 and speed["bytes_read"] > 0
    assert steps["lambda", "batch"]["bytes_read"] > 0  # Parquet master files
    assert 0 < steps["kappa", "replay"]["log_messages"] <= vc["topic_messages"]
    assert steps["kappa", "replay"]["bytes_read"] > 0  # log messages below W


def test_serving_vs_raw(kernel, tmp_path):
    s, nb = run_notebook("serving_vs_raw.ipynb", kernel, tmp_path, events=1500, reps=5)
    assert s["all_identical"] and len(s["identical"]) >= 4
    # the merge was exercised: answers combined rows of both sides (small topics may not fill a batch block yet)
    assert any(v["batch_rows"] > 0 and v["speed_rows_visible"] > 0 for v in s["sides"].values())
    for q, lat in s["latency"].items():
        assert lat["merged_p50_ms"] > 0 and lat["raw_p50_ms"] > 0, q
    assert _figures(nb) >= 1


def test_dual_writes(kernel, tmp_path):
    s, nb = run_notebook("dual_writes.ipynb", kernel, tmp_path, trials=2)
    expected = s["writers"] * s["updates"]
    assert s["dual_writes"] == [2 * expected] * 2  # every dual write succeeded ...
    assert sum(s["dual_diverged_keys"]) > 0  # ... and still the stores disagree
    assert s["race"] is not None and s["race"]["final_A"] != s["race"]["final_B"]
    assert s["log_writes"] == [expected] * 2
    assert s["log_applied"] == [{"A": expected, "B": expected}] * 2
    assert s["log_diverged_keys"] == [0, 0] and s["log_stores_equal_log_order"]
    # the database as the system of record: dual-written to Kafka it diverges, captured (CDC) it does not
    assert s["cdc_change_events"] == [s["keys"] + expected] * 2  # the snapshot's reads, one change per update
    assert sum(s["pg_dual_diverged_keys"]) > 0
    assert s["cdc_diverged_keys"] == [0, 0] and s["cdc_equals_db"]
    for pid, what in ((s["pg_pid"], "PostgreSQL"), (s["connect_pid"], "Kafka Connect")):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, f"{what} left"
    assert _figures(nb) >= 2


def test_broker_dies_with_a_killed_kernel(kernel, tmp_path):
    """kill -9 of the kernel right after a notebook started its broker: the broker goes too (no orphan)."""
    from jupyter_client.manager import start_new_kernel

    nb = nbformat.read(NOTEBOOKS / "dual_writes.ipynb", as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    start = next(i for i, src in enumerate(code) if "broker.up(" in src)
    km, kc = start_new_kernel(kernel_name=kernel, cwd=str(NOTEBOOKS))
    out: list[str] = []

    def hook(msg) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append(f"ERROR {msg['content']['ename']}: {msg['content']['evalue']}")

    broker_pid = None
    try:
        for src in code[:start + 1]:
            reply = kc.execute_interactive(src, timeout=300, output_hook=hook)
            assert reply["content"]["status"] == "ok", "".join(out)
        kc.execute_interactive("print('PIDS', __import__('os').getpid(), BROKER_PID)", timeout=30,
                               output_hook=hook)
        line = next(x for x in "".join(out).splitlines() if x.startswith("PIDS"))
        kernel_pid, broker_pid = (int(v) for v in line.split()[1:])
        assert psutil.Process(broker_pid).is_running()
        os.kill(kernel_pid, signal.SIGKILL)
        _assert_gone(broker_pid, "the broker of a killed kernel")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        if broker_pid is not None and psutil.pid_exists(broker_pid):  # never leave it behind, even on failure
            try:
                psutil.Process(broker_pid).kill()
            except psutil.Error:
                pass
        work = next((x.rsplit("work directory ", 1)[1].strip() for x in "".join(out).splitlines()
                     if "work directory " in x), None)
        if work and Path(work).name.startswith("dual-writes-"):
            shutil.rmtree(work, ignore_errors=True)  # the killed kernel could not clean up after itself
