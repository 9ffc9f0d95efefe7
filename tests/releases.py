"""Earlier releases of lambdalake, extracted from git and run as their users ran them (the upgrade tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def extract(commit: str, into: Path) -> Path:
    """The tree of ``commit`` under ``into`` (skips the test when the history lacks it, e.g. a shallow clone)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, timeout=120)
    if archive.returncode != 0:
        pytest.skip(f"git history without {commit} (shallow clone?): {archive.stderr.decode()[:200]}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True, timeout=120)
    return into


def run_cli(tree: Path, cli_module: str, env: dict, *args: str) -> None:
    """``lambdalake <args>`` of the release in ``tree`` (``cli_module``: where its ``main`` is); cwd and
    PYTHONPATH are the old tree, so its packages shadow this checkout's editable install."""
    res = subprocess.run([sys.executable, "-c", f"import sys; from {cli_module} import main; "
                          "sys.exit(main(sys.argv[1:]))", *args], cwd=tree, env={**env, "PYTHONPATH": str(tree)},
                         capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"release in {tree}: lambdalake {' '.join(args)}\n{res.stdout}\n{res.stderr}"
