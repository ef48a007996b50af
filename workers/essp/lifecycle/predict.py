"""Prediction with a registered model: per-stream snippet scores, then the model's fusion.

:func:`predict_videos` is what `essp predict` runs: videos given as bytes are probed, decoded and
turned into features in this process with the workers' own code (nothing on disk), scored by each
stream's checkpoint and fused with the registered strategy (or a fixed one given instead). A video
that cannot be read, probed or decoded gets an error naming it and the cause; the others are still
scored. :func:`read_videos` reads what `essp predict` is given: files, folders of videos, s3:// URIs.
:func:`predict_prefix` is the `essp_predict` DAG's work: every video under a prefix, predictions to S3.
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from essp.clients.s3 import ObjectNotFound, ObjectStore, S3Uri
from essp.datasets.video import VideoError, probe_video
from essp.errors import UserError
from essp.evaluation.fusion import Fuser, make_fuser
from essp.evaluation.scoring import ScoredVideo, score_local
from essp.lifecycle.model_registry import ModelRegistry, ModelVersion, registry_names
from essp.lifecycle.params import PredictParams, RunParams, parse_params
from essp.lifecycle.pipeline import stream_scores
from essp.settings import Settings
from essp.training.artifacts import load_checkpoint_uri
from essp.training.models import build_model


class PredictionError(UserError):
    """No model to predict with, a fusion that cannot be used, no video under the prefix: what to change is the
    message (a task it fails shows that one line)."""


def resolve_registry(settings: Settings, registry: str | None) -> str:
    """The registry named, or the only one that has a production model."""
    if registry:
        return registry
    names = registry_names(settings)
    if len(names) == 1:
        return names[0]
    if not names:
        raise PredictionError("no model registry has a production model yet: train one (`essp train` / the "
                              "essp_train DAG)")
    raise PredictionError(f"registry: several registries have a production model ({', '.join(names)}): name one "
                          "(the `registry` param of essp_predict, --registry of `essp predict`)")


def resolve_model(settings: Settings, registry: str, version: int | None) -> ModelVersion:
    models = ModelRegistry(settings, registry)
    if version is not None:
        return models.get(version)
    production = models.production()
    if production is None:
        raise PredictionError(f"model registry {registry!r} has no production model yet: train one "
                              "(`essp train` / the essp_train DAG) or name a --version")
    return production


def load_models(settings: Settings, model: ModelVersion) -> dict[str, torch.nn.Module]:
    """Each stream's network with its registered checkpoint, in eval mode."""
    loaded = {}
    for stream, uri in model.streams.items():
        state = load_checkpoint_uri(settings, uri)
        net = build_model(state["arch"], stream, num_classes=int(state["num_classes"]), length=int(state["length"]))
        net.load_state_dict(state["model"])
        loaded[stream] = net.eval()
    return loaded


def load_fuser(settings: Settings, model: ModelVersion, strategy: str | None) -> tuple[str, Fuser]:
    """The registered fuser (fitted state from S3), or a fixed strategy asked for instead."""
    registered = model.fusion.get("strategy", "average")
    if strategy is None or strategy == registered:
        state_uri = model.fusion.get("state")
        if state_uri:
            location = S3Uri.parse(state_uri)
            saved = ObjectStore(settings).get_json(location.bucket, location.key)
            return registered, Fuser.from_state(saved["state"])
        strategy = registered
    if strategy in ("learned", "sequence"):
        raise PredictionError(f"fusion {strategy!r} must be fitted on the training videos; model v{model.version} "
                              f"was registered with {registered!r}: use that, or a fixed strategy "
                              "(average, weighted, max, product)")
    weights = model.fusion.get("weights") if strategy == "weighted" else None
    if strategy == "weighted" and not weights:
        weights = {stream: 1.0 for stream in model.streams}
    return strategy, make_fuser(strategy, weights=weights, num_classes=len(model.class_names))


