"""essp_train: train a two-stream video classifier on a dataset, through the resident workers.

Trigger it from the UI (the form shows every param with its description; its schema comes from
essp.lifecycle.params.RunParams), the REST API or `airflow dags trigger essp_train --conf
'{"fusion": "max", ...}'`. Airflow refuses a value outside a param's schema when the run is created;
`validate_params` refuses what one param alone cannot say (e.g. `fusion: weighted` without
`fusion_weights`, or a weight missing for one of the `streams`), naming the param: the task fails with that
one line, no traceback (the DAG run's note too, with the ESSP plugin's listener: essp.operators.refusal).

Each task runs the stage of its own name (`essp stage verify-manifest` for verify_manifest, the function
essp.orchestration.train.verify_manifest) as a local process (the embedded default) or as a pod
(ESSP_STAGE_MODE=kubernetes); the resident workers are local processes or the Deployments of k8s/. The
report (metrics, plots, every fusion side by side) is in S3 and on the DAG run's "ESSP report" tab.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, get_current_context, task

from essp.lifecycle.params import RunParams
from essp.operators import training
from essp.operators.params import dag_docs, dag_params


@dag(
    dag_id="essp_train",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["essp", "training"],
    params=dag_params(RunParams),
    **dag_docs(__doc__),
)
def essp_train():
    @task(multiple_outputs=True)
    def validate_params() -> dict:
        from essp.operators.refusal import refusing
        from essp.orchestration.train import validate_params as validate

        context = get_current_context()
        run = context["dag_run"]
        with refusing(context):  # a bad param, or a run another DAG run trains: one line, no traceback
            plan = validate(dict(context["params"]), dag_id=run.dag_id, dag_run_id=run.run_id)
            claimed = training.claim_run(context, plan)  # one DAG run at a time trains a run
        print(f"ESSP run {plan['run']}: streams {', '.join(plan['streams'])}, fusion {plan['spec']['fusion']}; "
              f"claimed by this DAG run ({claimed['claimed']})")
        return plan

    plan = validate_params()
    prepared = training.prepare(plan)            # verify_manifest -> ensure_workers
    trained = training.train(plan)               # train (per stream, deferring each epoch) -> release_trainers
    evaluated = training.evaluate(plan)          # score_test, score_val -> fuse_and_report
    registered = training.register(plan, evaluated)  # register_model -> report_summary
    plan >> prepared.group >> trained >> evaluated.group >> registered.group
    training.release_workers(plan, prepared, registered.summary)  # teardown, however the run ended


essp_train()
