"""The stages of a training run, as the `essp_train` and `essp_nightly_retrain` DAGs run them: each
function has its task's name (task ``verify_manifest`` -> stage ``verify-manifest`` -> :func:`verify_manifest`)
and takes small JSON params, typed; everything large stays in S3 under the run's folder.

validate_params (a Python task: the run's params checked, its id fixed) -> verify_manifest ->
ensure_workers -> train (the operator essp.operators.training.TrainStreamOperator, one task per stream,
deferring between epochs) -> release_trainers -> score_test, score_val -> fuse_and_report ->
register_model -> report_summary (a Python task) ; release_workers at the end, however the run ended.
The stages that run models import torch (essp.lifecycle.pipeline) when they run, so that the others
start in a fraction of a second.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from essp.deploy import fleet
from essp.errors import EsspError, UserError
from essp.evaluation.metrics import SUMMARY_METRICS
from essp.lifecycle import epochs
from essp.lifecycle.allocation import current_slots
from essp.lifecycle.claims import release_run
from essp.lifecycle.params import RunParams, parse_params
from essp.orchestration.links import DagRun, run_id_for, save_link
from essp.orchestration.stages import stage
from essp.settings import Settings


class Fused(BaseModel):
    """What :func:`fuse_and_report` returns and :func:`register_model` needs of it."""

    run: str
    metrics: dict[str, Any]
    fusion_state: str


def validate_params(params: dict[str, Any], *, dag_id: str, dag_run_id: str) -> dict[str, Any]:
    """The DAG run's params checked (errors name the param) and its run id fixed (the ``run`` param, else one
    derived from the DAG run): what the DAG's tasks take, as small JSON."""
    spec = parse_params(dict(params))
    if spec.run is None:
        spec = spec.model_copy(update={"run": run_id_for(dag_id, dag_run_id)})
    return plan_run(spec, DagRun(dag_id=dag_id, dag_run_id=dag_run_id))


def plan_run(spec: RunParams, dag_run: DagRun) -> dict[str, Any]:
    """A checked run as the training tasks take it: its id, its streams (the train task is mapped over
    them), its params (verify_manifest writes them to spec.json) and its DAG run."""
    return {"run": spec.run_id(), "streams": list(spec.streams), "spec": spec.model_dump(mode="json"),
            "dag_run": dag_run.model_dump()}


@stage
def verify_manifest(settings: Settings, spec: RunParams, dag_run: DagRun | None = None) -> dict[str, Any]:
    """Check the run's params against its manifest and write spec.json; record the DAG run that drives it."""
    facts = epochs.verify_manifest(settings, spec)
    if dag_run is not None:
        save_link(settings, dag_run.dag_id, dag_run.dag_run_id, spec.run_id())
    out = {key: facts[key] for key in ("manifest_uri", "dataset", "classes", "train_videos", "test_videos",
                                       "samples_per_epoch")}
    return {"run": spec.run_id(), "streams": list(spec.streams), **out}


@stage
def ensure_workers(settings: Settings, run: str, gpus: bool | None = None) -> dict[str, Any]:
    """Scale the shared data workers to the run's ``replicas`` and start its trainers (a GPU each in
    Kubernetes unless the run's device is the CPU or ``gpus`` is false)."""
    spec, _ = epochs.load_run(settings, run)
    wanted = settings.k8s_trainer_gpus and spec.device != "cpu" if gpus is None else gpus
    # a resumed run whose slots moved (essp.lifecycle.allocation) starts each trainer with its own
    return fleet.ensure_workers(settings, run, spec.streams, spec.workers(),
                                trainer_procs=current_slots(settings, spec),
                                gpus=wanted)


@stage
def release_trainers(settings: Settings, run: str) -> dict[str, Any]:
    """Stop the run's trainers (their checkpoints are in S3), so that scoring has the cores."""
    spec, _ = epochs.load_run(settings, run)
    return fleet.release_trainers(settings, run, spec.streams)