def read_videos(settings: Settings, names: list[str]) -> list[tuple[str, bytes | VideoError]]:
    """The videos `essp predict` is given, in order: a file, every video file under a folder (by their video
    extensions, sorted), an s3:// object. One that cannot be read comes with the error saying why."""
    from essp.datasets.ingest import MAX_VIDEO_BYTES, VIDEO_EXTENSIONS

    sources: list[tuple[str, bytes | VideoError]] = []
    for name in names:
        if name.startswith("s3://"):
            location = S3Uri.parse(name)
            try:
                sources.append((name, ObjectStore(settings).get_bytes(location.bucket, location.key)))
            except ObjectNotFound:
                sources.append((name, VideoError(name, "no such object")))
            continue
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise PredictionError(f"predict: no video (extensions {', '.join(sorted(VIDEO_EXTENSIONS))}) in "
                                      f"folder {name}")
            sources += [(str(p), _read(p, MAX_VIDEO_BYTES)) for p in found]
        elif not path.exists() and not path.is_symlink():
            raise PredictionError(f"video {name}: no such file or folder")
        else:
            sources.append((name, _read(path, MAX_VIDEO_BYTES)))
    return sources


def _read(path: Path, limit: int) -> bytes | VideoError:
    if not path.is_file():
        return VideoError(str(path), "not a regular file (a folder, a FIFO or a broken link): not read")
    try:
        if path.stat().st_size > limit:
            return VideoError(str(path), f"{path.stat().st_size / 2**30:.1f} GiB, larger than ESSP reads "
                                         f"({limit / 2**30:.0f} GiB)")
        return path.read_bytes()
    except OSError as exc:
        return VideoError(str(path), f"cannot read: {exc.strerror or exc}")


def predict_videos(settings: Settings, sources: list[tuple[str, bytes | VideoError]], *, registry: str | None = None,
                   version: int | None = None, fusion: str | None = None, top: int = 3,
                   snippets: int | None = None) -> dict[str, Any]:
    """Top classes of each video (name, bytes; or name, the error reading it) with the registered model; see
    the module's doc."""
    registry = resolve_registry(settings, registry)
    model = resolve_model(settings, registry, version)
    spec: RunParams = parse_params(model.params)
    strategy, fuser = load_fuser(settings, model, fusion)
    nets = load_models(settings, model)
    results: list[dict[str, Any]] = [{"video": name} for name, _ in sources]
    usable: dict[str, tuple[ScoredVideo, bytes]] = {}
    index: dict[str, int] = {}
    for i, (name, data) in enumerate(sources):
        try:
            if isinstance(data, VideoError):
                raise data
            info = probe_video(data, name)
            if info.frames < spec.length + 1:
                raise VideoError(name, f"{info.frames} frames, fewer than the {spec.length + 1} of one stack")
        except VideoError as exc:
            results[i]["error"] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - one video's surprise (a decoder's own error) must not end the rest
            results[i]["error"] = f"video {name}: probe failed: {type(exc).__name__}: {exc}"
            continue
        uri = f"mem://{hashlib.sha256(data).hexdigest()[:16]}/{i}"
        usable[uri] = (ScoredVideo(id=f"{i:05d}", uri=uri, label=0, frames=info.frames), data)
        index[f"{i:05d}"] = i
    scores = None
    while usable and scores is None:
        try:
            with torch.no_grad():
                scores, _ = score_local(nets, list(usable.values()), snippets=snippets or spec.snippets,
                                        features={s: dict(spec.stream(s).options) for s in nets},
                                        length=spec.length, height=spec.size, width=spec.size)
        except VideoError as exc:  # a video that probed fine but does not decode: the others are scored
            if exc.video not in usable:
                raise
            i = index[usable.pop(exc.video)[0].id]
            results[i]["error"] = str(exc).replace(exc.video, sources[i][0], 1)
    if scores is not None:
        view = stream_scores(scores)
        fused = fuser.predict(view)
        for row, video_id in enumerate(view.video_ids):
            order = np.argsort(-fused[row])[:top]
            results[index[video_id]]["top"] = [{"class": model.class_names[int(c)], "score": float(fused[row, c])}
                                               for c in order]
            results[index[video_id]]["streams"] = {
                s: model.class_names[int(np.argmax(view.scores[s][row]))] for s in view.scores}
    return {"registry": registry, "version": model.version, "run": model.run, "fusion": strategy,
            "videos": results}


