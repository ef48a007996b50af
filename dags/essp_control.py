"""essp_control: pause, resume or stop a running training run.

The command goes out on the control topic (and into the run's state in Redis, for workers that start
later); every decode and extract worker and the run's trainers obey it. A paused run's epoch waits
do not time out; a stopped run's trainers checkpoint where they are and its train tasks fail with
"stopped" (trigger essp_train again with the same `run` to resume). The same from a shell:
`essp control pause|resume|stop --run RUN`.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag
from essp.operators.stage import EsspStageOperator


@dag(
    dag_id="essp_control",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["essp", "control"],
    params={
        "run": Param("", type="string", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", title="Run id",
                     description="The ESSP run (shown by essp_train's validate_params and on its report tab)."),
        "command": Param("pause", type="string", enum=["pause", "resume", "stop"], title="Command"),
    },
    doc_md=__doc__,
)
def essp_control():
    EsspStageOperator(task_id="control", stage="control", cpu="100m", memory="256Mi",
                      stage_params={"run": "{{ params.run }}", "command": "{{ params.command }}"})


essp_control()
