"""essp_smoke: round-trip a message through Kafka, a payload through Redis and an object through S3.

Each check is the stage of its task's name (smoke_kafka: essp.orchestration.smoke.smoke_kafka), run by
the project's stage operator (a local process by default, a pod with ESSP_STAGE_MODE=kubernetes); the
last task gathers their small JSON results.
"""

from __future__ import annotations

import json

import pendulum
from airflow.sdk import dag, task

from essp.operators.params import dag_docs
from essp.operators.stage import EsspStageOperator


@dag(
    dag_id="essp_smoke",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["essp", "smoke"],
    **dag_docs(__doc__),
)
def essp_smoke():
    checks = [
        EsspStageOperator(task_id=f"smoke_{service}",
                          stage_params={"token": "{{ run_id | replace(':', '') | replace('+', '') }}-" + service},
                          cpu="250m", memory="512Mi")
        for service in ("kafka", "redis", "s3")
    ]

    @task
    def summary(kafka: dict, redis: dict, s3: dict) -> dict:
        results = {"kafka": kafka, "redis": redis, "s3": s3}
        for name, result in results.items():
            print(f"{name:<6} round trip {result['round_trip_ms']:>8.2f} ms  {result}")
        summary = {name: result["round_trip_ms"] for name, result in results.items()}
        print("ESSP_SUMMARY " + json.dumps(summary))
        return summary

    summary(*(check.output for check in checks))


essp_smoke()
