"""The Airflow UI in a real browser: ``lambdalake airflow`` (what ``make airflow`` runs) on a free port, a
``lambdalake_batch`` run triggered through the REST API and executed by the scheduler (LocalExecutor, spark-submit
on ``local[*]``, real broker), the Asset-triggered downstream DAG, then headless Chromium logs in through the login
form and must show the DAG list with ``lambdalake_batch`` and its successful run. Screenshots go to
``.cache/screenshots/`` (git-ignored). Ctrl-C (SIGINT) on the launcher must leave no Airflow process behind.

Chromium is Debian's ``chromium`` package (``make chromium`` installs it when missing; no browser download from the
web). It is driven through the Chrome DevTools Protocol over ``--remote-debugging-pipe`` (fds 3/4), so no driver
or extra Python package is needed.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from lambdalake.embedded import free_port
from lambdalake.layout import Layout, current_batch_manifest

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / ".cache" / "screenshots"
LAMBDALAKE = str(Path(sys.executable).parent / "lambdalake")


# --- the browser ---------------------------------------------------------------------------------------------------
def chromium_binary() -> str:
    """Debian's chromium, installed with ``make chromium`` if it is missing (needs root or sudo)."""
    found = shutil.which("chromium")
    if found is None:
        res = subprocess.run(["make", "-s", "chromium"], cwd=REPO, capture_output=True, text=True, timeout=1200)
        found = shutil.which("chromium")
        assert found, f"`make chromium` did not install chromium:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return found


def _tie_to_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class HeadlessChromium:
    """Headless Chromium with a fresh profile, driven by CDP messages (NUL-separated JSON) over fds 3 and 4."""

    def __init__(self, binary: str, width: int = 1440, height: int = 900):
        self.profile = tempfile.mkdtemp(prefix="lambdalake-chromium-")
        cmd_r, self._cmd_w = os.pipe()  # we write commands, chromium reads fd 3
        self._resp_r, resp_w = os.pipe()  # chromium writes fd 4, we read responses

        def child() -> None:
            _tie_to_parent()
            a, b = os.dup(cmd_r), os.dup(resp_w)  # out of the way of 3/4 before dup2
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={self.profile}", "--remote-debugging-pipe", f"--window-size={width},{height}",
             "about:blank"],
            preexec_fn=child, pass_fds=(3, 4), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(resp_w)
        self._buf = b""
        self._id = 0
        self.session: str | None = None
        targets = self.send("Target.getTargets", browser=True)["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True},
                                 browser=True)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            if select.select([self._resp_r], [], [], left)[0]:
                chunk = os.read(self._resp_r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the DevTools pipe (exit code {self.proc.poll()})")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, *, browser: bool = False, timeout: float = 60) -> dict:
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params or {}}
        if not browser and self.session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            resp = self._message(deadline)
            if resp.get("id") == self._id:
                if "error" in resp:
                    raise RuntimeError(f"{method}: {resp['error']}")
                return resp.get("result", {})

    def eval(self, expression: str):
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"JavaScript error in {expression!r}: {res['exceptionDetails'].get('exception')}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90) -> object:
        """Poll a JavaScript expression until it is truthy (pages are rendered client-side)."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                value = self.eval(expression)
                if value:
                    return value
            except RuntimeError as exc:  # the page is navigating: its context went away
                last_error = exc
            time.sleep(0.5)
        raise TimeoutError(f"{expression!r} never became true (last error {last_error}); page text:\n"
                           f"{self.text()[:2000]}")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def text(self) -> str:
        with contextlib.suppress(RuntimeError):
            return self.eval("document.body ? document.body.innerText : ''") or ""
        return ""

    def type_into(self, selector: str, text: str) -> None:
        """Focus an input and type into it like a user (React sees real input events)."""
        self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", {"text": text})

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"]))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", browser=True, timeout=5)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        for fd in (self._cmd_w, self._resp_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)


# --- the Airflow REST API ------------------------------------------------------------------------------------------
class AirflowApi:
    def __init__(self, base: str, user: str, password: str):
        self.base = base
        body = json.dumps({"username": user, "password": password}).encode()
        req = urllib.request.Request(f"{base}/auth/token", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            self.token = json.loads(resp.read())["access_token"]

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(f"{self.base}/api/v2{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def wait_for_dag(self, dag_id: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.call("GET", f"/dags/{dag_id}")
                return
            except urllib.error.HTTPError as exc:
                if exc.code != 404 or time.monotonic() > deadline:
                    raise
            time.sleep(2)

    def wait_for_run(self, dag_id: str, run_id: str | None = None, timeout: float = 1200) -> dict:
        """The run (or the first run of the DAG) once it finished; fails with the task states if it failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if run_id is None:
                runs = self.call("GET", f"/dags/{dag_id}/dagRuns")["dag_runs"]
                run = runs[0] if runs else None
            else:
                run = self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
            if run and run["state"] in ("success", "failed"):
                if run["state"] == "failed":
                    tis = self.call("GET", f"/dags/{dag_id}/dagRuns/{run['dag_run_id']}/taskInstances")
                    raise AssertionError(f"{dag_id} run {run['dag_run_id']} failed: "
                                         f"{[(t['task_id'], t['state']) for t in tis['task_instances']]}")
                return run
            time.sleep(3)
        raise AssertionError(f"{dag_id} run {run_id} did not finish within {timeout:.0f}s")


