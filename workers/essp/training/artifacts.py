"""Where a training run keeps its artifacts in S3, in one place.

``s3://<bucket_runs>/<run>/``
  ``spec.json``                                     the run's parameters as given
  ``checkpoints/<stream>/epoch-NNNN.pt``            at each epoch end
  ``checkpoints/<stream>/stop-eNNNN-iNNNNNNN.pt``   when a trainer stops mid-epoch
  ``checkpoints/<stream>/latest.json``              which checkpoint to resume from
  ``scores/<split>/<stream>.npz``                   per-video scores and per-snippet features
  ``fusion/<strategy>.json``                        a fitted fuser's state
  ``report/...``                                    the report (essp.evaluation.report)

Checkpoints travel as bytes (``torch.save`` into memory); nothing is written to local disk.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from essp.clients.s3 import ObjectNotFound, ObjectStore, S3Uri
from essp.contract import check_run_id
from essp.errors import EsspError
from essp.settings import Settings


class CheckpointPointerError(EsspError):
    """A stream's ``latest.json`` names an object that is not one of its own checkpoints."""


class RunArtifactMissing(EsspError, FileNotFoundError):
    """A run's checkpoint, scores or report is not in S3."""


class PretrainedRefused(EsspError, ValueError):
    """A ``pretrained`` source outside the places weights may be loaded from."""


_CHECKPOINT_KEY = re.compile(r"[A-Za-z0-9_-]+/checkpoints/[a-z][a-z0-9_]*/[A-Za-z0-9_.-]+\.pt")
HISTORY_IN_POINTER = 1000  # epochs of figures latest.json carries (a few KiB per 100)


def pretrained_dirs(settings: Settings) -> list[Path]:
    """The folders a local ``pretrained`` file must be in (``ESSP_PRETRAINED_DIRS``)."""
    named = [Path(p.strip()).expanduser() for p in settings.pretrained_dirs.split(",") if p.strip()]
    return [p.resolve() for p in named or [settings.state_dir / "pretrained"]]


def check_pretrained(source: str, settings: Settings) -> str:
    """``source`` if weights may be loaded from it: an object of the models bucket, one of a run's own
    checkpoints (``s3://<bucket_runs>/<run>/checkpoints/<stream>/*.pt``, what a registered model points at),
    or a file inside :func:`pretrained_dirs` (symlinks resolved first); else :class:`PretrainedRefused` saying
    why. A run's params come from whoever can trigger a DAG: its weights must not come from anywhere."""
    if source.startswith("s3://"):
        try:
            uri = S3Uri.parse(source)
        except ValueError as exc:
            raise PretrainedRefused(f"pretrained {source}: {exc}") from None
        parts = uri.key.split("/")
        if ".." in parts or "." in parts:
            raise PretrainedRefused(f"pretrained {source}: a key with '.' or '..' segments is refused")
        if uri.bucket == settings.bucket_models or (uri.bucket == settings.bucket_runs
                                                    and _CHECKPOINT_KEY.fullmatch(uri.key)):
            return source
        raise PretrainedRefused(f"pretrained {source}: weights load only from the models bucket "
                                f"(s3://{settings.bucket_models}/...) or a run's checkpoints "
                                f"(s3://{settings.bucket_runs}/<run>/checkpoints/<stream>/<name>.pt)")
    if "://" in source:
        raise PretrainedRefused(f"pretrained {source}: neither an s3:// URI nor a local file")
    path = Path(source).expanduser().resolve()
    allowed = pretrained_dirs(settings)
    if not any(path.is_relative_to(folder) for folder in allowed):
        raise PretrainedRefused(f"pretrained {source}: a local file must be inside "
                                f"{', '.join(map(str, allowed))} (ESSP_PRETRAINED_DIRS)")
    return source


@dataclass
class VideoScores:
    """One stream's scores on one split: per-video class probabilities and per-snippet features."""

    stream: str
    video_ids: list[str]
    labels: np.ndarray  # (N,)
    scores: np.ndarray  # (N, C): mean of the snippets' softmax
    features: np.ndarray  # (N, T, D): penultimate features of the snippets, in time order
    snippet_mask: np.ndarray  # (N, T) bool: snippets that arrived (a dead snippet is False)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, video_ids=np.array(self.video_ids), labels=self.labels, scores=self.scores,
                            features=self.features, snippet_mask=self.snippet_mask, stream=np.array(self.stream))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> VideoScores:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return cls(stream=str(npz["stream"]), video_ids=[str(v) for v in npz["video_ids"]],
                       labels=npz["labels"], scores=npz["scores"], features=npz["features"],
                       snippet_mask=npz["snippet_mask"])