@stage
def release_workers(settings: Settings, run: str, dag_run: DagRun | None = None) -> dict[str, Any]:
    """The teardown: stop the run's trainers and, with the run's ``stop_data_workers``, the shared data
    workers too; then give the run's claim back if ``dag_run`` holds it (essp.lifecycle.claims)."""
    spec, _ = epochs.load_run(settings, run)
    stop = {kind: 0 for kind in spec.workers()} if spec.stop_data_workers else None
    released = fleet.release_workers(settings, run, spec.streams, data_workers=stop)
    if dag_run is not None:
        released["claim_released"] = release_run(settings, run, f"{dag_run.dag_id}/{dag_run.dag_run_id}")
    return released


@stage
def train_epoch(settings: Settings, run: str, epoch: int) -> dict[str, Any]:
    """Plan, publish and train one epoch on every stream, blocking (a run's step for a shell or a custom DAG;
    essp_train defers instead); the resident trainers must run."""
    if epoch < 0:
        raise EsspError(f"train-epoch needs 'epoch' as an integer >= 0, got {epoch!r}")
    from essp.lifecycle.pipeline import train_epoch as train

    spec, _ = epochs.load_run(settings, run)
    return {"epoch": epoch, "streams": train(settings, spec, epoch)}


@stage
def score_test(settings: Settings, run: str) -> dict[str, Any]:
    """Score every test video per stream with its final checkpoint."""
    return _score(settings, run, "test")


@stage
def score_val(settings: Settings, run: str) -> dict[str, Any]:
    """Score every validation video per stream (what the learned fusions are fitted on)."""
    return _score(settings, run, "val")


def _score(settings: Settings, run: str, split: str) -> dict[str, Any]:
    from essp.lifecycle.pipeline import score_split

    spec, _ = epochs.load_run(settings, run)
    # release_trainers runs however training ended, so the scoring after it must check: a run stopped (or
    # failed) part way is not scored, fused or registered as if it were trained
    done = epochs.trained_epochs(settings, spec)
    if done < spec.epochs and epochs.early_stopped(settings, run) is None:
        raise UserError(f"run {run} has trained {done} of its {spec.epochs} epochs (stopped, or a stream failed): "
                        "it is not scored; trigger essp_train again with the same run to go on")
    return {"split": split, "scores": score_split(settings, spec, split)}


@stage
def fuse_and_report(settings: Settings, run: str) -> dict[str, Any]:
    """Every fusion side by side, the requested one kept, the report written."""
    from essp.lifecycle import pipeline

    spec, _ = epochs.load_run(settings, run)
    outcome = pipeline.fuse_and_report(settings, spec)
    metrics = {k: outcome["metrics"][k] for k in ("videos", *SUMMARY_METRICS)}
    return {"run": run, "selected": outcome["selected"], "metrics": metrics,
            "fusion_state": outcome["fusion_state"], "report": outcome["report"]["report.json"],
            "summary": outcome["summary"]}


@stage
def register_model(settings: Settings, run: str, fused: Fused) -> dict[str, Any]:
    """Register the run's model (``fused``: what fuse_and_report returned), promoted only if better."""
    from essp.lifecycle import pipeline

    spec, _ = epochs.load_run(settings, run)
    return {"run": run, **pipeline.register_model(settings, spec, fused.metrics, fusion_state=fused.fusion_state)}


def report_summary(settings: Settings, fused: dict[str, Any], registered: dict[str, Any]) -> list[str]:
    """The lines the report_summary task logs: the report's summary and what the registry did."""
    from essp.evaluation.report import read_report, summary_lines

    report = read_report(settings, fused["run"])
    outcome = "promoted to production" if registered["promoted"] else "not promoted"
    return [f"ESSP report of run {fused['run']}: {fused['report']}",
            *(f"  {line}" for line in summary_lines(report)),
            f"  registry {registered['registry']} v{registered['version']}: {outcome} ({registered['reason']})"]
