"""Stages of the nightly retraining, prediction and control DAGs (`essp stage NAME`).

Nightly retraining (``essp_nightly_retrain``):

- ``nightly-detect``: has anything changed since the last successful retrain? The videos bucket is
  compared with the dataset's latest manifest (:func:`essp.datasets.refresh.find_changes`), and the latest
  manifest with the one the last successful retrain used (recorded by ``nightly-record`` in
  ``s3://<models bucket>/<registry>/nightly.json``; before the first, the production model's).
- ``dataset-refresh``: writes the next manifest version with the new videos (test split fixed).
- ``nightly-plan``: the fine-tuning run: production's params and fusion, its checkpoints as the
  pretrained weights, the refreshed manifest, fewer epochs and a smaller learning rate.
- ``nightly-record``: after the run registered, records its manifest as the last retrained one.

Prediction (``essp_predict``): ``predict-prefix`` scores the videos under a prefix, oldest first,
with the production models and fusion, and writes predictions.json and predictions.csv to S3.

Control (``essp_control``): ``control`` publishes pause / resume / stop of a run.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from essp.clients.s3 import ObjectNotFound, ObjectStore, S3Uri
from essp.datasets.manifest import ManifestStore
from essp.errors import EsspError
from essp.orchestration.stages import stage
from essp.settings import Settings

NIGHTLY_STATE = "nightly.json"
CONTROL_COMMANDS = ("pause", "resume", "stop")


def _need(params: dict[str, Any], name: str, kind: type = str) -> Any:
    value = params.get(name)
    if not isinstance(value, kind) or (isinstance(value, str) and not value):
        raise EsspError(f"stage params need {name!r} ({kind.__name__}), got {value!r}")
    return value


def _production(settings: Settings, registry: str) -> Any:
    from essp.lifecycle.model_registry import ModelRegistry

    return ModelRegistry(settings, registry).production()


def _state_key(registry: str) -> str:
    return f"{registry}/{NIGHTLY_STATE}"


def last_retrain(settings: Settings, registry: str) -> dict[str, Any] | None:
    try:
        return ObjectStore(settings).get_json(settings.bucket_models, _state_key(registry))
    except ObjectNotFound:
        return None


@stage("nightly-detect")
def detect_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Whether the registry's dataset changed since the last successful retrain (params: registry)."""
    from essp.datasets.refresh import find_changes

    registry = _need(params, "registry")
    production = _production(settings, registry)
    if production is None or not production.manifest:
        return {"changed": False, "registry": registry,
                "reason": f"registry {registry!r} has no production model to fine-tune: train one with essp_train "
                          "first (this DAG retrains production, it does not start from nothing)"}
    manifests = ManifestStore(settings)
    dataset = manifests.load(production.manifest).name
    latest_uri = manifests.resolve(dataset)
    state = last_retrain(settings, registry)
    base_uri = (state or {}).get("manifest") or production.manifest
    changes = find_changes(settings, latest_uri)
    manifest_moved = not manifests.load(latest_uri).same_content(manifests.load(base_uri))
    changed = bool(changes) or manifest_moved
    if bool(changes):
        reason = (f"{len(changes.added)} added, {len(changes.changed)} changed, {len(changes.removed)} removed "
                  f"video(s) in the bucket since {latest_uri}")
    elif manifest_moved:
        reason = f"the dataset's latest manifest {latest_uri} differs from {base_uri}, the last one retrained on"
    else:
        reason = f"no video added or changed since {base_uri} (production v{production.version})"
    return {"changed": changed, "reason": reason, "registry": registry, "dataset": dataset,
            "production_version": production.version, "latest_manifest": latest_uri, "base_manifest": base_uri,
            "bucket_changed": bool(changes), "changes": changes.as_dict()}


@stage("dataset-refresh")
def refresh_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Write the next manifest version with the bucket's changes (params: manifest); returns its URI."""
    from essp.datasets.refresh import refresh_manifest

    manifest, uri, changes = refresh_manifest(settings, _need(params, "manifest"))
    resolved = uri or ManifestStore(settings).resolve(_need(params, "manifest"))
    return {"manifest": resolved, "written": uri is not None, "version": manifest.version,
            "train_videos": len(manifest.split("train")), "test_videos": len(manifest.split("test")),
            "changes": changes.as_dict()}