class RunStore:
    """The S3 artifacts of one run (see the module's doc)."""

    def __init__(self, settings: Settings, run: str) -> None:
        self.settings = settings
        self.run = check_run_id(run)
        self.bucket = settings.bucket_runs
        self.store = ObjectStore(settings)

    def uri(self, key: str) -> str:
        return str(S3Uri(self.bucket, f"{self.run}/{key}"))

    # -- spec -------------------------------------------------------------------------------------------
    def save_json(self, name: str, value: Any) -> str:
        self.store.ensure_bucket(self.bucket)
        self.store.put_json(self.bucket, f"{self.run}/{name}", value)
        return self.uri(name)

    def load_json(self, name: str) -> Any:
        try:
            return self.store.get_json(self.bucket, f"{self.run}/{name}")
        except ObjectNotFound:
            raise RunArtifactMissing(f"run {self.run}: {self.uri(name)} does not exist") from None

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self, stream: str, state: dict[str, Any], *, finished_epoch: bool) -> str:
        """Write a checkpoint and point ``latest.json`` at it; returns its URI."""
        if finished_epoch:
            name = f"epoch-{int(state['epoch']) - 1:04d}.pt"
        else:
            name = f"stop-e{int(state['epoch']):04d}-i{int(state['iteration']):07d}.pt"
        key = f"{self.run}/checkpoints/{stream}/{name}"
        self.store.ensure_bucket(self.bucket)
        from essp.training.trainer import checkpoint_bytes  # torch: only where checkpoints are read or written

        self.store.put_bytes(self.bucket, key, checkpoint_bytes(state), content_type="application/octet-stream")
        uri = str(S3Uri(self.bucket, key))
        self.store.put_json(self.bucket, f"{self.run}/checkpoints/{stream}/latest.json", {
            "uri": uri, "epoch": int(state["epoch"]), "iteration": int(state["iteration"]),
            "finished_epoch": finished_epoch, "saved_at": time.time(),
            # the finished epochs' figures, so that a watcher (the UI) has them without loading a checkpoint
            "history": [dict(h) for h in state.get("history", [])][-HISTORY_IN_POINTER:]})
        return uri

    def epoch_checkpoint_uri(self, stream: str, epoch: int) -> str:
        """Where the checkpoint written at the end of ``epoch`` is (every epoch's is kept)."""
        return self.uri(f"checkpoints/{stream}/epoch-{int(epoch):04d}.pt")

    def latest_pointer(self, stream: str) -> dict[str, Any] | None:
        """``latest.json`` of a stream: uri, epoch (the next to train), iteration, finished_epoch."""
        try:
            return self.store.get_json(self.bucket, f"{self.run}/checkpoints/{stream}/latest.json")
        except ObjectNotFound:
            return None

    def latest_checkpoint_uri(self, stream: str) -> str | None:
        """Where ``latest.json`` points; only a checkpoint of this run and stream is accepted (a pointer
        edited to name another bucket or to climb out with ``..`` would have a trainer load any object)."""
        pointer = self.latest_pointer(stream)
        if pointer is None:
            return None
        uri = str(pointer.get("uri", ""))
        folder = f"{self.run}/checkpoints/{stream}/"
        try:
            location = S3Uri.parse(uri)
        except ValueError:
            location = None
        name = location.key[len(folder):] if location and location.key.startswith(folder) else ""
        if location is None or location.bucket != self.bucket or "/" in name or name in ("", ".", ".."):
            raise CheckpointPointerError(
                f"run {self.run}: {self.uri(f'checkpoints/{stream}/latest.json')} points at {uri!r}, outside the "
                f"stream's checkpoints (s3://{self.bucket}/{folder}*.pt): not loaded; delete or fix the pointer")
        return uri

    def load_checkpoint(self, uri: str | None = None, *, stream: str | None = None) -> dict[str, Any]:
        """A checkpoint by URI, or the latest of ``stream``."""
        if uri is None:
            if stream is None:
                raise ValueError("name a checkpoint URI or a stream")
            uri = self.latest_checkpoint_uri(stream)
            if uri is None:
                raise RunArtifactMissing(f"run {self.run}: stream {stream} has no checkpoint yet "
                                         f"({self.uri(f'checkpoints/{stream}/latest.json')} is missing)")
        return load_checkpoint_uri(self.settings, uri)

    # -- scores ---------------------------------------------------------------------------------------
    def save_scores(self, split: str, scores: VideoScores) -> str:
        key = f"{self.run}/scores/{split}/{scores.stream}.npz"
        self.store.ensure_bucket(self.bucket)
        self.store.put_bytes(self.bucket, key, scores.to_bytes(), content_type="application/octet-stream")
        return str(S3Uri(self.bucket, key))

    def load_scores(self, split: str, stream: str) -> VideoScores:
        key = f"{self.run}/scores/{split}/{stream}.npz"
        try:
            return VideoScores.from_bytes(self.store.get_bytes(self.bucket, key))
        except ObjectNotFound:
            raise RunArtifactMissing(f"run {self.run}: no {stream} scores for split {split} "
                                     f"(s3://{self.bucket}/{key}); run the scoring step first") from None


def load_checkpoint_uri(settings: Settings, uri: str) -> dict[str, Any]:
    """A checkpoint from ``s3://...`` (or a local file, for weights brought by hand)."""
    if uri.startswith("s3://"):
        location = S3Uri.parse(uri)
        try:
            data = ObjectStore(settings).get_bytes(location.bucket, location.key)
        except ObjectNotFound:
            raise RunArtifactMissing(f"checkpoint {uri} does not exist") from None
    else:
        try:
            with open(uri, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise RunArtifactMissing(f"checkpoint {uri}: {exc.strerror}") from None
    from essp.training.trainer import checkpoint_from_bytes

    return checkpoint_from_bytes(data, uri)
