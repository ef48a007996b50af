"""`essp demo` / `make demo`: the main job, end to end, on the embedded default.

Starts (or reuses) the local stack, creates buckets and topics, migrates Airflow's metadata DB and
runs the `essp_smoke` DAG through Airflow, every task through the stage operator as a local
process, then prints a summary. Later stages of the project extend this to the training run.
"""

from __future__ import annotations

import json
import time

from rich.console import Console

from essp.airflow_stack import airflow_cli, airflow_env, migrate
from essp.errors import EsspError
from essp.infra import LocalStack, init_resources, prepare_settings

DEMO_DAG = "essp_smoke"


def run_demo(out: Console) -> dict:
    start = time.monotonic()
    settings = prepare_settings()
    out.rule("1/3 local stack")
    for status in LocalStack(settings, log=out.print).up():
        out.print(f"  {status.name:<9} {status.address:<22} {status.action}")
    made = init_resources(settings)
    out.print(f"  buckets {', '.join(made['buckets'])}; topics {', '.join(made['topics'])}")
    out.rule("2/3 Airflow metadata DB")
    env = airflow_env(settings)
    migrate(settings, env)
    out.print(f"  migrated {settings.pg_database} on {settings.pg_host}:{settings.pg_port}")
    out.rule(f"3/3 DAG {DEMO_DAG} (airflow dags test)")
    done = airflow_cli(settings, "dags", "test", DEMO_DAG, env=env, timeout=1800)
    summary = None
    for line in (done.stdout + done.stderr).splitlines():
        if "ESSP_SUMMARY " in line:
            summary = json.loads(line.split("ESSP_SUMMARY ", 1)[1].split("  ", 1)[0].strip())
    if summary is None:
        raise EsspError(f"DAG {DEMO_DAG} finished but printed no summary; see `essp airflow test {DEMO_DAG}`")
    out.rule("success")
    for service, ms in summary.items():
        out.print(f"  {service:<6} round trip through Airflow stage: {ms:8.2f} ms")
    out.print(f"  {DEMO_DAG} succeeded in {time.monotonic() - start:.1f} s. "
              f"Airflow UI: `essp airflow up`, then {settings.airflow_url}")
    return summary
