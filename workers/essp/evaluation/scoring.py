"""Video-level scoring: N evenly spaced snippets of each video, per stream, averaged per video.

Two-stream evaluation practice: a video's class scores are the mean of the softmax of N snippets
(25 by default) taken at evenly spaced offsets. The snippets go through the same resident decode and
extractor workers as training (:func:`score_split`: a scoring run of its own, so a trainer never
sees them), or through the same decode and extractor code in this process (:func:`score_local`,
for `essp predict` on a machine without workers). Besides the scores, each snippet's penultimate
features are kept in time order: the sequence fusion (the paper's §3.5) learns from them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from essp.clients.kafka import delete_topics
from essp.contract import check_run_id
from essp.dataplane.consumer import SampleStream
from essp.dataplane.payloads import SampleStore
from essp.dataplane.plan import EpochPlan, publish_plan, run_topic_names
from essp.dataplane.snippets import ScoredVideo, ScoringError, SnippetPlan, plan_snippets, snippet_offsets
from essp.datasets.manifest import Manifest
from essp.evaluation.metrics import DEFAULT_SNIPPETS
from essp.settings import Settings
from essp.training.artifacts import VideoScores
from essp.training.models import StreamModel, normalise_batch

log = logging.getLogger("essp.evaluation.scoring")

__all__ = ["ScoredVideo", "ScoringError", "SnippetPlan", "plan_snippets", "snippet_offsets"]  # moved, re-exported


def scoring_run_id(run: str, split: str) -> str:
    """The data-plane run that carries a run's scoring snippets (its own topics and keys)."""
    safe_split = "".join(c if c.isalnum() else "_" for c in split)[:10]
    return check_run_id(f"{run[:48]}-sc-{safe_split}")


def manifest_videos(manifest: Manifest, split: str, limit: int | None = None) -> list[ScoredVideo]:
    if split not in manifest.splits:
        raise ScoringError(f"manifest {manifest.name} v{manifest.version} has no split {split!r}")
    videos = [ScoredVideo(v.id, v.uri, v.label, v.frames) for v in sorted(manifest.split(split), key=lambda v: v.id)]
    return videos[:limit] if limit else videos


class ScoreAccumulator:
    """Per-snippet softmax and features of one stream, then per-video means."""

    def __init__(self, plan: SnippetPlan, stream: str) -> None:
        self.plan = plan
        self.stream = stream
        self.probs: np.ndarray | None = None
        self.features: np.ndarray | None = None
        self.mask = np.zeros((len(plan.videos), plan.snippets), dtype=bool)

    def add(self, sample_ids: list[str], probs: np.ndarray, features: np.ndarray) -> None:
        if self.probs is None:
            shape = (len(self.plan.videos), self.plan.snippets)
            self.probs = np.zeros((*shape, probs.shape[1]), dtype=np.float32)
            self.features = np.zeros((*shape, features.shape[1]), dtype=np.float32)
        assert self.features is not None
        for row, sample_id in enumerate(sample_ids):
            vi, si = self.plan.position(sample_id)
            self.probs[vi, si] = probs[row]
            self.features[vi, si] = features[row]
            self.mask[vi, si] = True

    def result(self) -> VideoScores:
        if self.probs is None or self.features is None:
            raise ScoringError(f"stream {self.stream}: no snippet arrived; every one was dead-lettered "
                               f"(see the dead-letter topic of run {self.plan.run})")
        have = self.mask.any(axis=1)
        if not have.all():
            lost = [self.plan.videos[i].id for i in np.flatnonzero(~have)]
            log.warning("stream %s: no snippet of %d video(s) arrived: %s", self.stream, len(lost), lost[:5])
        counts = np.maximum(self.mask.sum(axis=1, keepdims=True), 1)
        scores = (self.probs * self.mask[..., None]).sum(axis=1) / counts
        # A dead snippet's features stay zero: the sequence model sees the gap at its time step.
        return VideoScores(stream=self.stream, video_ids=[v.id for v in self.plan.videos],
                           labels=np.array([v.label for v in self.plan.videos], dtype=np.int64),
                           scores=scores.astype(np.float32), features=self.features, snippet_mask=self.mask)


