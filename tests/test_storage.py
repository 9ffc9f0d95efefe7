"""The storage seam's contract, the same on both backends (a local directory and the real S3 server the project
starts), and the race gate the lake's protocols rely on: of N concurrent put-if-absent of one key, and of N
concurrent compare-and-swaps from one version of a pointer, exactly one wins — every time."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from lambdalake.exceptions import ConfigError
from lambdalake.storage import ObjectMissing, check_key, join, open_store
from lambdalake.storage.local import TEMP_PREFIX, LocalStore

RACERS = 16
ROUNDS = {"LocalStore": 10, "S3Store": 3}  # the S3 server resolves contended conditional writes in ~1-9 s each


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "lake")
    return request.getfixturevalue("s3_store")


def test_put_get_and_overwrite(store):
    etag = store.put("views/batch/CURRENT", b"v1")
    assert store.get("views/batch/CURRENT") == b"v1"
    got = store.get_versioned("views/batch/CURRENT")
    assert (got.data, got.etag) == (b"v1", etag)
    etag2 = store.put("views/batch/CURRENT", b"v2")
    assert etag2 != etag and store.get("views/batch/CURRENT") == b"v2"
    assert store.exists("views/batch/CURRENT") and store.size("views/batch/CURRENT") == 2
    assert store.get_versioned("views/batch/CURRENT").etag == etag2


def test_a_missing_object_is_one_named_error(store):
    with pytest.raises(ObjectMissing, match="nope"):
        store.get("master/nope")
    with pytest.raises(ObjectMissing):
        store.get_versioned("master/nope")
    with pytest.raises(ObjectMissing):
        store.size("master/nope")
    assert not store.exists("master/nope")


def test_put_if_absent_creates_once_and_never_overwrites(store):
    assert store.put_if_absent("master/s/p0/0-100.parquet", b"first") is not None
    assert store.put_if_absent("master/s/p0/0-100.parquet", b"second") is None
    assert store.get("master/s/p0/0-100.parquet") == b"first"


def test_swap_replaces_only_the_version_read(store):
    assert store.swap("heads/s/0", b"epoch 1", expected=None) is not None  # create-only
    assert store.swap("heads/s/0", b"epoch 1 again", expected=None) is None  # exists: refused
    v1 = store.get_versioned("heads/s/0")
    v2 = store.swap("heads/s/0", b"epoch 2", expected=v1.etag)
    assert v2 is not None and store.get("heads/s/0") == b"epoch 2"
    assert store.swap("heads/s/0", b"stale writer", expected=v1.etag) is None  # read an older version: loses
    assert store.get("heads/s/0") == b"epoch 2"
    assert store.swap("heads/s/1", b"x", expected=v1.etag) is None  # nothing there to match


def test_list_and_delete(store):
    for key in ("views/speed/w0/000001/a.parquet", "views/speed/w0/000001/snapshot.json", "views/speed/w1/x",
                "views/batch/CURRENT", "views/speedy"):
        store.put(key, b"x")
    assert store.list("views/speed/") == ["views/speed/w0/000001/a.parquet", "views/speed/w0/000001/snapshot.json",
                                          "views/speed/w1/x"]
    assert store.list("views/speed/w0/") == ["views/speed/w0/000001/a.parquet", "views/speed/w0/000001/snapshot.json"]
    assert len(store.list()) == 5 and store.list("nothing/") == []
    assert store.children("views/speed/") == ["w0", "w1"] and store.children("views/") == ["batch", "speed",
                                                                                          "speedy"]
    assert store.children("views/speed/w0/000001/") == ["a.parquet", "snapshot.json"]
    assert store.children("nothing/") == []
    store.delete("views/speed/w1/x")
    store.delete("views/speed/w1/x")  # idempotent
    assert store.list("views/speed/w1/") == []


def test_modified_is_the_last_write_in_epoch_seconds(store):
    import time

    before = time.time()
    store.put("master/s/p=0/a.parquet", b"x")
    first = store.modified("master/s/p=0/a.parquet")
    assert before - 5 <= first <= time.time() + 5  # S3 stamps whole seconds, with the server's clock
    time.sleep(1.1)
    store.put("master/s/p=0/a.parquet", b"y")  # a rewrite is a new write
    assert store.modified("master/s/p=0/a.parquet") > first
    with pytest.raises(ObjectMissing):
        store.modified("master/s/p=0/nope.parquet")
    with pytest.raises(ObjectMissing):
        store.modified("master/s/p=0")  # a prefix is not an object


def _race(fn, n: int) -> list:
    barrier = threading.Barrier(n)

    def run(i: int):
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_race_gate_put_if_absent_has_exactly_one_winner(store):
    for r in range(ROUNDS[type(store).__name__]):
        key = f"master/race/p0/{r}.parquet"
        won = _race(lambda i, key=key: store.put_if_absent(key, f"writer {i}".encode()), RACERS)
        winners = [i for i, etag in enumerate(won) if etag is not None]
        assert len(winners) == 1, f"round {r}: {len(winners)} of {RACERS} conditional creates won"
        assert store.get(key) == f"writer {winners[0]}".encode()


def test_race_gate_swap_has_exactly_one_winner(store):
    key = "heads/race/0"
    store.put(key, b"generation 0")
    for r in range(ROUNDS[type(store).__name__]):
        read = store.get_versioned(key)
        won = _race(lambda i, read=read, r=r: store.swap(key, f"generation {r + 1} by {i}".encode(), read.etag),
                    RACERS)
        winners = [i for i, etag in enumerate(won) if etag is not None]
        assert len(winners) == 1, f"round {r}: {len(winners)} of {RACERS} swaps from one version won"
        assert store.get(key) == f"generation {r + 1} by {winners[0]}".encode()


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", "a/b/", "a b", "a/\n"])
def test_bad_keys_are_refused(key):
    with pytest.raises(ConfigError, match="not a lake key"):
        check_key(key)


def test_join_and_open_store(tmp_path):
    assert join("master", "src/p0", "0-1.parquet") == "master/src/p0/0-1.parquet"
    assert isinstance(open_store(tmp_path), LocalStore)
    assert open_store(tmp_path.as_uri()).root == tmp_path.resolve()
    with pytest.raises(ConfigError, match="no storage backend for gs://"):
        open_store("gs://bucket/lake")


def test_local_writes_leave_no_temporary_file_and_crashed_ones_are_ignored_then_removed(tmp_path):
    store = LocalStore(tmp_path / "lake")
    store.put("a/b", b"1")
    store.put_if_absent("a/c", b"2")
    store.put_if_absent("a/c", b"3")
    store.swap("a/d", b"4", expected=None)
    names = sorted(p.name for p in (tmp_path / "lake" / "a").iterdir())
    assert [n for n in names if n.startswith(TEMP_PREFIX)] == []
    crashed = tmp_path / "lake" / "a" / f"{TEMP_PREFIX}dead-b"  # a writer killed between its steps 1 and 2
    crashed.write_bytes(b"partial")
    assert store.list("a/") == ["a/b", "a/c", "a/d"]
    assert store.remove_stale_temps("a/") == 0  # young: may belong to a live writer
    os.utime(crashed, (0, 0))
    assert store.remove_stale_temps("a/") == 1 and not crashed.exists()
