"""Dead letters are fenced per source partition (issue 29; batch.dead_letters): a writer's first dead letters after
its claim initialise the partition's transactional producer, which aborts what an older writer left open and
refuses that writer's later commits; every reader counts committed records only (real broker)."""

from __future__ import annotations

import pytest

from audit.logread import read_dead_letters
from batch.dead_letters import DeadLetters
from batch.partition_buffer import PartitionBuffer
from lambdalake.clients import committed_counts, end_offsets, ensure_topics
from lambdalake.heads import Fenced
from lambdalake.log_clients import LogRecord
from tests.test_archiver import dlq_records

pytestmark = pytest.mark.integration


def _buffer(src, p: int, offsets: list[int]) -> PartitionBuffer:
    """A roll's buffer holding only invalid messages at ``offsets`` (as the archiver's validation leaves them)."""
    buf = PartitionBuffer(src, p, offsets[0])
    for o in offsets:
        buf.invalid.append((LogRecord(src.topic, p, o, 1_700_000_000_000, None, b"{not json", None),
                            "not valid JSON"))
    buf.end = offsets[-1] + 1
    return buf


def test_a_fenced_writer_adds_no_dead_letter_and_readers_count_committed_records(settings, pipeline):
    ensure_topics(settings, pipeline)
    src = pipeline.sources[0]
    a, zombie, b = (DeadLetters(settings, pipeline) for _ in range(3))
    assert a.send_range(_buffer(src, 1, [3, 5])) == (2, 0)  # a owns partition 1 and commits two dead letters

    z = zombie.producer(src, 1)  # a newer writer claims the partition (fencing a) and is paused mid-transaction
    z.begin_transaction()
    z.produce(src.dlq_topic, zombie.record_value(src, _buffer(src, 1, [6]).invalid[0][0], "x"), partition=1)
    assert z.flush(30) == 0  # in the log, not committed

    assert b.send_range(_buffer(src, 1, [5, 6, 8])) == (2, 1)  # the next claim aborts it; 5 is already there
    with pytest.raises(Fenced):
        a.send_range(_buffer(src, 1, [9]))  # a woke up: nothing of it counts
    with pytest.raises(Exception, match="(?i)fenc|epoch"):
        z.commit_transaction(30)  # neither does the paused one

    want = [3, 5, 6, 8]
    assert committed_counts(settings, [src.dlq_topic])[(src.dlq_topic, 1)] == len(want)
    assert end_offsets(settings, [src.dlq_topic])[(src.dlq_topic, 1)] > len(want)  # markers, aborted records
    assert read_dead_letters(settings, src).offsets == {1: want}
    assert sorted(r["offset"] for r in dlq_records(settings, pipeline)[src.name]) == want
    fresh = DeadLetters(settings, pipeline)
    fresh.load_high_water({src.topic: list(range(settings.partitions))})
    assert fresh.high[(src.topic, 1)] == 8 and fresh.high[(src.topic, 0)] == -1


def test_the_high_water_mark_is_found_behind_many_aborted_records(settings, pipeline):
    """A tail of aborted transactions longer than the first window read back: the mark is still the last committed
    record's (the window grows)."""
    ensure_topics(settings, pipeline)
    src = pipeline.sources[0]
    a = DeadLetters(settings, pipeline)
    assert a.send_range(_buffer(src, 2, [40])) == (1, 0)
    p = a.producer(src, 2)
    rec = a.record_value(src, _buffer(src, 2, [41]).invalid[0][0], "x")
    p.begin_transaction()
    for _ in range(100):
        p.produce(src.dlq_topic, rec, partition=2)
    p.abort_transaction(30)
    fresh = DeadLetters(settings, pipeline)
    fresh.reload_high_water(src, 2)
    assert fresh.high[(src.topic, 2)] == 40
    assert committed_counts(settings, [src.dlq_topic])[(src.dlq_topic, 2)] == 1


def test_a_handover_tries_its_dead_letters_once_within_the_handover_budget(settings, pipeline):
    """A member handing partitions over (a revocation) must return within librdkafka's max.poll.interval.ms: its
    last rolls' dead letters get one attempt within what is left of Archiver.HANDOVER_S, none once it is spent."""
    import time

    from batch.archiver import Archiver
    from batch.exceptions import DeadLetterError

    class Refusing:
        def __init__(self):
            self.timeouts: list[float] = []

        def send_range(self, buf, timeout=None):
            self.timeouts.append(timeout)
            raise DeadLetterError("the broker is away")

        def reset(self):
            pass

    src = pipeline.sources[0]
    archiver = Archiver(settings, pipeline)
    archiver._handing_over, archiver._handover_deadline = True, time.monotonic() + 5.0
    dlq = Refusing()
    t0 = time.monotonic()
    with pytest.raises(DeadLetterError):
        archiver._send_dead_letters(_buffer(src, 0, [1]), dlq)
    assert len(dlq.timeouts) == 1 and 0 < dlq.timeouts[0] <= 5.0 and time.monotonic() - t0 < 2.0
    archiver._handover_deadline = time.monotonic() - 1
    with pytest.raises(DeadLetterError, match="out of time"):
        archiver._send_dead_letters(_buffer(src, 0, [1]), dlq)
    assert len(dlq.timeouts) == 1
