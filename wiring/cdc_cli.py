"""``lambdalake cdc up|down|status``: the change-data-capture parts — PostgreSQL (:mod:`lambdalake.postgres`) and
Kafka Connect with Debezium's PostgreSQL connector (:mod:`lambdalake.connect`) — started, captured, shown, stopped.

``LAMBDALAKE_POSTGRES`` (a postgresql:// URL) and ``LAMBDALAKE_CONNECT`` (a Connect REST URL) point at the user's
own database and Connect cluster: what they name is used and never started or stopped here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lambdalake.config import load_settings
from lambdalake.exceptions import BrokerError
from lambdalake.options import BootstrapOpt, HomeOpt, console, err_console

cdc_app = typer.Typer(help="Change data capture: PostgreSQL + Kafka Connect with Debezium into the log.",
                      no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(cdc_app, name="cdc")


def _postgres(home: Path, port: int | None = None):
    from lambdalake.postgres import EmbeddedPostgres

    return EmbeddedPostgres(home / "postgres", port=port)


def _connect(home: Path, bootstrap: str = "", port: int | None = None):
    from lambdalake.connect import EmbeddedConnect

    return EmbeddedConnect(home / "connect", bootstrap, port=port)


def _kafka_answers(bootstrap: str) -> None:
    from lambdalake.embedded import port_open

    hosts = [h.rsplit(":", 1) for h in bootstrap.split(",")]
    if not any(port_open(host, int(port)) for host, port in hosts):
        raise BrokerError(f"Kafka at {bootstrap} does not answer; start it (`lambdalake kafka up`) or point "
                          "LAMBDALAKE_BOOTSTRAP at yours")


TableOpt = Annotated[list[str] | None, typer.Option(
    "--table", "-t", help="Capture this table, schema.table (repeatable); it must exist and have a primary key.",
    show_default=False)]


@cdc_app.command("up")
def cdc_up(
    table: TableOpt = None,
    name: Annotated[str, typer.Option("--name", help="Connector name (also its replication slot and "
                                      "publication <name>_pub).")] = "lambdalake",
    prefix: Annotated[str, typer.Option("--prefix", help="Topic prefix: changes go to <prefix>.<schema>.<table>.")]
    = "cdc",
    topic_partitions: Annotated[int, typer.Option("--topic-partitions", min=1, help="Partitions of each change "
                                                  "topic created now.")] = 1,
    pg_port: Annotated[int | None, typer.Option("--pg-port", min=1, max=65535, help="PostgreSQL port [default: "
                                                "the last one, else a free one].", show_default=False)] = None,
    connect_port: Annotated[int | None, typer.Option("--connect-port", min=1, max=65535, help="Kafka Connect REST "
                                                     "port [default: a free one].", show_default=False)] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each part.")] = 90.0,
    home: HomeOpt = None, bootstrap: BootstrapOpt = None,
) -> None:
    """Start the embedded PostgreSQL and Kafka Connect worker in the background (each unless LAMBDALAKE_POSTGRES /
    LAMBDALAKE_CONNECT point elsewhere); with --table, capture those tables (REPLICA IDENTITY FULL, the Debezium
    connector registered or updated). Idempotent."""
    from lambdalake.connect import Capture, capture, connect_url, rest
    from lambdalake.postgres import postgres_url

    cap = Capture(name, tuple(table), prefix=prefix, partitions=topic_partitions) if table else None
    settings = load_settings(home=home, bootstrap=bootstrap)
    own_db, own_connect = postgres_url(), connect_url()
    if own_connect is not None:
        rest(f"{own_connect}/")  # answers, before anything is started
    if own_db is None:
        pg = _postgres(settings.home, pg_port)
        with console.status("starting PostgreSQL ..."):
            st = pg.up(timeout=timeout)
        db = pg.access()
        console.print(f"PostgreSQL up: {db.shown} (pid {st['pid']}, password in {st['credentials']}, "
                      f"log {st['log']})", highlight=False)
    else:
        db = own_db
        console.print(f"PostgreSQL: {db.shown} (LAMBDALAKE_POSTGRES)", highlight=False)
    worker = None
    if own_connect is None:
        _kafka_answers(settings.bootstrap)
        worker = _connect(settings.home, settings.bootstrap, connect_port)
        with console.status("starting Kafka Connect ..."):
            st = worker.up(timeout=timeout)
        base = st["url"]
        console.print(f"Kafka Connect up: REST {base} writing to {settings.bootstrap} (pid {st['pid']}, "
                      f"offsets {st['offsets']}, log {st['log']})", highlight=False)
    else:
        base = own_connect
        console.print(f"Kafka Connect: {base} (LAMBDALAKE_CONNECT)", highlight=False)
    if cap is None:
        console.print("no table captured (name them with --table schema.table)")
        return
    ref = worker.password_ref(cap, db) if worker is not None else None
    with console.status(f"capturing {', '.join(cap.tables)} ..."):
        capture(base, cap, db, password_ref=ref, timeout=timeout)
    console.print(f"capturing {', '.join(cap.tables)} with connector {cap.name} (slot {cap.slot}) into "
                  f"{', '.join(cap.topic(t) for t in cap.tables)}", highlight=False)


@cdc_app.command("down")
def cdc_down(home: HomeOpt = None) -> None:
    """Stop the embedded Kafka Connect worker, then the embedded PostgreSQL (data, offsets and slots stay)."""
    settings = load_settings(home=home)
    stopped = _connect(settings.home).down()
    console.print("Kafka Connect stopped" if stopped else "no embedded Kafka Connect was running")
    stopped = _postgres(settings.home).down()
    console.print("PostgreSQL stopped" if stopped else "no embedded PostgreSQL was running")


def replication_slots(home: Path) -> dict | None:
    """For `lambdalake status`: the database CDC reads (LAMBDALAKE_POSTGRES, else the embedded server if it runs)
    and its logical replication slots with the WAL each holds back; None when there is no such database. A
    database that cannot be reached is reported as ``error``, never raised."""
    from lambdalake.connect import slot_lag
    from lambdalake.postgres import postgres_url

    db = postgres_url()
    if db is None:
        pg = _postgres(home)
        if not pg.status()["running"]:
            return None
        db = pg.access()
    try:
        return {"database": db.shown, "slots": slot_lag(db)}
    except Exception as exc:  # noqa: BLE001 - a database that refuses us is a status line, not a crash
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return {"database": db.shown, "error": msg}


@cdc_app.command("status")
def cdc_status(home: HomeOpt = None) -> None:
    """Show PostgreSQL (embedded or LAMBDALAKE_POSTGRES) with each replication slot's WAL held back, and Kafka
    Connect (embedded or LAMBDALAKE_CONNECT) with each connector's state. Exit 1 if a part is not running."""
    from lambdalake.connect import ConnectError, connect_url, connectors, slot_lag
    from lambdalake.postgres import postgres_url

    settings = load_settings(home=home)
    ok = True
    db = postgres_url()
    if db is None:
        pg = _postgres(settings.home)
        st = pg.status()
        if st["running"]:
            db = pg.access()
            console.print(f"PostgreSQL: running, pid {st['pid']}, {db.shown}, accepting connections: "
                          f"{st.get('serving')}, log {st.get('log')}", highlight=False)
        else:
            ok = False
            console.print(f"PostgreSQL: not running (directory {st['dir']})", highlight=False)
    if db is not None:
        try:
            for s in slot_lag(db):
                console.print(f"  slot {s['slot']}: active {s['active']}, WAL held back {s['lag_bytes'] or 0:,} "
                              f"bytes, wal_status {s['wal_status']}", highlight=False)
        except Exception as exc:  # noqa: BLE001 - any failure to log in is shown as such
            ok = False
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            console.print(f"PostgreSQL at {db.shown}: {msg}", highlight=False)
    base = connect_url()
    if base is None:
        st = _connect(settings.home).status()
        if st["running"]:
            base = st.get("url")
            console.print(f"Kafka Connect: running, pid {st['pid']}, REST {base}, writing to {st.get('bootstrap')}, "
                          f"log {st.get('log')}", highlight=False)
        else:
            ok = False
            console.print(f"Kafka Connect: not running (directory {st['dir']})", highlight=False)
    if base is not None:
        try:
            for cname, cst in connectors(base).items():
                tasks = ", ".join(f"task {t.get('id')} {t.get('state')}" for t in cst.get("tasks", []))
                console.print(f"  connector {cname}: {cst.get('connector', {}).get('state')}; {tasks or 'no task'}",
                              highlight=False)
        except ConnectError as exc:
            ok = False
            err_console.print(f"Kafka Connect: {exc}", highlight=False)
    if not ok:
        raise typer.Exit(1)
