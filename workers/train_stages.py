"""The steps of a training run as stages (`essp stage NAME`): what the `essp_train` DAG's tasks run,
as local processes or pods. Each takes small JSON params and returns small JSON (URIs, metrics);
everything large stays in S3 under the run's folder (see essp.runstore)."""

from __future__ import annotations

from typing import Any

from essp.errors import EsspError
from essp.settings import Settings
from essp.stages import stage
from essp.training import (
    fuse_and_report,
    load_run,
    parse_spec,
    prepare_run,
    register_run,
    score_split,
    train_epoch,
)


def _run(params: dict[str, Any]) -> str:
    run = params.get("run")
    if not isinstance(run, str) or not run:
        raise EsspError(f"stage params need the run id as 'run', got {params!r}")
    return run


@stage("train-prepare")
def prepare_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Validate the run's params against its manifest and write spec.json (params: a RunSpec)."""
    facts = prepare_run(settings, parse_spec(params))
    return {key: facts[key] for key in ("manifest_uri", "dataset", "classes", "train_videos", "test_videos",
                                        "samples_per_epoch")}


@stage("train-epoch")
def epoch_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Plan, publish and train one epoch on every stream (params: run, epoch); resident trainers must run."""
    spec, _ = load_run(settings, _run(params))
    if not isinstance(params.get("epoch"), int) or params["epoch"] < 0:
        raise EsspError(f"train-epoch needs 'epoch' as an integer >= 0, got {params.get('epoch')!r}")
    return {"epoch": params["epoch"], "streams": train_epoch(settings, spec, params["epoch"])}


@stage("train-score")
def score_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Score every video of a split per stream (params: run, split = test | train)."""
    spec, _ = load_run(settings, _run(params))
    split = params.get("split", "test")
    return {"split": split, "scores": score_split(settings, spec, split)}


@stage("train-fuse-report")
def fuse_report_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Every fusion side by side, the requested one kept, the report written (params: run)."""
    spec, _ = load_run(settings, _run(params))
    outcome = fuse_and_report(settings, spec)
    metrics = {k: outcome["metrics"][k] for k in ("videos", "top1", "top5", "mean_class_accuracy", "mAP")}
    return {"selected": outcome["selected"], "metrics": metrics, "fusion_state": outcome["fusion_state"],
            "report": outcome["report"]["report.json"], "summary": outcome["summary"]}


@stage("train-register")
def register_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Register the run's model, promoted only if better (params: run, metrics, fusion_state from
    train-fuse-report)."""
    spec, _ = load_run(settings, _run(params))
    if not isinstance(params.get("metrics"), dict) or not params.get("fusion_state"):
        raise EsspError("train-register needs 'metrics' and 'fusion_state' (the result of train-fuse-report)")
    return register_run(settings, spec, params["metrics"], fusion_state=params["fusion_state"])
