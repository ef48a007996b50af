"""essp_predict: score new videos with the production model and its fusion; predictions to S3.

`prefix` is an s3:// URI or a key prefix in the videos bucket; every video under it is scored,
oldest first (25 snippets per stream, fused as the registered model was). A video that cannot be
read is listed with its error; the others are still scored. predictions.json and predictions.csv go
to `s3://<runs bucket>/predictions/<registry>/<DAG run>/`. The task runs the stage predict-prefix
(essp.orchestration.predict.predict_prefix); the params are essp.lifecycle.params.PredictParams.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from essp.lifecycle.params import PredictParams
from essp.operators.params import dag_docs, dag_params
from essp.operators.stage import DAG_RUN, EsspStageOperator


@dag(
    dag_id="essp_predict",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["essp", "prediction"],
    params=dag_params(PredictParams),
    render_template_as_native_obj=True,
    **dag_docs(__doc__),
)
def essp_predict():
    EsspStageOperator(task_id="predict_prefix", dag_params=True, cpu="2", memory="4Gi",
                      stage_params={"tag": "{{ run_id | replace(':', '') | replace('+', '-') | replace('.', '-') }}",
                                    "dag_run": DAG_RUN})


essp_predict()
