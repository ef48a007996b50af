"""Nightly retraining: has anything changed since the last good retrain, the next manifest version, the
fine-tuning run of the production model, and remembering what was retrained on.

- :func:`detect_changes`: the videos bucket is compared with the dataset's latest manifest
  (:func:`essp.datasets.refresh.find_changes`), and that manifest with the one the last successful retrain
  used (recorded by :func:`record_retrain` in ``s3://<models bucket>/<registry>/nightly.json``; before the
  first, the production model's).
- :func:`refresh_manifest`: the next manifest version with the new videos (the test split stays fixed).
- :func:`plan_finetune`: the fine-tuning run's params: production's params and fusion, its checkpoints as
  the pretrained weights, the refreshed manifest, fewer epochs and a smaller learning rate.
- :func:`record_retrain`: after the run registered, its manifest is what the next night compares with.
"""

from __future__ import annotations

from typing import Any

from essp.clients.s3 import ObjectNotFound, ObjectStore
from essp.datasets.manifest import ManifestStore
from essp.datasets.refresh import find_changes
from essp.datasets.refresh import refresh_manifest as write_next_manifest
from essp.errors import EsspError
from essp.lifecycle.model_registry import ModelRegistry, ModelVersion
from essp.lifecycle.params import NightlyParams, RunParams, parse_params, upgrade_stored
from essp.settings import Settings

NIGHTLY_STATE = "nightly.json"


def _state_key(registry: str) -> str:
    return f"{registry}/{NIGHTLY_STATE}"


def production_model(settings: Settings, registry: str) -> ModelVersion | None:
    return ModelRegistry(settings, registry).production()


def last_retrain(settings: Settings, registry: str) -> dict[str, Any] | None:
    """What :func:`record_retrain` last wrote for ``registry``, or None before the first retrain."""
    try:
        return ObjectStore(settings).get_json(settings.bucket_models, _state_key(registry))
    except ObjectNotFound:
        return None


def detect_changes(settings: Settings, registry: str) -> dict[str, Any]:
    """Whether the registry's dataset changed since the last successful retrain, and why (small JSON)."""
    production = production_model(settings, registry)
    if production is None or not production.manifest:
        return {"changed": False, "registry": registry,
                "reason": f"registry {registry!r} has no production model to fine-tune: train one with essp_train "
                          "first (this DAG retrains production, it does not start from nothing)"}
    manifests = ManifestStore(settings)
    dataset = manifests.load(production.manifest).name
    latest_uri = manifests.resolve(dataset)
    base_uri = (last_retrain(settings, registry) or {}).get("manifest") or production.manifest
    changes = find_changes(settings, latest_uri)
    manifest_moved = not manifests.load(latest_uri).same_content(manifests.load(base_uri))
    if changes:
        reason = (f"{len(changes.added)} added, {len(changes.changed)} changed, {len(changes.removed)} removed "
                  f"video(s) in the bucket since {latest_uri}")
    elif manifest_moved:
        reason = f"the dataset's latest manifest {latest_uri} differs from {base_uri}, the last one retrained on"
    else:
        reason = f"no video added or changed since {base_uri} (production v{production.version})"
    return {"changed": bool(changes) or manifest_moved, "reason": reason, "registry": registry, "dataset": dataset,
            "production_version": production.version, "latest_manifest": latest_uri, "base_manifest": base_uri,
            "bucket_changed": bool(changes), "changes": changes.as_dict()}


def refresh_manifest(settings: Settings, manifest: str) -> dict[str, Any]:
    """Write the next manifest version with the bucket's changes; returns its URI and counts."""
    refreshed, uri, changes = write_next_manifest(settings, manifest)
    resolved = uri or ManifestStore(settings).resolve(manifest)
    return {"manifest": resolved, "written": uri is not None, "version": refreshed.version,
            "train_videos": len(refreshed.split("train")), "test_videos": len(refreshed.split("test")),
            "changes": changes.as_dict()}


def plan_finetune(settings: Settings, params: NightlyParams, manifest: str, run: str) -> tuple[RunParams, ModelVersion]:
    """The fine-tuning run of the registry's production model on ``manifest``, and that model."""
    production = production_model(settings, params.registry)
    if production is None:
        raise EsspError(f"registry {params.registry!r} has no production model to fine-tune")
    values = upgrade_stored(dict(production.params))
    values.pop("preset", None)  # its values are in the params already; it must not refill lr_steps=[] below
    values.update(run=run, dataset=manifest, registry=params.registry, epochs=params.epochs,
                  lr=float(values.get("lr", 0.01)) * params.lr_scale, lr_steps=[],
                  pretrained=dict(production.streams), fusion=production.fusion["strategy"],
                  fusion_weights=production.fusion.get("weights") or values.get("fusion_weights"),
                  replicas=dict(params.replicas), stop_data_workers=params.stop_data_workers)
    if params.samples_per_epoch:
        values["samples_per_epoch"] = params.samples_per_epoch
    return parse_params(values), production


def record_retrain(settings: Settings, registry: str, manifest: str, run: str,
                   registered: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record a successful retrain: its manifest is what the next night compares with."""
    store = ObjectStore(settings)
    store.ensure_bucket(settings.bucket_models)
    value = {"manifest": manifest, "run": run, "registered": registered or {}}
    uri = store.put_json(settings.bucket_models, _state_key(registry), value)
    return {"state": str(uri), **value}
