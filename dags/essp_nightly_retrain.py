"""essp_nightly_retrain: every night, fine-tune the production model on the videos added since the
last successful retrain, and promote the result only if it beats production on the fixed test split.

detect_changes compares the videos bucket with the dataset's latest manifest, and that manifest with
the one the last successful retrain used; when nothing changed, `changed` short-circuits the rest
(the run is green, its tasks skipped). Otherwise refresh_manifest writes the next manifest version
(new videos go to train, the test split stays fixed), plan_finetune plans the run from production
(its params, fusion and checkpoints as the starting weights; `epochs` and `lr_scale` below), and the
same task groups as essp_train run it; register_model promotes only on a strict improvement, and
record_retrain remembers the manifest for the next night. The stages are essp.orchestration.nightly's.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task

from essp.lifecycle.params import NightlyParams
from essp.operators import training
from essp.operators.params import dag_docs, dag_params
from essp.operators.stage import DAG_RUN, EsspStageOperator

MANIFEST = "{{ ti.xcom_pull('refresh_manifest')['manifest'] }}"


@dag(
    dag_id="essp_nightly_retrain",
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["essp", "training", "nightly"],
    params=dag_params(NightlyParams),
    **dag_docs(__doc__),
)
def essp_nightly_retrain():
    detect = EsspStageOperator(task_id="detect_changes", stage_params={"registry": "{{ params.registry }}",
                                                                       "dag_run": DAG_RUN}, cpu="500m", memory="1Gi")

    @task.short_circuit(task_id="changed")
    def changed(found: dict) -> bool:
        print(found["reason"])
        return bool(found["changed"])

    refresh = EsspStageOperator(task_id="refresh_manifest",
                                stage_params={"manifest": "{{ ti.xcom_pull('detect_changes')['latest_manifest'] }}"},
                                cpu="1", memory="2Gi")
    plan = EsspStageOperator(task_id="plan_finetune", dag_params=True, multiple_outputs=True, cpu="250m",
                             memory="512Mi", stage_params={"manifest": MANIFEST, "dag_run": DAG_RUN})
    changed(detect.output) >> refresh >> plan
    prepared = training.prepare(plan.output)
    trained = training.train(plan.output)
    evaluated = training.evaluate(plan.output)
    registered = training.register(plan.output, evaluated)
    plan >> prepared.group >> trained >> evaluated.group >> registered.group
    record = EsspStageOperator(task_id="record_retrain", cpu="250m", memory="512Mi",
                               stage_params={"registry": "{{ params.registry }}", "manifest": MANIFEST},
                               xcom_params={**training.from_plan(plan.output, "run"),
                                            "registered": (registered.register_model.task_id, None)})
    registered.group >> record
    training.release_workers(plan.output, prepared, record)


essp_nightly_retrain()
