"""``lambdalake airflow``: run Airflow (standalone) with this repo's DAGs against the configured lake."""

from __future__ import annotations

import os
import shlex
import signal
from pathlib import Path
from typing import Annotated

import typer

from lambdalake.options import BootstrapOpt, HomeOpt, PipelineOpt, console, context, err_console


def register(app: typer.Typer) -> None:
    """Add ``lambdalake airflow`` to the CLI."""
    app.command("airflow")(airflow_cmd)


def airflow_cmd(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the Airflow UI / API server.")] = 8080,
    host: Annotated[str, typer.Option(help="Interface the UI listens on (0.0.0.0 exposes it).")] = "127.0.0.1",
    airflow_home: Annotated[Path | None, typer.Option(
        "--airflow-home", help="AIRFLOW_HOME (default: .airflow/ in the repo, git-ignored).",
        show_default=False)] = None,
    spark_master: Annotated[str | None, typer.Option(
        "--spark-master", help="Spark master of the spark_default connection [env LAMBDALAKE_SPARK_MASTER; "
        "default local[*]].", show_default=False)] = None,
    spark_conn: Annotated[bool, typer.Option(
        "--spark-conn/--no-spark-conn", help="Define spark_default from the Spark master (off: use the connection "
        "configured in Airflow).")] = True,
    startup_timeout: Annotated[float, typer.Option(min=10, help="Seconds to wait for Airflow to be healthy.")] = 300,
    print_env: Annotated[bool, typer.Option(
        "--print-env", help="Only print the environment as shell exports (eval \"$(lambdalake airflow --print-env)\" "
        "before using the airflow CLI on this AIRFLOW_HOME) and exit.")] = False,
    pipeline: PipelineOpt = None, home: HomeOpt = None, bootstrap: BootstrapOpt = None,
) -> None:
    """Start `airflow standalone` with this repo's dags/ and a project-local AIRFLOW_HOME; Ctrl-C stops all of it.

    Prints the UI address and the admin login once Airflow is healthy.
    """
    from lambdalake.embedded import port_open
    from wiring.orchestration.airflow_env import (
        ADMIN_USER,
        PASSWORDS_FILE,
        admin_password,
        airflow_environment,
        dags_folder,
        default_airflow_home,
        require_airflow,
    )
    from wiring.orchestration.standalone import AirflowStandalone

    require_airflow()
    ctx = context(pipeline, home, bootstrap, spark_master=spark_master, object_storage=True)
    af_home = (airflow_home or default_airflow_home()).resolve()
    if print_env:
        env = airflow_environment(af_home, ctx.settings, port=port, host=host, spark_conn=spark_conn)
        for key in sorted(k for k in env if k.startswith(("AIRFLOW", "LAMBDALAKE_")) or k == "PATH"):
            if env[key] != os.environ.get(key):
                typer.echo(f"export {key}={shlex.quote(env[key])}")
        return
    if port_open("127.0.0.1", port):
        raise typer.BadParameter(f"port {port} is already in use; pick another with --port", param_hint="--port")
    env = airflow_environment(af_home, ctx.settings, port=port, host=host, spark_conn=spark_conn)
    console.print(f"starting Airflow: AIRFLOW_HOME {af_home}, dags {dags_folder()}, "
                  f"lake {ctx.settings.lake or ctx.settings.home}, Spark master {ctx.settings.spark_master} "
                  "(connection spark_default)", highlight=False)
    af = AirflowStandalone(env, port=port, log=af_home / "standalone.log")

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C, kill and a closed terminal all stop Airflow (SIGINT set explicitly: it may be inherited ignored)
    previous = {s: signal.signal(s, on_term) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    af.start()
    try:
        with console.status("waiting for the scheduler, DAG processor and API server (first start migrates the "
                            "database) ..."):
            af.wait_healthy(timeout=startup_timeout)
        password = admin_password(af_home)
        ui = env["AIRFLOW__API__BASE_URL"]
        console.print(f"\nAirflow is up: [bold]{ui}[/]  (login [bold]{ADMIN_USER}[/] / [bold]{password}[/]; "
                      f"stored in {af_home / PASSWORDS_FILE})", highlight=False)
        console.print("DAGs: lambdalake_batch, lambdalake_maintenance, lambdalake_views_consumer. "
                      f"Component logs: {af_home / 'standalone.log'}. Ctrl-C stops Airflow.", highlight=False)
        if not port_open(*_host_port(ctx.settings.bootstrap)):
            err_console.print(f"[yellow]note:[/] no Kafka broker answers at {ctx.settings.bootstrap}; start one with "
                              "`lambdalake kafka up` (or set LAMBDALAKE_BOOTSTRAP) before running lambdalake_batch")
        code = af.wait()
        err_console.print(f"airflow standalone exited with code {code}; see {af_home / 'standalone.log'}")
        raise typer.Exit(code or 1)
    except KeyboardInterrupt:
        err_console.print("stopping Airflow ...")
    finally:
        for s in previous:  # a second Ctrl-C must not interrupt the shutdown (stop() escalates to SIGKILL itself)
            signal.signal(s, signal.SIG_IGN)
        af.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        left = af.leftovers()
        if left:
            err_console.print(f"[red]warning:[/] processes still running: {left}")
        else:
            err_console.print("Airflow stopped (no process left)")


def _host_port(bootstrap: str) -> tuple[str, int]:
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    return host, int(port)
