"""The lifecycle every server the project starts itself shares (the Kafka broker, the S3 server): a directory
holding its pid file, its state file and its output, a start that waits until the server answers, a stop, a status.

- start: the server runs in its own session — tied to the starting process (tests, the demo: it dies with it,
  :func:`lambdalake.procs.new_session_tied_to_parent`) or detached (``lambdalake kafka up`` / ``s3 up``); its pid is
  written at once, and the start waits until ``ready()`` holds, failing with the last lines of its logs if the
  server exits or stays silent;
- the state file (pid, address, ports) is written only once the server answers, atomically;
- a pid counts as the server only while the process is alive and its command line is the server's (a recycled
  pid is not ours);
- stop: ``stop_signal`` (SIGTERM), then SIGKILL after a timeout;
- ``user``: a server that must not run as root (PostgreSQL) is started as that user, its tie to the owner set
  after the switch (a change of user clears it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from pathlib import Path

import psutil

from lambdalake.exceptions import LambdalakeError
from lambdalake.layout import atomic_write_bytes
from lambdalake.procs import new_session_tied_to_parent

log = logging.getLogger(__name__)


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class EmbeddedServer:
    """Base of a server living in ``self.dir``; subclasses name their files and say how to recognise and start
    themselves. ``error`` is the error class of the server's failures (one actionable line)."""

    name = "server"
    error: type[LambdalakeError] = LambdalakeError
    tied_to_parent = False
    death_signal = signal.SIGTERM  # what a tied server gets when its owner dies
    stop_signal = signal.SIGTERM  # what :meth:`stop` sends first
    dir: Path

    # files (named by the subclass) ----------------------------------------------------------------------------
    @property
    def pid_file(self) -> Path:
        raise NotImplementedError

    @property
    def state_file(self) -> Path:
        raise NotImplementedError

    def log_files(self) -> Iterable[Path]:
        """The files whose last lines explain a failed start."""
        raise NotImplementedError

    def is_ours(self, cmdline: list[str]) -> bool:
        """Whether a process with this command line is this server."""
        raise NotImplementedError

    # lifecycle --------------------------------------------------------------------------------------------
    def running_pid(self) -> int | None:
        """The server's pid if our server process is alive (checks the command line, not just the pid)."""
        try:
            pid = int(self.pid_file.read_text().strip())
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            cmd = proc.cmdline()
        except (OSError, ValueError, psutil.Error):
            return None
        return pid if self.is_ours(cmd) else None

    def start(self, cmd: list[str], *, out: Path, ready: Callable[[], bool], state: Callable[[int], dict],
              timeout: float, what: str, env: dict[str, str] | None = None,
              user: tuple[int, int] | None = None) -> dict:
        """Start ``cmd`` in ``self.dir`` (as ``user``, a (uid, gid) pair, if given) and wait until ``ready()``;
        then write ``state(pid)`` as the state file and return it. ``what`` names the address waited for in the
        error."""
        as_user = {"user": user[0], "group": user[1], "extra_groups": []} if user else {}
        preexec = (functools.partial(new_session_tied_to_parent, self.death_signal) if self.tied_to_parent
                   else os.setsid)  # runs after Popen's switch of user
        with open(out, "ab") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.dir, env=env, preexec_fn=preexec, **as_user)
        self.pid_file.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise self.error(f"{self.name} exited with code {proc.returncode} during start-up; last log "
                                 f"lines:\n{self.tail()}")
            if ready():
                doc = state(proc.pid)
                atomic_write_bytes(self.state_file, json.dumps(doc, indent=1).encode())
                return doc
            time.sleep(0.25)
        self.stop_pid(proc.pid, timeout=10)
        self.pid_file.unlink(missing_ok=True)
        raise self.error(f"{self.name} did not answer on {what} within {timeout:.0f}s; last log lines:\n"
                         f"{self.tail()}")

    def stop(self, timeout: float) -> int | None:
        """Stop the server if it runs (``stop_signal``, then SIGKILL after ``timeout``) and forget its pid and state;
        the pid it had, or None."""
        pid = self.running_pid()
        if pid is not None:
            self.stop_pid(pid, timeout)
        self.pid_file.unlink(missing_ok=True)
        self.state_file.unlink(missing_ok=True)
        return pid

    def status(self) -> dict:
        """The state file's content with ``running``, ``pid``, ``dir`` and, while running, ``serving`` (its port
        accepts connections)."""
        pid = self.running_pid()
        state: dict = {}
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(self.state_file.read_text())
        state.update({"running": pid is not None, "pid": pid, "dir": str(self.dir)})
        if pid is not None and "port" in state:
            state["serving"] = port_open("127.0.0.1", int(state["port"]))
        return state

    def stop_pid(self, pid: int, timeout: float) -> None:
        try:
            proc = psutil.Process(pid)
            proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout)
            except psutil.TimeoutExpired:
                log.warning("%s pid %s did not stop within %.0fs; killing it", self.name, pid, timeout)
                proc.kill()
                proc.wait(10)
        except psutil.NoSuchProcess:
            pass

    def tail(self, lines: int = 15) -> str:
        chunks: list[str] = []
        for f in self.log_files():
            with contextlib.suppress(OSError):
                chunks.extend(f.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(line for line in chunks[-lines:] if line.strip()) or "(no log output)"


def log4j2_file_config(log_file: Path, loggers: dict[str, str]) -> str:
    """A log4j2 properties file for an embedded JVM server: INFO and up to ``log_file``, plus ``loggers``
    (logger name -> level)."""
    lines = ["status = warn", "appender.file.type = File", "appender.file.name = file",
             f"appender.file.fileName = {log_file}", "appender.file.layout.type = PatternLayout",
             "appender.file.layout.pattern = [%d] %p %m (%c)%n", "rootLogger.level = INFO",
             "rootLogger.appenderRef.file.ref = file"]
    for i, (name, level) in enumerate(loggers.items()):
        lines += [f"logger.l{i}.name = {name}", f"logger.l{i}.level = {level}"]
    return "\n".join([*lines, ""])