@torch.no_grad()
def forward_snippets(model: StreamModel, arrays: list[np.ndarray],
                     device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Softmax and penultimate features of a batch of uint8 snippets."""
    batch = torch.from_numpy(np.stack(arrays)).to(device)
    logits, features = model.forward_with_features(normalise_batch(model.stream, batch))
    return torch.softmax(logits.float(), dim=1).cpu().numpy(), features.float().cpu().numpy()


def score_split(settings: Settings, models: dict[str, StreamModel], videos: list[ScoredVideo], *, run: str,
                split: str, features: dict[str, dict[str, Any]], length: int, height: int, width: int,
                snippets: int = DEFAULT_SNIPPETS, batch_size: int = 32, timeout_s: float = 300.0,
                max_inflight: int = 64, exclude: Iterable[str] = (),
                progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, VideoScores], SnippetPlan]:
    """Score ``videos`` with each stream's model through the resident workers of the data plane;
    ``progress(scored, total)`` is called as videos are done (every snippet of every stream in), from the
    streams' threads, one at a time.

    The snippets travel as a scoring run of their own (:func:`scoring_run_id`); its topics and keys are
    removed at the end. Each stream is consumed on its own thread so that the in-flight bound, which
    waits for every stream, keeps moving."""
    score_run = scoring_run_id(run, split)
    wanted = {stream: features[stream] for stream in models}
    plan = plan_snippets(videos, run=score_run, features=wanted, length=length, height=height, width=width,
                         snippets=snippets, max_inflight=max_inflight, exclude=exclude)
    store = SampleStore(settings, score_run)
    store.clear()  # leftovers of an earlier, interrupted scoring of this run
    accumulators = {stream: ScoreAccumulator(plan, stream) for stream in models}
    errors: list[BaseException] = []
    streams_ready = threading.Barrier(len(models) + 1)
    told = threading.Lock()

    def add(stream: str, ids: list[str], arrays: list[np.ndarray], device: Any) -> None:
        accumulators[stream].add(ids, *forward_snippets(models[stream], arrays, device))
        if progress is not None:
            with told:
                done = np.logical_and.reduce([acc.mask.all(axis=1) for acc in accumulators.values()])
                progress(int(done.sum()), len(plan.videos))

    def consume(stream: str) -> None:
        model = models[stream]
        device = next(model.parameters()).device
        model.eval()
        try:
            with SampleStream(settings, score_run, stream) as source:
                streams_ready.wait()
                arrays: list[np.ndarray] = []
                ids: list[str] = []
                for sample in source.epoch(0, len(plan.jobs), timeout_s=timeout_s):
                    arrays.append(sample.array)
                    ids.append(sample.sample_id)
                    if len(arrays) == batch_size:
                        add(stream, ids, arrays, device)
                        arrays, ids = [], []
                if arrays:
                    add(stream, ids, arrays, device)
                if source.stats.dead:
                    log.warning("stream %s: %d snippet(s) dead: %s", stream, source.stats.dead,
                                source.stats.dead_reasons[:3])
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            errors.append(exc)
            streams_ready.abort()

    threads = [threading.Thread(target=consume, args=(s,), name=f"essp-score-{s}") for s in models]
    for thread in threads:
        thread.start()
    try:
        streams_ready.wait(timeout=60)
        if progress is not None:
            progress(0, len(plan.videos))
        publish_plan(settings, EpochPlan(run=score_run, epoch=0, seed=0, jobs=plan.jobs))
    except threading.BrokenBarrierError:
        pass
    finally:
        for thread in threads:
            thread.join()
        store.clear()
        delete_topics(settings, run_topic_names(settings, score_run))
    if errors:
        raise errors[0]
    return {stream: acc.result() for stream, acc in accumulators.items()}, plan


def score_local(models: dict[str, StreamModel], videos: list[tuple[ScoredVideo, bytes]], *,
                features: dict[str, dict[str, Any]], length: int, height: int, width: int,
                snippets: int = DEFAULT_SNIPPETS, batch_size: int = 32) -> tuple[dict[str, VideoScores], SnippetPlan]:
    """Score videos held in memory with the decode and extractor code of the workers, in this process
    (`essp predict` without workers). Frames and features stay in memory."""
    from essp.dataplane.extractors import create_extractor
    from essp.datasets.video import decode_segment

    plan = plan_snippets([v for v, _ in videos], run="local", features=features, length=length,
                         height=height, width=width, snippets=snippets)
    data = {video.uri: blob for video, blob in videos}
    extractors = {stream: create_extractor(stream, features.get(stream) or {}) for stream in models}
    accumulators = {stream: ScoreAccumulator(plan, stream) for stream in models}
    pending: dict[str, tuple[list[np.ndarray], list[str]]] = {stream: ([], []) for stream in models}

    def flush(stream: str) -> None:
        arrays, ids = pending[stream]
        if arrays:
            model = models[stream]
            model.eval()
            accumulators[stream].add(ids, *forward_snippets(model, arrays, next(model.parameters()).device))
        pending[stream] = ([], [])

    for job in plan.jobs:
        frames = decode_segment(data[job.video], job.video, job.offset, job.length + 1, (job.height, job.width))
        for stream, extractor in extractors.items():
            pending[stream][0].append(extractor.extract(frames))
            pending[stream][1].append(job.sample_id)
            if len(pending[stream][0]) == batch_size:
                flush(stream)
    for stream in models:
        flush(stream)
    return {stream: acc.result() for stream, acc in accumulators.items()}, plan
