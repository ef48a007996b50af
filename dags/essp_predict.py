"""essp_predict: score new videos with the production model and its fusion; predictions to S3.

`prefix` is an s3:// URI or a key prefix in the videos bucket; every video under it is scored,
oldest first (25 snippets per stream, fused as the registered model was). A video that cannot be
read is listed with its error; the others are still scored. predictions.json and predictions.csv go
to s3://<runs bucket>/predictions/<registry>/<DAG run>/.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag
from essp.operators.stage import EsspStageOperator

from essp.orchestration.params import FUSIONS


@dag(
    dag_id="essp_predict",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["essp", "prediction"],
    params={
        "prefix": Param("incoming/", type="string", minLength=1, title="Videos",
                        description="s3://bucket/prefix/, or a key prefix in the videos bucket."),
        "registry": Param("", type="string", title="Model registry",
                          description="Empty: the only registry there is."),
        "version": Param(0, type="integer", minimum=0, title="Model version", description="0: production."),
        "fusion": Param("", type="string", enum=["", *FUSIONS], title="Fusion",
                        description="Empty: the registered model's fusion."),
        "limit": Param(0, type="integer", minimum=0, title="At most this many videos", description="0: all."),
        "top": Param(3, type="integer", minimum=1, maximum=100, title="Top classes per video"),
    },
    render_template_as_native_obj=True,
    doc_md=__doc__,
)
def essp_predict():
    EsspStageOperator(task_id="predict", stage="predict-prefix", cpu="2", memory="4Gi",
                      stage_params={"prefix": "{{ params.prefix }}", "registry": "{{ params.registry }}",
                                    "version": "{{ params.version }}", "fusion": "{{ params.fusion }}",
                                    "limit": "{{ params.limit }}", "top": "{{ params.top }}",
                                    "tag": "{{ run_id | replace(':', '') | replace('+', '-') | replace('.', '-') }}"})


essp_predict()
