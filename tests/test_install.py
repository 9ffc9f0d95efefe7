"""The virtualenv is ONE clean install: no distribution overwrote another's files.

Guards against the mixed install of issue 27: the Airflow Spark provider 6.x depends on ``pyspark-client``, which
ships the same ``pyspark/`` package as ``pyspark``; installing both overwrote ~100 Python files of pyspark 4.3.0
with pyspark-client 4.2.0's, so ``pyspark.__version__`` said 4.2.0 while the jars were 4.3.0 — and ``pip check``
saw nothing wrong. Each check reads only the installed files (a few seconds, all of them hashed).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import re
import subprocess
import sys
import sysconfig
from collections import defaultdict
from pathlib import Path

import pytest


def site_dirs() -> list[str]:
    """The interpreter's own site-packages (not the repo's ``*.egg-info`` that pytest's sys.path also shows)."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def installed() -> list[md.Distribution]:
    return list(md.distributions(path=site_dirs()))


def record_hash(path: Path, algorithm: str) -> str:
    """A file's hash as a wheel's RECORD writes it: urlsafe base64 without padding."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def summarize(problems: dict[str, list[str]], limit: int = 5) -> str:
    return "\n".join(f"{dist}: {len(files)} file(s), e.g. {', '.join(files[:limit])}"
                     for dist, files in sorted(problems.items()))


def test_pyspark_python_matches_its_jars():
    """pyspark's Python code, its metadata and the Spark jars it ships are one Spark version."""
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    cores = [m.group(1) for p in jars.glob("spark-core_*.jar")
             if (m := re.fullmatch(r"spark-core_[\d.]+-(.+)\.jar", p.name))]
    assert len(cores) == 1, f"expected one spark-core jar in {jars}, found {cores}"
    assert (pyspark.__version__, md.version("pyspark")) == (cores[0], cores[0]), (
        f"pyspark.__version__ {pyspark.__version__}, pyspark distribution {md.version('pyspark')}, "
        f"jars {cores[0]}: another distribution (pyspark-client?) overwrote pyspark's files")


def test_installed_files_match_their_record():
    """Every installed file that a RECORD hashes still has that hash (bytecode caches aside)."""
    changed: dict[str, list[str]] = defaultdict(list)
    checked = 0
    for dist in installed():
        name = dist.metadata["Name"]
        for f in dist.files or ():
            if f.hash is None or "__pycache__" in f.parts or f.name.endswith(".pyc"):
                continue
            path = Path(dist.locate_file(f))
            try:
                ok = record_hash(path, f.hash.mode) == f.hash.value
            except FileNotFoundError:
                ok = False
            checked += 1
            if not ok:
                changed[f"{name} {dist.version}"].append(str(f))
    assert checked > 1000, f"only {checked} hashed files found in {site_dirs()}: is this a virtualenv?"
    assert not changed, "installed files differ from (or are missing from) their RECORD:\n" + summarize(changed)


def test_no_file_belongs_to_two_distributions():
    """No two distributions install the same file (same-version overwrites pass the hash check but not this)."""
    owners: dict[Path, set[str]] = defaultdict(set)
    names: dict[str, list[str]] = defaultdict(list)
    for dist in installed():
        name = dist.metadata["Name"]
        names[re.sub(r"[-_.]+", "-", name).lower()].append(f"{name} {dist.version}")
        for f in dist.files or ():
            if "__pycache__" not in f.parts and not f.name.endswith(".pyc"):
                owners[Path(dist.locate_file(f)).resolve()].add(name)
    twice = {n: v for n, v in names.items() if len(v) > 1}
    assert not twice, f"distributions installed more than once: {twice}"
    shared: dict[str, list[str]] = defaultdict(list)
    for path, dists in owners.items():
        if len(dists) > 1:
            shared[" + ".join(sorted(dists))].append(str(path))
    assert not shared, "files installed by more than one distribution:\n" + summarize(shared)


@pytest.mark.timeout(120)
def test_pip_check():
    res = subprocess.run([sys.executable, "-m", "pip", "check", "--disable-pip-version-check"],
                         capture_output=True, text=True, timeout=100)
    assert res.returncode == 0, res.stdout + res.stderr


def test_airflow_is_an_optional_extra_with_a_clear_message_when_missing(tmp_path):
    """Without the `airflow` extra, `lambdalake airflow` says how to install it (one line, no traceback)."""
    script = ("import sys; sys.modules['airflow'] = None\n"
              "from wiring.cli import main\n"
              "sys.exit(main(['airflow', '--home', sys.argv[1]]))\n")
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "lake")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0
    assert "pip install 'lambdalake[airflow]'" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    deps = md.requires("lambdalake")
    assert not any(r.startswith("apache-airflow") and "extra ==" not in r for r in deps), deps
