"""Table sources (lambdalake/tables.py): the verdict on a Debezium change event, and a table's rows by key — a change
applies only if its log position is newer than the key's, deletes leave tombstones — so that duplicates change
nothing and the rows of the changes below any watermark merged with the rows of the changes from it on equal the
rows of all of them. The oracle is a plain dict standing for the database, changed in commit order."""

from __future__ import annotations

from decimal import Decimal

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdalake import Field
from lambdalake.exceptions import PipelineError
from lambdalake.tables import TOMBSTONE, Change, Envelope, Position, Table, TableRows, decode_change
from lambdalake.validation import Invalid

ORDERS = Table("orders", "cdc.public.orders", primary_key=["id"],
               columns=[Field.integer("id", minimum=1), Field.string("status", pattern=r"^[a-z]+$"),
                        Field.decimal("amount", scale=2, nullable=True, required=False),
                        Field.timestamp("placed_at")],
               time="placed_at")
PLACED = "2026-12-01T10:00:00Z"
PLACED_US = 1796119200 * 1_000_000


def message(op: str, lsn: int, before: dict | None = None, after: dict | None = None, tx: int | None = 7) -> bytes:
    return msgspec.json.encode(Envelope(op=op, source=Position(lsn=lsn, txId=tx), before=before, after=after))


def row(id_: int, status: str = "new", amount: str | None = "10.25", placed=PLACED) -> dict:
    return {"id": id_, "status": status, "amount": amount, "placed_at": placed}


def test_inserts_updates_deletes_and_snapshot_reads_decode_to_changes():
    ins = decode_change(ORDERS, message("c", 100, after=row(1)))
    assert ins == Change("c", (1,), {"id": 1, "status": "new", "amount": 1025, "placed_at": PLACED_US}, 100, 7)
    upd = decode_change(ORDERS, message("u", 120, before=row(1), after=row(1, "paid", None)))
    assert upd.op == "u" and upd.row["status"] == "paid" and upd.row["amount"] is None
    dele = decode_change(ORDERS, message("d", 130, before=row(1, "paid")))
    assert dele.deletes and dele.key == (1,) and dele.row["status"] == "paid"  # the before image: the row removed
    snap = decode_change(ORDERS, message("r", 90, after=row(2), tx=None))
    assert snap.op == "r" and snap.tx is None
    micros = decode_change(ORDERS, message("c", 140, after=row(3, placed=PLACED_US)))  # timestamp without time zone
    assert micros.row["placed_at"] == PLACED_US
    assert decode_change(ORDERS, None) is TOMBSTONE  # the null value after a delete: skipped, not dead-lettered
    extra = {**row(4), "note": "ignored"}  # columns the pipeline does not declare are ignored
    assert decode_change(ORDERS, message("c", 150, after=extra)).row == decode_change(
        ORDERS, message("c", 150, after=row(4))).row


@pytest.mark.parametrize(("value", "reason"), [
    (b"{", "not JSON"),
    (b'{"op": "c", "after": {}}', "not a Debezium change event: Object missing required field `source`"),
    (b'{"op": "c", "source": {"lsn": "12"}}', "not a Debezium change event: Expected `int`, got `str`"),
    (message("t", 5), "not a row change: a TRUNCATE"),
    (message("x", 5, after=row(1)), "not a row change: op 'x'"),
    (message("d", 5), "op 'd' without its before image (REPLICA IDENTITY FULL not set?)"),
    (message("c", 5, after={"id": 1, "status": "new", "placed_at": PLACED}), "column 'amount' missing from the "
                                                                             "after image"),
    (message("c", 5, after=row(0)), "column 'id': 0 is below the minimum 1"),
    (message("c", 5, after=row(1, "PAID")), "column 'status': 'PAID' does not match"),
    (message("c", 5, after=row(1, amount="10.255")), "column 'amount': 10.255 is not a decimal with at most 2"),
    (message("c", 5, after={**row(1), "amount": 10.25}), "column 'amount': expected a decimal string"),
    (message("c", 5, after=row(1, placed="2026-12-01 10:00")), "column 'placed_at': '2026-12-01 10:00' is not an "
                                                                "RFC 3339"),
    (message("c", 5, after={**row(1), "status": None}), "column 'status': null is not allowed"),
    (message("c", -1, after=row(1)), "source.lsn -1 is negative"),
])
def test_invalid_change_events_have_a_reason(value, reason):
    verdict = decode_change(ORDERS, value)
    assert isinstance(verdict, Invalid) and verdict.reason.startswith(reason), verdict


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"primary_key": []}, "declare its primary key"),
    ({"primary_key": ["nope"]}, "primary-key column 'nope' is not among its columns"),
    ({"primary_key": ["amount"]}, "must be a required, non-nullable string or integer"),
    ({"time": "status"}, "time column 'status' must be one of its columns, a required, non-nullable timestamp"),
    ({"topic": "cdc.orders.dlq"}, "is not a valid Kafka topic name"),
    ({"name": "Orders"}, "table source name 'Orders' must match"),
])
def test_declaration_errors_are_one_line(kwargs, error):
    args = {"name": "orders", "topic": "cdc.public.orders", "primary_key": ["id"], "columns": ORDERS.columns,
            "time": "placed_at", **kwargs}
    with pytest.raises(PipelineError, match=error.replace("(", r"\(").replace(")", r"\)")):
        Table(**args)


# -- the rows by key: a random workload against a dict standing for the database ------------------------------------
STATUSES = ("new", "paid", "sent")


def read(lsn: int, r: dict, marker: str) -> bytes:
    return msgspec.json.encode(Envelope(op="r", source=Position(lsn=lsn, txId=None, snapshot=marker), after=r))


