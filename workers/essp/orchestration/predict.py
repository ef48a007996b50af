"""The stage of the `essp_predict` DAG; the work is :func:`essp.lifecycle.predict.predict_prefix` (torch,
imported when the stage runs)."""

from __future__ import annotations

from typing import Any

from essp.lifecycle.params import PredictParams
from essp.orchestration.stages import stage
from essp.settings import Settings


@stage
def predict_prefix(settings: Settings, params: PredictParams, tag: str) -> dict[str, Any]:
    """Score every video under ``params.prefix`` with the production model and its fusion; predictions.json
    and predictions.csv to ``s3://<runs bucket>/predictions/<registry>/<tag>/``."""
    from essp.lifecycle import predict

    return predict.predict_prefix(settings, params, tag)