@stage("nightly-plan")
def plan_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuning run of production on the refreshed manifest, planned for the training tasks
    (params: registry, manifest, epochs, lr_scale, samples_per_epoch, replicas, stop_data_workers,
    dag_id, dag_run_id)."""
    from essp.lifecycle.pipeline import parse_spec
    from essp.orchestration.links import run_id_for
    from essp.orchestration.params import plan_run, replicas_of

    registry = _need(params, "registry")
    production = _production(settings, registry)
    if production is None:
        raise EsspError(f"registry {registry!r} has no production model to fine-tune")
    dag_id, dag_run_id = _need(params, "dag_id"), _need(params, "dag_run_id")
    values = dict(production.params)
    values["streams"] = {name: {**stream, "pretrained": production.streams[name]}
                         for name, stream in values["streams"].items()}
    values.update(run=run_id_for(dag_id, dag_run_id), manifest=_need(params, "manifest"), registry=registry,
                  epochs=int(params.get("epochs") or 2), lr=float(values["lr"]) * float(params.get("lr_scale", 0.1)),
                  lr_steps=[], fusion=production.fusion["strategy"],
                  fusion_weights=production.fusion.get("weights") or values.get("fusion_weights"))
    if params.get("samples_per_epoch"):
        values["samples_per_epoch"] = int(params["samples_per_epoch"])
    spec = parse_spec(values)
    replicas = replicas_of(params, list(spec.streams))
    plan = plan_run(spec, replicas, stop_data_workers=bool(params.get("stop_data_workers")), dag_id=dag_id,
                    dag_run_id=dag_run_id)
    plan["finetunes"] = {"registry": registry, "version": production.version, "run": production.run}
    return plan


@stage("nightly-record")
def record_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Record a successful retrain: its manifest is what the next night compares with (params:
    registry, manifest, run, registered)."""
    store = ObjectStore(settings)
    store.ensure_bucket(settings.bucket_models)
    value = {"manifest": _need(params, "manifest"), "run": _need(params, "run"),
             "registered": params.get("registered") or {}}
    uri = store.put_json(settings.bucket_models, _state_key(_need(params, "registry")), value)
    return {"state": str(uri), **value}


# -- prediction ---------------------------------------------------------------------------------------
def _prefix_location(settings: Settings, prefix: str) -> tuple[str, str]:
    if prefix.startswith("s3://"):
        location = S3Uri.parse(prefix if "/" in prefix[5:] else prefix + "/")
        return location.bucket, location.key
    return settings.bucket_videos, prefix.lstrip("/")


@stage("predict-prefix")
def predict_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Score every video under ``prefix`` (an s3:// URI or a key prefix in the videos bucket), oldest
    first, with the production model of ``registry`` (or ``version``) and its fusion (or ``fusion``);
    write predictions.json and predictions.csv under ``s3://<runs bucket>/predictions/<registry>/<tag>/``
    (params: prefix, registry, version, fusion, limit, top, tag)."""
    from essp.datasets.ingest import VIDEO_EXTENSIONS
    from essp.lifecycle.predict import predict_videos, resolve_registry
    from essp.orchestration.links import run_id_for

    prefix = _need(params, "prefix")
    bucket, key_prefix = _prefix_location(settings, prefix)
    store = ObjectStore(settings)
    try:
        objects = [o for o in store.list_objects(bucket, key_prefix)
                   if "." + o.key.rsplit(".", 1)[-1].lower() in VIDEO_EXTENSIONS]
    except ObjectNotFound:
        raise EsspError(f"predict: bucket {bucket!r} of {prefix} does not exist") from None
    objects.sort(key=lambda o: (o.last_modified, o.key))  # in time order: oldest first
    limit = int(params.get("limit") or 0)
    if limit:
        objects = objects[:limit]
    if not objects:
        raise EsspError(f"predict: no video (extensions {', '.join(sorted(VIDEO_EXTENSIONS))}) under "
                        f"s3://{bucket}/{key_prefix}")
    sources = [(f"s3://{bucket}/{o.key}", store.get_bytes(bucket, o.key)) for o in objects]
    registry = resolve_registry(settings, params.get("registry") or None)
    result = predict_videos(settings, sources, registry=registry, version=params.get("version") or None,
                            fusion=params.get("fusion") or None, top=int(params.get("top") or 3))
    tag = params.get("tag") or run_id_for("predict", prefix)
    out_prefix = f"predictions/{registry}/{tag}"
    store.ensure_bucket(settings.bucket_runs)
    json_uri = store.put_json(settings.bucket_runs, f"{out_prefix}/predictions.json",
                              {**result, "prefix": prefix})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["video", "class", "score", "rank", "error", *[f"stream_{s}" for s in _streams(result)]])
    for video in result["videos"]:
        streams = [video.get("streams", {}).get(s, "") for s in _streams(result)]
        if "error" in video:
            writer.writerow([video["video"], "", "", "", video["error"], *streams])
            continue
        for rank, top in enumerate(video["top"], 1):
            writer.writerow([video["video"], top["class"], f"{top['score']:.6f}", rank, "", *streams])
    csv_uri = store.put_bytes(settings.bucket_runs, f"{out_prefix}/predictions.csv", buffer.getvalue().encode(),
                              content_type="text/csv; charset=utf-8")
    failed = [v["video"] for v in result["videos"] if "error" in v]
    return {"registry": registry, "version": result["version"], "fusion": result["fusion"],
            "videos": len(result["videos"]), "failed": failed, "json": str(json_uri), "csv": str(csv_uri)}


def _streams(result: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for video in result["videos"]:
        for stream in video.get("streams", {}):
            if stream not in names:
                names.append(stream)
    return names


# -- control ------------------------------------------------------------------------------------------
@stage("control")
def control_stage(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Pause, resume or stop a run: every worker and trainer of the run obeys (params: run, command)."""
    from essp.contract import check_run_id
    from essp.dataplane.resident import publish_control

    command = _need(params, "command")
    if command not in CONTROL_COMMANDS:
        raise EsspError(f"control: command {command!r} is not one of {', '.join(CONTROL_COMMANDS)}")
    try:
        run = check_run_id(_need(params, "run"))
    except ValueError as exc:
        raise EsspError(str(exc)) from None
    message = publish_control(settings, command, run=run)
    return {"run": run, "command": command, "sent": message.model_dump(mode="json")}
