"""Run ``airflow standalone`` (API server + UI, scheduler, DAG processor, triggerer) and stop all of it cleanly.

Lifecycle (:class:`AirflowStandalone`):

1. Start ``airflow standalone`` in a new session (its own process group), tied to this process with
   ``PR_SET_PDEATHSIG``, so a terminal's Ctrl-C reaches only us and a killed launcher takes Airflow with it.
2. Wait until the API server answers ``/api/v2/monitor/health`` with a healthy scheduler and DAG processor.
3. On :meth:`stop` (Ctrl-C, SIGTERM, end of a test): SIGINT to ``airflow standalone`` (it shuts its components
   down), then SIGTERM and finally SIGKILL to the whole process group and to every descendant recorded while it
   ran (task runners, ``spark-submit`` and its JVM may live in other groups), so no orphan is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import psutil

from lambdalake.exceptions import LambdalakeError
from lambdalake.procs import new_session_tied_to_parent


class AirflowStartError(LambdalakeError):
    """``airflow standalone`` exited or did not become healthy in time."""

    exit_code = 8


def airflow_bin() -> str:
    """The ``airflow`` executable of this virtualenv."""
    candidate = Path(sys.executable).parent / "airflow"
    return str(candidate) if candidate.exists() else "airflow"


class AirflowStandalone:
    """One ``airflow standalone`` process tree (see the module docstring)."""

    def __init__(self, env: Mapping[str, str], *, port: int, log: IO[str] | Path | None = None):
        self.env = dict(env)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self._log_target = log
        self._log_fh: IO | None = None
        self._seen: dict[int, psutil.Process] = {}

    # 1. start ---------------------------------------------------------------------------------------------------
    def start(self) -> AirflowStandalone:
        out: IO | int | None = None
        if isinstance(self._log_target, Path):
            self._log_target.parent.mkdir(parents=True, exist_ok=True)
            self._log_fh = out = open(self._log_target, "ab")  # noqa: SIM115 - closed in stop()
        elif self._log_target is not None:
            out = self._log_target
        Path(self.env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([airflow_bin(), "standalone"], env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT if out is not None else None,
                                     preexec_fn=new_session_tied_to_parent)
        self._remember_children()
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def _remember_children(self) -> None:
        if self.proc is None:
            return
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                self._seen.setdefault(p.pid, p)
        except psutil.Error:
            pass

    # 2. wait until healthy --------------------------------------------------------------------------------------
    def health(self) -> dict | None:
        """The API server's health document, or None if it does not answer yet."""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=5) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError, urllib.error.URLError):
            return None

    def wait_healthy(self, timeout: float = 300.0) -> dict:
        """Block until scheduler and DAG processor report healthy; raise :class:`AirflowStartError` otherwise."""
        deadline = time.monotonic() + timeout
        last: dict | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise AirflowStartError(f"airflow standalone exited with code {self.proc and self.proc.returncode} "
                                        f"before it became healthy; see its output (AIRFLOW_HOME "
                                        f"{self.env['AIRFLOW_HOME']})")
            self._remember_children()
            last = self.health()
            if last and all((last.get(c) or {}).get("status") == "healthy"
                            for c in ("metadatabase", "scheduler", "dag_processor")):
                return last
            time.sleep(1.0)
        raise AirflowStartError(f"Airflow at {self.url} was not healthy within {timeout:.0f}s (last health: {last})")

    def wait(self) -> int:
        """Wait for ``airflow standalone`` to exit on its own; returns its exit code."""
        assert self.proc is not None
        while True:
            try:
                return self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._remember_children()

    # 3. stop ----------------------------------------------------------------------------------------------------
    def stop(self, grace: float = 45.0) -> list[int]:
        """Stop everything this instance started (idempotent). Returns the pids that had to be killed."""
        killed: list[int] = []
        if self.proc is None:
            return killed
        self._remember_children()
        pgid = self.proc.pid  # setsid: the group id is the leader's pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            alive = self._alive(pgid)
            if not alive:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
                    if sig == signal.SIGKILL:
                        killed.append(p.pid)
            psutil.wait_procs(alive, timeout=wait_s)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        return killed

    def _alive(self, pgid: int) -> list[psutil.Process]:
        alive = []
        for p in self._seen.values():
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.pid not in self._seen and os.getpgid(p.pid) == pgid and p.pid != os.getpid():
                    alive.append(p)
        return alive

    def leftovers(self) -> list[int]:
        """Pids of processes this instance started that are still running (empty after :meth:`stop`)."""
        if self.proc is None:
            return []
        return [p.pid for p in self._alive(self.proc.pid)]

    def __enter__(self) -> AirflowStandalone:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
