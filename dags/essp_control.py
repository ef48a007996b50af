"""essp_control: pause, resume or stop a running training run.

The command goes out on the control topic (and into the run's state in Redis, for workers that start
later); every decode and extract worker and the run's trainers obey it. A paused run's epoch waits
do not time out; a stopped run's trainers checkpoint where they are and its train tasks fail with
"stopped" (trigger essp_train again with the same `run` to resume). The same from a shell:
`essp control pause|resume|stop --run RUN`. The task refuses a run that does not exist (a typo'd id:
it names the closest runs) and one that has finished, says so when the run is already in that state,
and otherwise logs the run's state after the command in words (a stop waits up to 20 s for the run's
live trainers to confirm). The task runs the stage control-run
(essp.orchestration.control.control_run); the params are essp.lifecycle.params.ControlParams.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from essp.lifecycle.params import ControlParams
from essp.operators.params import dag_docs, dag_params
from essp.operators.stage import DAG_RUN, EsspStageOperator


@dag(
    dag_id="essp_control",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["essp", "control"],
    params=dag_params(ControlParams),
    **dag_docs(__doc__),
)
def essp_control():
    EsspStageOperator(task_id="control_run", dag_params=True, cpu="100m", memory="256Mi",
                      stage_params={"dag_run": DAG_RUN})


essp_control()