# --- the launcher --------------------------------------------------------------------------------------------------
def start_launcher(env: dict, port: int, airflow_home: Path, out: Path) -> subprocess.Popen:
    fh = open(out, "w")  # noqa: SIM115 - the child owns it; closed when the test ends
    return subprocess.Popen([LAMBDALAKE, "airflow", "--port", str(port), "--airflow-home", str(airflow_home)],
                            env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                            preexec_fn=_tie_to_parent)


def wait_for_banner(launcher: subprocess.Popen, out: Path, timeout: float = 600) -> tuple[str, str, str]:
    """(UI address, user, password) from the launcher's "Airflow is up" line."""
    deadline = time.monotonic() + timeout
    banner = re.compile(r"Airflow is up: (http://\S+)\s+\(login (\S+) / (\S+?);")
    while time.monotonic() < deadline:
        m = banner.search(out.read_text())
        if m:
            return m.group(1), m.group(2), m.group(3)
        assert launcher.poll() is None, f"lambdalake airflow exited {launcher.returncode}:\n{out.read_text()}"
        time.sleep(1)
    raise AssertionError(f"no 'Airflow is up' line within {timeout:.0f}s:\n{out.read_text()}")


def processes_using(airflow_home: Path) -> list[psutil.Process]:
    """Live processes whose environment has this AIRFLOW_HOME (everything the launcher started)."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get("AIRFLOW_HOME") == str(airflow_home) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def stop_launcher(launcher: subprocess.Popen, airflow_home: Path) -> list[psutil.Process]:
    """SIGINT (Ctrl-C) to the launcher; returns what was still alive afterwards (then killed, never leaked)."""
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGINT)
        try:
            launcher.wait(timeout=120)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait(timeout=30)
    left = processes_using(airflow_home)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return left


# --- the test ------------------------------------------------------------------------------------------------------
def test_ui_shows_lambdalake_batch_and_its_successful_run(settings, pipeline, run_cli, cli_env, tmp_path):
    chromium = chromium_binary()
    run_cli("produce", "--events", "600", "--seed", "5")
    airflow_home = (tmp_path / "airflow-home").resolve()
    port = free_port()
    # no schedule: unpausing an hourly DAG would also start the latest scheduled run at once
    env = {**cli_env, "LAMBDALAKE_SPARK_SHUFFLE_PARTITIONS": "4", "AIRFLOW__CORE__PARALLELISM": "2",
           "LAMBDALAKE_BATCH_SCHEDULE": "none"}
    out = tmp_path / "launcher.out"
    launcher = start_launcher(env, port, airflow_home, out)
    browser: HeadlessChromium | None = None
    try:
        ui, user, password = wait_for_banner(launcher, out)
        assert ui == f"http://localhost:{port}" and user == "admin" and password

        # a real scheduled execution: unpause, trigger through the REST API, wait for success
        api = AirflowApi(ui, user, password)
        for dag_id in ("lambdalake_batch", "lambdalake_views_consumer"):
            api.wait_for_dag(dag_id)
            api.call("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        run = api.call("POST", "/dags/lambdalake_batch/dagRuns", {"logical_date": None})
        run = api.wait_for_run("lambdalake_batch", run["dag_run_id"])
        manifest = current_batch_manifest(Layout(settings.home))
        assert manifest is not None and manifest.version == "v000001"
        events = [e for e in api.call("GET", "/assets/events")["asset_events"]
                  if e.get("source_dag_id") == "lambdalake_batch"]
        assert [e["extra"].get("version") for e in events] == ["v000001"], events
        consumer = api.wait_for_run("lambdalake_views_consumer", timeout=600)  # triggered by the Asset event
        assert consumer["run_type"] == "asset_triggered"

        # the browser: log in through the form, then the DAG list and the run list
        browser = HeadlessChromium(chromium)
        browser.goto(f"{ui}/")
        browser.wait_for("!!document.querySelector('input[name=username]')")
        shot_login = browser.screenshot(SCREENSHOTS / "airflow-login.png")
        browser.type_into("input[name=username]", user)
        browser.type_into("input[name=password]", password)
        browser.eval("document.querySelector('button[type=submit]').click()")
        browser.wait_for("!location.pathname.startsWith('/auth/login')")

        browser.goto(f"{ui}/dags")
        browser.wait_for("document.body && document.body.innerText.includes('lambdalake_batch')"
                         " && document.body.innerText.includes('Latest Run')")
        time.sleep(2)  # let the run bars finish rendering for the screenshot
        dag_list = browser.text()
        shot_dags = browser.screenshot(SCREENSHOTS / "airflow-dags.png")
        for dag_id in ("lambdalake_batch", "lambdalake_maintenance", "lambdalake_views_consumer"):
            assert dag_id in dag_list
        run_after = run["run_after"][:19].replace("T", " ")
        assert run_after in dag_list, f"latest run {run_after} of lambdalake_batch not listed:\n{dag_list}"
        assert "Failed" not in dag_list

        # the DAG list filtered on "Last run: success" (the UI's own filter, from the URL) shows lambdalake_batch
        # but not lambdalake_maintenance, which never ran
        browser.goto(f"{ui}/dags?last_dag_run_state=success")
        browser.wait_for("document.body && document.body.innerText.includes('lambdalake_batch')"
                         " && !document.body.innerText.includes('lambdalake_maintenance')")
        time.sleep(2)
        shot_success = browser.screenshot(SCREENSHOTS / "airflow-dags-last-run-success.png")

        browser.goto(f"{ui}/dags/lambdalake_batch/runs")
        browser.wait_for(f"document.body && document.body.innerText.includes({json.dumps(run['dag_run_id'])})")
        browser.wait_for("[...document.querySelectorAll('[data-testid=state-badge]')]"
                         ".some(e => e.innerText.trim() === 'Success')")
        runs_page = browser.text()
        shot_runs = browser.screenshot(SCREENSHOTS / "airflow-lambdalake_batch-runs.png")
        assert "Success" in runs_page and "Failed" not in runs_page
        for shot in (shot_login, shot_dags, shot_success, shot_runs):
            assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        if browser is not None:
            browser.close()
        left = stop_launcher(launcher, airflow_home)
    assert not left, f"processes left running after Ctrl-C: {[(p.pid, p.name()) for p in left]}"
    assert "Airflow stopped (no process left)" in out.read_text()