@st.composite
def workloads(draw):
    """(the messages Kafka Connect sends, the database's rows after each message or None where no single moment
    of the database is in the rows: in the middle of a snapshot). Besides inserts, updates, deletes and primary-key
    changes: Connect killed after storing its position (it sends the changes since again) or before (the changes
    not sent yet are lost, it snapshots the table again, and the next change may stand at the snapshot's LSN)."""
    db: dict[int, dict] = {}
    log: list[bytes | None] = []
    states: list[dict | None] = []
    since_snapshot = 0  # messages after the last snapshot's end (those a crash may lose)
    lsn = draw(st.integers(1, 1000))
    tie = False
    for _ in range(draw(st.integers(0, 40))):
        lsn += 0 if tie else draw(st.integers(1, 50))
        tie = False
        kind = draw(st.sampled_from(["insert", "update", "delete", "rekey", "insert", "update", "resend",
                                     "resnapshot"]))
        key = draw(st.integers(1, 8))
        before = len(log)
        if kind == "insert" and key not in db:
            db[key] = row(key, draw(st.sampled_from(STATUSES)), f"{draw(st.integers(0, 10**6)) / 100:.2f}")
            log.append(message("c", lsn, after=db[key]))
        elif kind == "update" and key in db:
            old, db[key] = db[key], row(key, draw(st.sampled_from(STATUSES)), db[key]["amount"])
            log.append(message("u", lsn, before=old, after=db[key]))
        elif kind == "delete" and key in db:
            log += [message("d", lsn, before=db.pop(key)), None]  # the delete and its tombstone
        elif kind == "rekey" and key in db and (new := draw(st.integers(1, 8))) not in db:
            old = db.pop(key)
            db[new] = {**old, "id": new}
            log += [message("d", lsn, before=old), None, message("c", lsn, after=db[new])]  # one LSN
            states += [{k: v for k, v in db.items() if k != new}] * 2  # the delete (and its tombstone) first
        elif kind == "resend" and log:  # killed after storing its position: sends again from there
            log += log[draw(st.integers(0, len(log) - 1)):]
            since_snapshot += len(log) - before
        elif kind == "resnapshot" and db:  # killed before storing it: what it had not sent is lost
            lost = draw(st.integers(0, since_snapshot))
            del log[len(log) - lost:], states[len(states) - lost:]
            keys = sorted(db)
            for i, k in enumerate(keys):
                log.append(read(lsn, db[k], "last" if i == len(keys) - 1 else "first" if i == 0 else "true"))
                states.append(None if i < len(keys) - 1 else dict(db))
            since_snapshot, tie = 0, draw(st.booleans())  # the next change may be at the snapshot's LSN
            continue
        states += [dict(db)] * (len(log) - len(states))
        since_snapshot += len(log) - before
    return log, states


def rows_of(messages, start: int = 0) -> TableRows:
    """The rows of ``messages``, the first read at offset ``start``."""
    rows = TableRows()
    for i, m in enumerate(messages):
        verdict = decode_change(ORDERS, m)
        assert verdict is TOMBSTONE or isinstance(verdict, Change), verdict
        if verdict is not TOMBSTONE:
            rows.apply(verdict, start + i)
    return rows


def expected(db: dict[int, dict]) -> list[dict]:
    return [{**r, "amount": int(Decimal(r["amount"]) * 100), "placed_at": PLACED_US} for _, r in sorted(db.items())]


@settings(max_examples=300, deadline=None)
@given(workloads(), st.data())
def test_rows_by_key_equal_the_database_with_resent_changes_resnapshots_and_any_split(workload, data):
    log, states = workload
    rows = TableRows()
    for i, m in enumerate(log):  # at every offset outside a snapshot: the database as of the newest change read
        verdict = decode_change(ORDERS, m)
        assert verdict is TOMBSTONE or isinstance(verdict, Change), verdict
        if verdict is not TOMBSTONE:
            rows.apply(verdict)
        if states[i] is not None:
            assert list(rows.rows()) == expected(states[i]), i
    assert rows == rows_of(log)
    w = data.draw(st.integers(0, len(log)))  # a batch watermark anywhere: below it the batch side, the rest speed
    batch, speed = rows_of(log[:w]), rows_of(log[w:])
    assert batch.merged(speed) == rows
    assert list(batch.merged(speed).rows()) == expected(states[-1] if states else {})


@settings(max_examples=300, deadline=None)
@given(workloads(), st.data())
def test_a_speed_side_pruned_at_a_newer_batch_watermark_still_merges_into_the_rows_of_all(workload, data):
    """The handoff: a speed side holds the changes from ``w``; a batch version then covers the offsets below
    ``w2 >= w``; the speed side drops the keys whose newest change is below ``w2`` — merged, nothing is lost."""
    log, _ = workload
    w = data.draw(st.integers(0, len(log)))
    w2 = data.draw(st.integers(w, len(log)))
    speed = rows_of(log[w:], start=w)
    pruned = speed.pruned(w2)
    assert all(k.offset >= w2 for k in pruned.kept.values())
    assert rows_of(log[:w2]).merged(pruned) == rows_of(log)


def test_an_older_change_after_a_delete_does_not_bring_the_row_back():
    rows = rows_of([message("c", 10, after=row(1)), message("d", 20, before=row(1)), None])
    assert len(rows) == 0
    assert not rows.apply(decode_change(ORDERS, message("u", 15, before=row(1), after=row(1, "paid"))))
    assert len(rows) == 0 and rows.kept[(1,)].position == (20, 1)  # the tombstone stays
    assert rows.apply(decode_change(ORDERS, message("c", 30, after=row(1, "sent"))))  # a newer insert does
    assert [r["status"] for r in rows.rows()] == ["sent"]