def _prefix_location(settings: Settings, prefix: str) -> tuple[str, str]:
    if prefix.startswith("s3://"):
        location = S3Uri.parse(prefix if "/" in prefix[5:] else prefix + "/")
        return location.bucket, location.key
    return settings.bucket_videos, prefix.lstrip("/")


def list_videos(settings: Settings, prefix: str, limit: int | None = None) -> list[str]:
    """The s3:// URIs of the videos under ``prefix`` (an s3:// URI or a key prefix in the videos bucket),
    oldest first, at most ``limit``."""
    from essp.datasets.ingest import VIDEO_EXTENSIONS

    bucket, key_prefix = _prefix_location(settings, prefix)
    try:
        objects = [o for o in ObjectStore(settings).list_objects(bucket, key_prefix)
                   if "." + o.key.rsplit(".", 1)[-1].lower() in VIDEO_EXTENSIONS]
    except ObjectNotFound:
        raise PredictionError(f"predict: bucket {bucket!r} of {prefix} does not exist") from None
    objects.sort(key=lambda o: (o.last_modified, o.key))  # in time order: oldest first
    if not objects:
        raise PredictionError(f"predict: no video (extensions {', '.join(sorted(VIDEO_EXTENSIONS))}) under "
                              f"s3://{bucket}/{key_prefix}")
    return [f"s3://{bucket}/{o.key}" for o in objects[:limit]]


def predictions_csv(result: dict[str, Any]) -> bytes:
    """One row per video and ranked class (a failed video: one row with its error), one column per stream's
    own top class."""
    streams: list[str] = []
    for video in result["videos"]:
        streams += [s for s in video.get("streams", {}) if s not in streams]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["video", "class", "score", "rank", "error", *[f"stream_{s}" for s in streams]])
    for video in result["videos"]:
        own = [video.get("streams", {}).get(s, "") for s in streams]
        if "error" in video:
            writer.writerow([video["video"], "", "", "", video["error"], *own])
            continue
        for rank, top in enumerate(video["top"], 1):
            writer.writerow([video["video"], top["class"], f"{top['score']:.6f}", rank, "", *own])
    return buffer.getvalue().encode()


def predict_prefix(settings: Settings, params: PredictParams, tag: str) -> dict[str, Any]:
    """Score every video under ``params.prefix``, oldest first, with the production model of the registry
    (or ``params.version``) and its fusion (or ``params.fusion``); write predictions.json and
    predictions.csv under ``s3://<runs bucket>/predictions/<registry>/<tag>/``."""
    store = ObjectStore(settings)
    uris = list_videos(settings, params.prefix, params.limit)
    sources = [(uri, store.get_bytes(S3Uri.parse(uri).bucket, S3Uri.parse(uri).key)) for uri in uris]
    registry = resolve_registry(settings, params.registry)
    result = predict_videos(settings, sources, registry=registry, version=params.version, fusion=params.fusion,
                            top=params.top)
    out_prefix = f"predictions/{registry}/{tag}"
    store.ensure_bucket(settings.bucket_runs)
    json_uri = store.put_json(settings.bucket_runs, f"{out_prefix}/predictions.json",
                              {**result, "prefix": params.prefix})
    csv_uri = store.put_bytes(settings.bucket_runs, f"{out_prefix}/predictions.csv", predictions_csv(result),
                              content_type="text/csv; charset=utf-8")
    failed = [v["video"] for v in result["videos"] if "error" in v]
    return {"registry": registry, "version": result["version"], "fusion": result["fusion"],
            "videos": len(result["videos"]), "failed": failed, "json": str(json_uri), "csv": str(csv_uri)}
