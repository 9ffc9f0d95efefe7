"""Reading the log back: per-topic message counts and verdicts (what ``lambdalake topics`` and the demo show)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from lambdalake.clients import committed_counts, end_offsets
from lambdalake.config import Settings
from lambdalake.dedup import DedupWindow
from lambdalake.pipeline import Pipeline
from lambdalake.session import TP, LogSession, connect
from lambdalake.validation import Validator

# ``lambdalake topics`` shows this many reason groups by name; the rest are summed as "other" (the column adds up).
REASON_GROUPS_SHOWN = 5


def reason_group(reason: str) -> str:
    """The group a dead-letter reason counts under: its head (the part before the first ``:``, e.g.
    ``field 'url'``, ``not UTF-8``, ``not JSON``), numbers replaced by ``N`` (``message is N bytes, ...``)."""
    return re.sub(r"(?<![\w-])\d+(?!\w)", "N", reason.split(":", 1)[0]).strip() or "?"


def reason_summary(reasons: Counter, shown: int = REASON_GROUPS_SHOWN) -> list[tuple[str, int]]:
    """The ``shown`` largest groups by count (ties by name), then ``("other", n)`` for the rest if any: the
    counts always sum to ``sum(reasons.values())``."""
    ordered = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    if len(ordered) <= shown + 1:  # an "other" of one group would hide its name for nothing
        return ordered
    return [*ordered[:shown], ("other", sum(n for _, n in ordered[shown:]))]


@dataclass
class TopicCounts:
    topic: str
    messages: int = 0
    valid: int = 0
    duplicates: int = 0
    invalid: int = 0
    reasons: Counter = field(default_factory=Counter)


def count_topics(settings: Settings, pipeline: Pipeline, timeout: float = 120.0) -> list[TopicCounts]:
    """Read every source topic from offset 0 to its current end and classify each message.

    Duplicates are counted with an unbounded window (the exact dedup rule). DLQ topics are counted as committed
    records (their offsets also number transaction markers).
    """
    out: list[TopicCounts] = []
    ends = end_offsets(settings, [s.topic for s in pipeline.sources])
    dead = committed_counts(settings, [s.dlq_topic for s in pipeline.sources])  # records, not offsets
    client = connect(settings, group_id=None)
    try:
        for src in pipeline.sources:
            tc = TopicCounts(src.topic)
            validate = Validator(src)
            keys = [(t, p) for (t, p) in ends if t == src.topic]
            windows = {p: DedupWindow(span=1 << 62) for _, p in keys}
            session = LogSession(client, [src.topic], bootstrap=settings.bootstrap, reader="lambdalake topics",
                                 lost_means="", notify=None)
            starts = session.assign({}, partitions=keys)  # every partition from its log start

            def count(key: TP, offsets: list[int], values: list, tc=tc, validate=validate, windows=windows,
                      src=src) -> None:
                window = windows[key[1]]
                for offset, value in zip(offsets, values, strict=True):
                    tc.messages += 1
                    v = validate(value)
                    if not v.ok:
                        tc.invalid += 1
                        tc.reasons[reason_group(v.reason)] += 1
                    elif window.seen(v.record[src.event_id], offset):
                        tc.duplicates += 1
                    else:
                        tc.valid += 1

            session.read_until(starts, ends, timeout, f"topic {src.topic!r}", count, max_records=10_000)
            out.append(tc)
            dlq = TopicCounts(src.dlq_topic)
            dlq.messages = sum(v for (t, _), v in dead.items() if t == src.dlq_topic)
            out.append(dlq)
    finally:
        client.close()
    return out
