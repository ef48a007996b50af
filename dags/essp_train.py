"""essp_train: train a two-stream video classifier on a dataset, through the resident workers.

Trigger it from the UI (the form shows every param with its description), the REST API or
`airflow dags trigger essp_train --conf '{"fusion": "max", ...}'`. Airflow refuses a value outside a
param's schema at trigger time; `validate_params` refuses what one param alone cannot say (e.g.
`fusion: weighted` without `fusion_weights`), naming the param.

validate_params -> verify_manifest -> ensure_workers -> train (one task per stream, deferring while
the trainers train each epoch) -> release_trainers -> score_test + score_train -> fuse_and_report ->
register -> report_summary -> release_workers. The report (metrics, plots, every fusion side by side)
is in S3 and on the DAG run's "ESSP report" tab.

Each stage runs `essp stage NAME` as a local process (the embedded default) or as a pod
(ESSP_STAGE_MODE=kubernetes); the resident workers are local processes or the Deployments of k8s/.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context, task
from essp.operators.training import training_tasks

from essp.orchestration.params import TRAIN_PARAMS


def _param(meta: dict) -> Param:
    schema = {k: v for k, v in meta.items() if k not in ("default", "title", "description", "section")}
    return Param(meta["default"], title=meta["title"], description=meta["description"], section=meta["section"],
                 **schema)


@dag(
    dag_id="essp_train",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["essp", "training"],
    params={name: _param(meta) for name, meta in TRAIN_PARAMS.items()},
    doc_md=__doc__,
)
def essp_train():
    @task(multiple_outputs=True)
    def validate_params() -> dict:
        from essp.orchestration.params import validate_params as validate

        context = get_current_context()
        run = context["dag_run"]
        plan = validate(dict(context["params"]), dag_id=run.dag_id, dag_run_id=run.run_id)
        print(f"ESSP run {plan['run']}: streams {', '.join(plan['streams'])}, fusion {plan['spec']['fusion']}")
        return plan

    training_tasks(validate_params())


essp_train()
