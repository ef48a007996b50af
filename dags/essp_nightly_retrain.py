"""essp_nightly_retrain: every night, fine-tune the production model on the videos added since the
last successful retrain, and promote the result only if it beats production on the fixed test split.

detect_changes compares the videos bucket with the dataset's latest manifest, and that manifest with
the one the last successful retrain used; when nothing changed, `changed` short-circuits the rest
(the run is green, its tasks skipped). Otherwise refresh_manifest writes the next manifest version
(new videos go to train, the test split stays fixed), plan_finetune builds the run from production
(its params, fusion and checkpoints as the starting weights; `epochs` and `lr_scale` below), and the
same training tasks as essp_train run it; register promotes only on a strict improvement, and
record_retrain remembers the manifest for the next night.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task
from essp.operators.stage import EsspStageOperator
from essp.operators.training import training_tasks

from essp.orchestration.params import DEFAULT_REPLICAS

MANIFEST = "{{ ti.xcom_pull('refresh_manifest')['manifest'] }}"


@dag(
    dag_id="essp_nightly_retrain",
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["essp", "training", "nightly"],
    params={
        "registry": Param("synth-demo", type="string", minLength=1, title="Model registry",
                          description="The registry whose production model is fine-tuned; its dataset is the one "
                                      "checked for new videos."),
        "epochs": Param(2, type="integer", minimum=1, maximum=1000, title="Fine-tuning epochs"),
        "lr_scale": Param(0.1, type="number", exclusiveMinimum=0, maximum=1, title="Learning-rate scale",
                          description="Fine-tuning starts at production's learning rate times this."),
        "samples_per_epoch": Param(0, type="integer", minimum=0, title="Samples per epoch",
                                   description="0: production's setting."),
        "replicas": Param(dict(DEFAULT_REPLICAS), type="object", title="Worker replicas",
                          additionalProperties={"type": "integer", "minimum": 0, "maximum": 256}),
        "stop_data_workers": Param(False, type="boolean", title="Stop data workers at the end"),
    },
    doc_md=__doc__,
)
def essp_nightly_retrain():
    detect = EsspStageOperator(task_id="detect_changes", stage="nightly-detect",
                               stage_params={"registry": "{{ params.registry }}"}, cpu="500m", memory="1Gi")

    @task.short_circuit(task_id="changed")
    def changed(found: dict) -> bool:
        print(found["reason"])
        return bool(found["changed"])

    refresh = EsspStageOperator(task_id="refresh_manifest", stage="dataset-refresh",
                                stage_params={"manifest": "{{ ti.xcom_pull('detect_changes')['latest_manifest'] }}"},
                                cpu="1", memory="2Gi")
    plan_stage = EsspStageOperator(task_id="plan_finetune_stage", stage="nightly-plan", cpu="250m", memory="512Mi",
                                   stage_params={"registry": "{{ params.registry }}",
                                                 "manifest": MANIFEST,
                                                 "epochs": "{{ params.epochs }}", "lr_scale": "{{ params.lr_scale }}",
                                                 "samples_per_epoch": "{{ params.samples_per_epoch }}",
                                                 "replicas": "{{ params.replicas }}",
                                                 "stop_data_workers": "{{ params.stop_data_workers }}",
                                                 "dag_id": "{{ dag.dag_id }}", "dag_run_id": "{{ run_id }}"})

    @task(task_id="plan_finetune", multiple_outputs=True)
    def plan_finetune(plan: dict) -> dict:
        print(f"Fine-tuning {plan['finetunes']['registry']} v{plan['finetunes']['version']} as run {plan['run']}")
        return plan

    plan = plan_finetune(plan_stage.output)
    tasks = training_tasks(plan)
    record = EsspStageOperator(task_id="record_retrain", stage="nightly-record", cpu="250m", memory="512Mi",
                               stage_params={"registry": "{{ params.registry }}", "manifest": MANIFEST,
                                             "run": plan["run"]})
    changed(detect.output) >> refresh >> plan_stage
    plan >> tasks.first
    tasks.register >> record


essp_nightly_retrain()
