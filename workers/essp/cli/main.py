"""The `essp` command line."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from essp.bench.allocation import allocation_cmd as _registers_bench_allocation  # noqa: F401 - `essp bench allocation`
from essp.bench.dataplane import bench_app
from essp.bench.fusionfit import fusion_fit_cmd as _registers_bench_fusion_fit  # noqa: F401 - `essp bench fusion-fit`
from essp.bench.trainer import trainer_cmd as _registers_bench_trainer  # noqa: F401 - `essp bench trainer`
from essp.cli.dataplane import consume_cmd, control_app, plan_cmd, worker_app
from essp.cli.dataset import dataset_app
from essp.cli.train import predict_cmd, train_cmd
from essp.errors import EsspError
from essp.settings import Settings
from essp.stack.services import SERVICES, LocalStack, init_resources, prepare_settings

app = typer.Typer(help="ESSP: two-stream video classification on streamed data, run by Airflow.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
infra_app = typer.Typer(help="The embedded local stack: PostgreSQL, Redis, S3, Kafka protocol.",
                        no_args_is_help=True)
airflow_app = typer.Typer(help="Airflow's processes on the local stack.", no_args_is_help=True)
app.add_typer(infra_app, name="infra")
app.add_typer(airflow_app, name="airflow")
app.add_typer(dataset_app, name="dataset")
app.add_typer(bench_app, name="bench")
app.add_typer(worker_app, name="worker")
app.add_typer(control_app, name="control")
app.command("plan")(plan_cmd)
app.command("consume")(consume_cmd)
app.command("train")(train_cmd)
app.command("predict")(predict_cmd)

out = Console()
err = Console(stderr=True)


def _services(only: str | None) -> list[str]:
    if not only:
        return list(SERVICES)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SERVICES))
    if unknown:
        raise typer.BadParameter(f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(SERVICES)}")
    return names


def _status_table(rows: list[tuple[str, ...]], headers: tuple[str, ...]) -> Table:
    table = Table(*headers)
    for row in rows:
        table.add_row(*row)
    return table


@infra_app.command("up")
def infra_up(only: Annotated[str | None, typer.Option(help="Comma-separated subset of services.")] = None,
             init: Annotated[bool, typer.Option(help="Create buckets and shared topics.")] = True) -> None:
    """Start (or reuse) the local services and wait until each answers."""
    settings = prepare_settings()
    stack = LocalStack(settings, log=lambda msg: err.print(f"[dim]{msg}[/dim]"))
    statuses = stack.up(_services(only))
    out.print(_status_table([(s.name, s.address, s.action, str(s.pid or "")) for s in statuses],
                            ("service", "address", "action", "pid")))
    if init and {"s3", "kafka"} <= {s.name for s in statuses}:
        made = init_resources(settings)
        out.print(f"buckets: {', '.join(made['buckets'])}; topics: {', '.join(made['topics'])}")


@infra_app.command("init")
def infra_init() -> None:
    """Create the buckets and shared topics on already running services (Compose, Kubernetes)."""
    made = init_resources(Settings())
    out.print(f"buckets: {', '.join(made['buckets'])}; topics: {', '.join(made['topics'])}")


@infra_app.command("down")
def infra_down() -> None:
    """Stop Airflow, the resident workers and the services this state folder started (by PID)."""
    from essp.deploy.fleet import LocalFleet
    from essp.stack.airflow import AirflowStack

    settings = Settings()
    stopped = AirflowStack(settings).down()
    stopped += LocalFleet(settings).stop_all()  # resident workers and trainers the DAGs started
    stopped += LocalStack(settings).down()
    out.print(f"stopped: {', '.join(stopped) if stopped else 'nothing (no process of ours was running)'}")


@infra_app.command("status")
def infra_status() -> None:
    """Print each service, its address and its state (ours / external / down)."""
    statuses = LocalStack(Settings()).status()
    out.print(_status_table([(s.name, s.address, s.state, str(s.pid or "")) for s in statuses],
                            ("service", "address", "state", "pid")))
    if any(s.state == "down" for s in statuses):
        raise typer.Exit(3)


@airflow_app.command("up")
def airflow_up() -> None:
    """Migrate the metadata DB and start api-server, scheduler, dag-processor and triggerer."""
    from essp.stack.airflow import AirflowStack

    settings = prepare_settings()
    LocalStack(settings).up(["postgres"])
    actions = AirflowStack(settings).up()
    out.print(_status_table([(p, a) for p, a in actions.items()], ("process", "action")))
    out.print(f"Airflow UI: {settings.airflow_url}  login: {settings.airflow_user} / password in "
              f"{settings.state_dir / 'secrets.env'} (ESSP_AIRFLOW_PASSWORD), or `essp airflow login`")


@airflow_app.command("down")
def airflow_down() -> None:
    """Stop the Airflow processes started by `essp airflow up`."""
    from essp.stack.airflow import AirflowStack

    stopped = AirflowStack(Settings()).down()
    out.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@airflow_app.command("status")
def airflow_status() -> None:
    from essp.stack.airflow import AirflowStack, api_healthy

    settings = Settings()
    rows = [(p, f"pid {pid}" if pid else "down") for p, pid in AirflowStack(settings).status().items()]
    out.print(_status_table(rows, ("process", "state")))
    out.print(f"API {settings.airflow_url}: {'healthy' if api_healthy(settings) else 'not answering'}")


@airflow_app.command("login")
def airflow_login() -> None:
    """Print the URL and the login of the local Airflow UI."""
    settings = Settings()
    out.print(f"{settings.airflow_url}  user: {settings.airflow_user}  "
              f"password: {settings.secret('airflow_password')}")


@airflow_app.command("test")
def airflow_test(dag_id: str,
                 conf: Annotated[str, typer.Option(help="DAG run conf (params) as JSON.")] = "{}") -> None:
    """Run one DAG in-process with `airflow dags test`, on the local metadata DB."""
    from essp.stack.airflow import airflow_cli, airflow_env, migrate

    settings = prepare_settings()
    LocalStack(settings).up(["postgres"])
    env = airflow_env(settings)
    migrate(settings, env)
    done = airflow_cli(settings, "dags", "test", dag_id, "--conf", conf, env=env, timeout=3600)
    sys.stdout.write(done.stdout[-4000:])


@airflow_app.command("trigger")
def airflow_trigger(dag_id: str,
                    conf: Annotated[str, typer.Option(help="DAG run conf (params) as JSON.")] = "{}",
                    demo: Annotated[bool, typer.Option("--demo", help="Start from the demo's essp_train params "
                                                       "(the dataset `make demo` ingested).")] = False,
                    set_: Annotated[list[str] | None, typer.Option("--set", help="PARAM=VALUE (VALUE as JSON, "
                                                                   "else a string); repeatable.")] = None,
                    wait: Annotated[bool, typer.Option("--wait", help="Follow the run to its end.")] = False,
                    ) -> None:
    """Trigger a DAG through the REST API of the running api-server (`essp airflow up`), e.g.
    `essp airflow trigger essp_train --demo --set fusion=max --wait`."""
    from essp.stack.airflow import AirflowClient, AirflowError

    settings = Settings()
    values: dict = {}
    if demo:
        from essp.cli.demo import DEMO_CONF

        values.update(DEMO_CONF)
    try:
        values.update(json.loads(conf))
    except ValueError as exc:
        raise typer.BadParameter(f"--conf is not JSON: {exc}") from None
    for item in set_ or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set {item!r}: expected PARAM=VALUE")
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw
    client = AirflowClient(settings)
    try:
        run = client.trigger(dag_id, values)
        out.print(f"triggered {dag_id} run {run['dag_run_id']}: {settings.airflow_url}/dags/{dag_id}/runs/"
                  f"{run['dag_run_id']}")
        if wait:
            final = client.wait(dag_id, run["dag_run_id"])
            for ti in client.tasks(dag_id, run["dag_run_id"]):
                index = f"[{ti['map_index']}]" if ti.get("map_index", -1) >= 0 else ""
                out.print(f"  {ti['task_id'] + index:<22} {ti['state']}")
            out.print(f"{dag_id} run {run['dag_run_id']}: {final['state']}")
            from urllib.parse import quote

            out.print(f"its report: {settings.airflow_url}/essp/dag-runs/{dag_id}/{quote(run['dag_run_id'], safe='')} "
                      "(the run's \"ESSP report\" tab in the UI)", soft_wrap=True)
            if final["state"] != "success":
                raise typer.Exit(1)
    except AirflowError as exc:
        out.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


@app.command("stage")
def stage_cmd(name: str,
              params_json: Annotated[str, typer.Option("--params-json", help="Stage params as JSON.")] = "{}",
              param: Annotated[list[str] | None, typer.Option("--param", "-p", help="KEY=VALUE")] = None) -> None:
    """Run one stage (what Airflow runs as a local process or a pod) and print its JSON result."""
    from essp.orchestration.stages import run_stage

    try:
        params: dict[str, Any] = json.loads(params_json)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--params-json is not JSON: {exc}") from None
    if not isinstance(params, dict):
        raise typer.BadParameter("--params-json must be a JSON object")
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--param {item!r} is not KEY=VALUE")
        params[key] = value
    result = run_stage(name, Settings(), params)
    out.print_json(json.dumps(result))


@app.command("doctor")
def doctor() -> None:
    """Report the versions of the compute stack and whether each service answers."""
    import av
    import cv2
    import torch

    from essp.compat import import_torchvision

    torchvision = import_torchvision()
    cuda = torch.cuda.is_available()
    rows = [("python", sys.version.split()[0]), ("torch", torch.__version__),
            ("torchvision", torchvision.__version__), ("cuda", torch.cuda.get_device_name(0) if cuda else "no"),
            ("opencv", cv2.__version__), ("optflow (TV-L1)", "yes" if hasattr(cv2, "optflow") else "no"),
            ("pyav", av.__version__)]
    out.print(_status_table(rows, ("component", "version")))
    statuses = LocalStack(Settings()).status()
    out.print(_status_table([(s.name, s.address, s.state) for s in statuses], ("service", "address", "state")))


@app.command("demo")
def demo() -> None:
    """Run the main job end to end on the embedded default (the local stack and Airflow)."""
    from essp.cli.demo import run_demo

    run_demo(out)


def main() -> None:
    try:
        app()
    except EsspError as exc:
        err.print(f"[bold red]error:[/bold red] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
