"""The stage of the `essp_predict` DAG; the work is :func:`essp.lifecycle.predict.predict_prefix` (torch,
imported when the stage runs)."""

from __future__ import annotations

from typing import Any

from essp.errors import EsspError
from essp.lifecycle.params import PredictParams
from essp.orchestration.links import DagRun, save_dag_run_record
from essp.orchestration.stages import stage
from essp.settings import Settings


@stage
def predict_prefix(settings: Settings, params: PredictParams, tag: str,
                   dag_run: DagRun | None = None) -> dict[str, Any]:
    """Score every video under ``params.prefix`` with the production model and its fusion; predictions.json
    and predictions.csv to ``s3://<runs bucket>/predictions/<registry>/<tag>/``. With ``dag_run``
    (essp_predict's), what was scored (or why nothing was) is recorded for the DAG run's report tab."""
    from essp.lifecycle import predict

    try:
        done = predict.predict_prefix(settings, params, tag)
    except EsspError as exc:
        if dag_run is not None:
            save_dag_run_record(settings, dag_run.dag_id, dag_run.dag_run_id, error=str(exc))
        raise
    if dag_run is not None:
        save_dag_run_record(settings, dag_run.dag_id, dag_run.dag_run_id, predictions={"prefix": params.prefix, **done})
    return done
