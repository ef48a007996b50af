"""The steps of a training run as stages (`essp stage NAME`): what the `essp_train` DAG's tasks run,
as local processes or pods. Each takes small JSON params and returns small JSON (URIs, metrics);
everything large stays in S3 under the run's folder (see essp.training.artifacts)."""

from __future__ import annotations

from typing import Any

from essp.errors import EsspError
from essp.orchestration.stages import stage
from essp.settings import Settings
from essp.training.epochs import load_run, prepare_run
from essp.training.params import parse_spec

# The stages that run models import essp.lifecycle.pipeline (torch) when they run, so that the others (prepare,
# ensure, release) start in a fraction of a second.


def _run(params: dict[str, Any]) -> str:
    run = params.get("run")
    if not isinstance(run, str) or not run:
        raise EsspError(f"stage params need the run id as 'run', got {params!r}")
    return run


@stage("train-prepare")
def prepare_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Validate the run's params against its manifest and write spec.json (params: a RunSpec, plus
    optionally ``airflow``: {dag_id, dag_run_id}, recorded so that the UI finds the run's report)."""
    params = dict(params)
    airflow = params.pop("airflow", None)
    spec = parse_spec(params)
    facts = prepare_run(settings, spec)
    if airflow:
        from essp.orchestration.links import save_link

        save_link(settings, airflow["dag_id"], airflow["dag_run_id"], spec.run)
    out = {key: facts[key] for key in ("manifest_uri", "dataset", "classes", "train_videos", "test_videos",
                                       "samples_per_epoch")}
    return {"run": spec.run, "streams": list(spec.streams), **out}


@stage("workers-ensure")
def ensure_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Scale the shared data workers to ``replicas`` ({kind: n}) and start the run's trainers (params:
    run, replicas, trainer_procs, gpus)."""
    from essp.deploy.fleet import ensure_workers

    spec, _ = load_run(settings, _run(params))
    replicas = params.get("replicas") or {}
    if not isinstance(replicas, dict):
        raise EsspError(f"workers-ensure: 'replicas' must map worker kinds to counts, got {replicas!r}")
    return ensure_workers(settings, spec.run, list(spec.streams), replicas, trainer_procs=spec.trainer_procs,
                          gpus=bool(params.get("gpus", settings.k8s_trainer_gpus and spec.device != "cpu")))


@stage("workers-release")
def release_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Stop the run's trainers (their checkpoints are in S3); with ``data_workers`` ({kind: n}) also
    scale the shared data workers (params: run, streams, data_workers)."""
    from essp.deploy.fleet import release_workers

    streams = params.get("streams")
    if not streams:
        streams = list(load_run(settings, _run(params))[0].streams)
    return release_workers(settings, _run(params), list(streams), data_workers=params.get("data_workers") or None)


@stage("train-epoch")
def epoch_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Plan, publish and train one epoch on every stream (params: run, epoch); resident trainers must run."""
    spec, _ = load_run(settings, _run(params))
    if not isinstance(params.get("epoch"), int) or params["epoch"] < 0:
        raise EsspError(f"train-epoch needs 'epoch' as an integer >= 0, got {params.get('epoch')!r}")
    from essp.lifecycle.pipeline import train_epoch

    return {"epoch": params["epoch"], "streams": train_epoch(settings, spec, params["epoch"])}


@stage("train-score")
def score_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Score every video of a split per stream (params: run, split = test | train)."""
    spec, _ = load_run(settings, _run(params))
    from essp.lifecycle.pipeline import score_split

    split = params.get("split", "test")
    return {"split": split, "scores": score_split(settings, spec, split)}


@stage("train-fuse-report")
def fuse_report_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Every fusion side by side, the requested one kept, the report written (params: run)."""
    spec, _ = load_run(settings, _run(params))
    from essp.lifecycle.pipeline import fuse_and_report

    outcome = fuse_and_report(settings, spec)
    metrics = {k: outcome["metrics"][k] for k in ("videos", "top1", "top5", "mean_class_accuracy", "mAP")}
    return {"run": spec.run, "selected": outcome["selected"], "metrics": metrics,
            "fusion_state": outcome["fusion_state"], "report": outcome["report"]["report.json"],
            "summary": outcome["summary"]}


@stage("train-register")
def register_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Register the run's model, promoted only if better (params: run, and either ``fused`` (the result
    of train-fuse-report) or its ``metrics`` and ``fusion_state``)."""
    spec, _ = load_run(settings, _run(params))
    fused = params.get("fused") or params
    if not isinstance(fused.get("metrics"), dict) or not fused.get("fusion_state"):
        raise EsspError("train-register needs 'metrics' and 'fusion_state' (the result of train-fuse-report)")
    from essp.lifecycle.pipeline import register_run

    return {"run": spec.run, **register_run(settings, spec, fused["metrics"], fusion_state=fused["fusion_state"])}
