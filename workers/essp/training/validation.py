"""Validation after every epoch, through the data plane (issue 14; the paper's §3.4 reads the validation loss).

After each epoch a run's trainers score its validation videos (the manifest's ``val`` split,
essp.datasets.validation): ``val_snippets`` evenly spaced snippets of each, the same ones every epoch, so the
curves compare. The snippets are decode jobs like any epoch's, of a data-plane run of their own
(:func:`validation_run_id`: its topics and keys apart from training's), published once per epoch request
by whichever trainer finishes training first (a Redis ``SET NX`` on the request's attempt; the features of
the streams still training, so that no extractor works for a stream that has moved on) and read by every
trainer from its own stream. The figures: the validation loss (mean cross-entropy over snippets), and
video-level top-1 and mean class accuracy (each video's snippet softmax averaged, as at test time).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from essp.clients.redis import redis_client
from essp.contract import TRAINER_STATE_TTL_S, RedisKeys, TrainerState, check_run_id
from essp.dataplane.payloads import SampleStore
from essp.dataplane.plan import EpochPlan, decode_quarantine, publish_plan
from essp.dataplane.snippets import ScoredVideo, SnippetPlan, plan_snippets
from essp.settings import Settings

VAL_FIGURES = ("val_loss", "val_top1", "val_mean_class_accuracy")


def validation_run_id(run: str) -> str:
    """The data-plane run that carries a run's validation snippets."""
    return check_run_id(f"{run[:56]}-va")


class ValidationSpec(BaseModel):
    """What a trainer needs to validate after each epoch (read from the run's spec.json and manifest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str  # the training run
    videos: list[tuple[str, str, int, int]] = Field(description="(id, uri, label, frames) of each validation video")
    snippets: int = Field(ge=1)
    features: dict[str, dict[str, Any]]  # every stream of the run: {stream: extractor options}
    length: int
    height: int
    width: int
    max_inflight: int = 64

    @property
    def data_run(self) -> str:
        return validation_run_id(self.run)

    def plan(self, settings: Settings, epoch: int, streams: list[str]) -> SnippetPlan:
        """The epoch's validation snippets for ``streams`` (videos decode quarantined in the run left out)."""
        videos = [ScoredVideo(*v) for v in self.videos]
        return plan_snippets(videos, run=self.data_run, features={s: self.features[s] for s in streams},
                             length=self.length, height=self.height, width=self.width, snippets=self.snippets,
                             epoch=epoch, max_inflight=self.max_inflight,
                             exclude=decode_quarantine(settings, self.run))


def publish_once(settings: Settings, spec: ValidationSpec, epoch: int, attempt: str,
                 stream: str) -> tuple[SnippetPlan, bool]:
    """Publish ``epoch``'s validation snippets unless another trainer did for this epoch request ``attempt``
    (``stream``: the caller's, always among the plan's features); returns the plan (the number of snippets to
    wait for) and whether this call published it."""
    keys = RedisKeys(settings.redis_prefix)
    client = redis_client(settings)
    streams = list(spec.features)
    raws = client.mget([keys.trainer(spec.run, s) for s in streams])
    states = {s: TrainerState.parse(raw) for s, raw in zip(streams, raws, strict=True)}
    still = [s for s in streams if s == stream or states[s] is None or not states[s].finished(epoch)]
    plan = spec.plan(settings, epoch, still)
    if not client.set(keys.val_planned(spec.data_run, epoch, attempt), str(time.time()), nx=True,
                      ex=TRAINER_STATE_TTL_S):
        return plan, False
    # the same sample ids every epoch: forget the last epoch's progress so that these are delivered
    SampleStore(settings, spec.data_run).reset([job.sample_id for job in plan.jobs])
    publish_plan(settings, EpochPlan(run=spec.data_run, epoch=epoch, seed=0, jobs=plan.jobs))
    return plan, True


class ValidationTally:
    """Snippet losses and per-video softmax sums of one stream, then the figures."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.loss_sum = 0.0
        self.snippets = 0
        self.probs: dict[int, np.ndarray] = {}
        self.counts: dict[int, int] = {}
        self.labels: dict[int, int] = {}

    def add(self, sample_ids: Iterable[str], labels: Iterable[int], probs: np.ndarray, losses: np.ndarray) -> None:
        for sample_id, label, row, loss in zip(sample_ids, labels, probs, losses, strict=True):
            video = int(sample_id.split("-", 1)[0][1:])  # "v00003-s002"
            self.probs[video] = self.probs.get(video, 0) + row
            self.counts[video] = self.counts.get(video, 0) + 1
            self.labels[video] = int(label)
            self.loss_sum += float(loss)
            self.snippets += 1

    def figures(self) -> dict[str, float | int | None]:
        if not self.snippets:
            return {"val_loss": None, "val_top1": None, "val_mean_class_accuracy": None, "val_videos": 0,
                    "val_snippets": 0}
        videos = sorted(self.probs)
        predicted = np.array([int(np.argmax(self.probs[v])) for v in videos])
        truth = np.array([self.labels[v] for v in videos])
        hits = predicted == truth
        per_class = [float(hits[truth == c].mean()) for c in sorted(set(truth.tolist()))]
        return {"val_loss": self.loss_sum / self.snippets, "val_top1": float(hits.mean()),
                "val_mean_class_accuracy": float(np.mean(per_class)), "val_videos": len(videos),
                "val_snippets": self.snippets}


def best_epoch(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The epoch of ``history`` with the lowest validation loss (the first of equals); None without one."""
    scored = [h for h in history if h.get("val_loss") is not None]
    return min(scored, key=lambda h: (float(h["val_loss"]), int(h["epoch"]))) if scored else None


def epochs_without_improvement(history: list[dict[str, Any]]) -> int:
    """How many epochs have passed since the best validation loss of ``history`` (0: the last is the best)."""
    best = best_epoch(history)
    if best is None:
        return 0
    return sum(1 for h in history if int(h["epoch"]) > int(best["epoch"]))
