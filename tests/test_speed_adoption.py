"""A group member takes a partition over with its previous owner's state (speed.adoption; issue 29, "from the
previous owner's last committed checkpoint"): it continues at that worker's position instead of re-reading the log
from the batch watermark, and serving stays exact; with ``LAMBDALAKE_SPEED_ADOPT=0`` it starts from the watermark.
Real broker, members in-process (kafka-python group membership), each under its own name."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from lambdalake.clients import end_offsets
from lambdalake.exceptions import BrokerError
from lambdalake.layout import Layout
from lambdalake.speedset import read_speed_set
from speed.consumer import SpeedLayer, SpeedOptions
from speed.rebuild import replay_start
from tests.test_speed import produce, topics
from tests.test_speed_workers import served_equals_oracle

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _serve_alone(settings, pipeline, name: str, timeout: float = 90.0) -> SpeedLayer:
    """Member ``name`` runs until it alone serves every partition up to the log end; then it stops (a final
    checkpoint; it leaves the group). A member caught in kafka-python's lost-coordinator hang (its GroupWatch gives up
    after 30 s) is started again under the same name, as the ``lambdalake speed`` command restarts itself."""
    for attempt in range(3):
        try:
            return _serve_alone_once(settings, pipeline, name, timeout)
        except _Hung:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class _Hung(AssertionError):
    pass


def _serve_alone_once(settings, pipeline, name: str, timeout: float) -> SpeedLayer:
    layer = SpeedLayer(settings, pipeline, SpeedOptions(group=True, worker_name=name, checkpoint_interval=0.05))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            layer.run()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def check() -> None:
        if errors and all(isinstance(e, BrokerError) and "known kafka-python hang" in str(e) for e in errors):
            raise _Hung(errors)
        assert not errors, errors

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ends = end_offsets(settings, topics(pipeline))
    deadline = time.monotonic() + timeout
    found = None
    try:
        while True:
            check()
            found = read_speed_set(Layout(settings.home))
            if found is not None and {w for p in found.parts for w in [p.worker] if p.partitions} == {name} \
                    and all(found.meta.positions.get(k, 0) >= e for k, e in ends.items()):
                return layer
            assert time.monotonic() < deadline, (f"{name} did not serve everything up to {ends} within {timeout}s: "
                                                 f"{found and [(p.worker, p.partitions) for p in found.parts]}, "
                                                 f"{found and dict(found.meta.positions)}")
            time.sleep(0.2)
    finally:
        layer.stop()
        thread.join(60)
        check()
        assert not thread.is_alive(), f"{name} did not stop within 60 s of being asked to"


def test_a_member_continues_at_the_previous_owners_position(settings, pipeline, run_cli, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="speed.group")
    produce(settings, pipeline, 1500, seed=71)
    run_cli("replay")  # batch watermark W
    produce(settings, pipeline, 1500, seed=72)  # beyond W: what the new owner would read again without adoption
    a = _serve_alone(settings, pipeline, "g-test-1")
    at = dict(a.last.positions)
    produce(settings, pipeline, 400, seed=73)

    caplog.clear()
    _serve_alone(settings, pipeline, "g-test-2")
    taken = [r.getMessage() for r in caplog.records if "speed worker g-test-2 assigned" in r.getMessage()]
    assert taken and all(f"{t}[{p}]@{n} " in " ".join(taken) for (t, p), n in at.items()), (taken, at)
    assert "(state of g-test-1)" in " ".join(taken)
    served_equals_oracle(settings, pipeline)

    monkeypatch.setenv("LAMBDALAKE_SPEED_ADOPT", "0")
    produce(settings, pipeline, 300, seed=74)
    caplog.clear()
    c = _serve_alone(settings, pipeline, "g-test-3")
    taken = " ".join(r.getMessage() for r in caplog.records if "speed worker g-test-3 assigned" in r.getMessage())
    assert "state of" not in taken
    for (t, p), w in c.batch.watermark.items():
        assert f"{t}[{p}]@{replay_start(w, c.options.dedup_span)} " in taken, (taken, w)
    served_equals_oracle(settings, pipeline)


def test_no_state_is_taken_from_a_worker_that_has_not_applied_an_erasure(settings, pipeline):
    """Rows a worker held before a subject was forgotten must not come back through a takeover."""
    import types

    from lambdalake.erasure import new_request, write_request
    from speed.adoption import _erasures_applied

    layout = Layout(settings.home)
    pv, pu = pipeline.source("pageviews"), pipeline.source("purchases")
    layer = types.SimpleNamespace(sources={s.topic: s for s in pipeline.sources}, settings=settings)
    assert _erasures_applied(layer, (pv.topic, 0), "g-test-1")  # nothing forgotten
    req = new_request(pv.name, "u-17")
    write_request(layout, req)
    assert not _erasures_applied(layer, (pv.topic, 0), "g-test-1")  # its state may still hold u-17's events
    assert _erasures_applied(layer, (pu.topic, 0), "g-test-1")  # another source: unaffected
    req.speed_workers_corrected = {**req.speed_workers_corrected, "g-test-1": "2026-12-07T00:00:00Z"}
    write_request(layout, req)
    assert _erasures_applied(layer, (pv.topic, 0), "g-test-1")
