"""The dedup rule, owned here and used by every layer.

Rule: within one partition of one topic, a *valid* message whose ``event_id`` already appeared in an earlier valid
message of that partition is a duplicate; the first one (lowest offset) counts. Invalid messages never count and
never shadow a later valid one. (Producers key by subject, so a re-sent event lands in the same partition.)

The batch layer applies it over all master data (an exact window function). The speed layer applies it with
:class:`DedupWindow`, bounded by offsets: ids first seen within the last ``span`` offsets of the partition are
remembered exactly; a duplicate re-sent further behind than that is not recognised until the next batch run
corrects it (a documented limit, see docs/operations.md, "Known limits").
"""

from __future__ import annotations

from collections import deque


class DedupWindow:
    """Exact dedup over the last ``span`` offsets of one partition (first occurrence wins)."""

    __slots__ = ("span", "_order", "_first")

    def __init__(self, span: int):
        if span < 1:
            raise ValueError("span must be >= 1")
        self.span = span
        self._order: deque[tuple[int, str]] = deque()  # (offset, event_id) of first occurrences, ascending
        self._first: dict[str, int] = {}

    def seen(self, event_id: str, offset: int) -> bool:
        """Record a valid message; True if it is a duplicate of an earlier one still in the window."""
        self._evict(offset)
        if event_id in self._first:
            return True
        self._first[event_id] = offset
        self._order.append((offset, event_id))
        return False

    def _evict(self, offset: int) -> None:
        horizon = offset - self.span
        order, first = self._order, self._first
        while order and order[0][0] < horizon:
            _, eid = order.popleft()
            del first[eid]

    def __len__(self) -> int:
        return len(self._first)

    def items(self) -> list[tuple[int, str]]:
        """(offset, event_id) pairs, ascending by offset: what a checkpoint persists."""
        return list(self._order)

    @classmethod
    def from_items(cls, span: int, items: list[tuple[int, str]]) -> DedupWindow:
        w = cls(span)
        for offset, eid in items:
            w._first[eid] = offset
            w._order.append((offset, eid))
        return w
