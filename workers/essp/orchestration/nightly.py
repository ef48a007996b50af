"""The stages of the `essp_nightly_retrain` DAG, each named after its task; the work is in
:mod:`essp.lifecycle.nightly` (functions of the same names). Its training part is essp_train's
(:mod:`essp.orchestration.train`)."""

from __future__ import annotations

from typing import Any

from essp.lifecycle import nightly
from essp.lifecycle.params import NightlyParams
from essp.orchestration.links import DagRun, run_id_for, save_dag_run_record
from essp.orchestration.stages import stage
from essp.orchestration.train import plan_run
from essp.settings import Settings


@stage
def detect_changes(settings: Settings, registry: str, dag_run: DagRun | None = None) -> dict[str, Any]:
    """Whether the registry's dataset changed since the last successful retrain (``changed``, ``reason``);
    with ``dag_run``, a night with nothing to train is recorded for the DAG run's report tab, with the reason."""
    found = nightly.detect_changes(settings, registry)
    if dag_run is not None and not found["changed"]:
        save_dag_run_record(settings, dag_run.dag_id, dag_run.dag_run_id,
                            skipped={"registry": registry, "reason": found.get("reason") or "nothing changed"})
    return found


@stage
def refresh_manifest(settings: Settings, manifest: str) -> dict[str, Any]:
    """Write the next manifest version with the bucket's changes; returns its URI."""
    return nightly.refresh_manifest(settings, manifest)


@stage
def plan_finetune(settings: Settings, params: NightlyParams, manifest: str, dag_run: DagRun) -> dict[str, Any]:
    """The fine-tuning run of production on the refreshed ``manifest``, planned as essp_train's
    validate_params plans a run (``params``: the DAG run's params)."""
    spec, production = nightly.plan_finetune(settings, params, manifest, run_id_for(dag_run.dag_id,
                                                                                  dag_run.dag_run_id))
    print(f"Fine-tuning {params.registry} v{production.version} as run {spec.run_id()}")
    plan = plan_run(spec, dag_run)
    plan["finetunes"] = {"registry": params.registry, "version": production.version, "run": production.run}
    return plan


@stage
def record_retrain(settings: Settings, registry: str, manifest: str, run: str,
                   registered: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record a successful retrain: its manifest is what the next night compares with."""
    return nightly.record_retrain(settings, registry, manifest, run, registered)
