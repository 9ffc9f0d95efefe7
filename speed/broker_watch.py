"""Watching the connection to Kafka while nothing arrives: the user is told once when it is lost and again when it
is back (kafka-python keeps reconnecting with exponential backoff by itself; the published snapshot stays valid)."""

from __future__ import annotations

import time
from collections.abc import Callable

from lambdalake.config import Settings
from speed.checkpoint import Checkpoint

BROKER_CHECK_SECONDS = 5.0  # how long without records before checking that a broker connection is up


class BrokerWatch:
    """Told about every poll of the live consumer (:meth:`polled`); checks the connection after
    :data:`BROKER_CHECK_SECONDS` without records, at most that often."""

    def __init__(self, settings: Settings, notify: Callable[[str], None]):
        self.settings = settings
        self.notify = notify
        self._last_records = self._broker_checked = time.monotonic()
        self._broker_down_since: float | None = None

    def polled(self, polled: dict, now: float, consumer, last: Checkpoint | None) -> None:
        """After a poll at ``now`` that returned ``polled`` ({partition: records}) from ``consumer``; ``last``: the
        committed checkpoint (its snapshot is the published one)."""
        if any(polled.values()):
            self._last_records = now
        if polled and self._broker_down_since is not None:
            self.notify(f"reconnected to Kafka after {now - self._broker_down_since:.0f}s")
            self._broker_down_since = None
        if now - self._last_records >= BROKER_CHECK_SECONDS and now - self._broker_checked >= BROKER_CHECK_SECONDS:
            self._watch_broker(now, consumer, last)

    def _watch_broker(self, now: float, consumer, last: Checkpoint | None) -> None:
        """While nothing arrives, tell the user once when no broker connection is up (kafka-python keeps reconnecting
        with exponential backoff by itself) and again when it is back. The published snapshot stays valid meanwhile."""
        self._broker_checked = now
        try:  # kafka-python has no public connectivity API; read its client state, never depend on it
            client = consumer._client
            up = any(client.connected(b.node_id) for b in client.cluster.brokers())
        except Exception:  # noqa: BLE001
            return
        if not up and self._broker_down_since is None:
            self._broker_down_since = now
            self.notify(f"lost the connection to Kafka at {self.settings.bootstrap}; reconnecting with backoff "
                        f"(the published snapshot {last.id if last else '-'} stays valid)")
        elif up and self._broker_down_since is not None:
            self.notify(f"reconnected to Kafka after {now - self._broker_down_since:.0f}s")
            self._broker_down_since = None
