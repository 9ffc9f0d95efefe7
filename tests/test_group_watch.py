"""The watch over a kafka-python group member's membership (lambdalake.log_clients.GroupWatch): a member not in a
stable group for its limit while the broker answers is restarted; a rebalance shorter than the limit, a stable
member, or a broker that does not answer is left alone; a member whose finished join no poll will collect is made
to rejoin (unit test: fake coordinator states, fake clock)."""

from __future__ import annotations

import types

from kafka.structs import MemberState

import lambdalake.log_clients as log_clients
from lambdalake.log_clients import GroupWatch


def _watch(monkeypatch, reachable: bool = True):
    clock = {"now": 1000.0}
    monkeypatch.setattr(log_clients.time, "monotonic", lambda: clock["now"])
    consumer = types.SimpleNamespace(_coordinator=types.SimpleNamespace(state=MemberState.UNJOINED))
    stuck: list[str] = []
    probes: list[float] = []

    def probe() -> bool:
        probes.append(clock["now"])
        return reachable

    return GroupWatch(consumer, 30.0, probe, stuck.append), consumer, clock, stuck, probes


def test_a_member_stuck_out_of_its_group_is_restarted(monkeypatch):
    watch, consumer, clock, stuck, _ = _watch(monkeypatch)
    for state, dt in [(MemberState.REBALANCING, 0), (MemberState.REBALANCING, 20), (MemberState.STABLE, 5),
                      (MemberState.REBALANCING, 5), (MemberState.REBALANCING, 25)]:
        clock["now"] += dt
        consumer._coordinator.state = state
        watch.check()
    assert not stuck  # every rebalance ended (or is younger than 30 s)
    clock["now"] += 6
    watch.check()
    assert len(stuck) == 1 and "not in a stable group for 31s" in stuck[0] and "<rebalancing>" in stuck[0]


def test_a_join_no_poll_will_collect_is_started_again(monkeypatch):
    """kafka-python 3.0.12: REBALANCING while ``need_rejoin()`` is false (the finished round trip is orphaned)."""
    watch, consumer, clock, stuck, _ = _watch(monkeypatch)
    coordinator, rejoins, wants = consumer._coordinator, [], {"rejoin": True}
    coordinator.need_rejoin = lambda: wants["rejoin"]
    coordinator.request_rejoin = lambda: (rejoins.append(clock["now"]), wants.update(rejoin=True))
    coordinator.state = MemberState.REBALANCING
    for _ in range(20):  # a join in flight that the next poll will collect: left alone
        watch.check()
        clock["now"] += 0.25
    assert not rejoins
    wants["rejoin"] = False  # the leader's assignment matched its metadata inside the round trip: orphaned
    for _ in range(4):
        watch.check()
        clock["now"] += 0.25
    assert not rejoins  # younger than ORPHANED_JOIN_S
    watch.check()
    assert rejoins == [clock["now"]]
    watch.check()
    assert len(rejoins) == 1  # rejoin requested: the next poll joins again (need_rejoin() is true)
    coordinator.state = MemberState.STABLE
    watch.check()
    assert not stuck and len(rejoins) == 1


def test_a_member_waits_while_the_broker_does_not_answer(monkeypatch):
    watch, consumer, clock, stuck, probes = _watch(monkeypatch, reachable=False)
    for _ in range(10):
        watch.check()
        clock["now"] += 10
    assert not stuck and probes == [1040.0, 1080.0]  # asked once per limit, not at every poll


def test_no_coordinator_state_no_watch(monkeypatch):
    watch, consumer, clock, stuck, _ = _watch(monkeypatch)
    del consumer._coordinator
    for _ in range(5):
        watch.check()
        clock["now"] += 60
    assert not stuck


def test_a_process_that_is_not_a_lambdalake_command_is_never_executed_anew():
    """restart_self in a library user's (here: the test runner's) process raises instead of exec'ing it."""
    import pytest

    from lambdalake.exceptions import BrokerError
    from lambdalake.runtime import allow_restart, restart_self

    allow_restart()  # as if a test had called the CLI's main in-process: still not the `lambdalake` command
    with pytest.raises(BrokerError, match="stuck; restart this process"):
        restart_self("stuck")
