"""Snippets of videos as decode jobs: N evenly spaced stacks of each video, ids ``v<video>-s<snippet>`` in
time order. What video-level scoring (essp.evaluation.scoring) and the trainers' validation after each
epoch (essp.training.validation) publish to the data plane."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from essp.contract import DecodeJob
from essp.errors import EsspError

# The paper's evaluation protocol: each video scored on 25 evenly spaced snippets, the scores averaged.
DEFAULT_SNIPPETS = 25


class ScoringError(EsspError):
    """Videos could not be scored (no usable video, every snippet dead, workers missing)."""


@dataclass(frozen=True)
class ScoredVideo:
    """A video to score: its id, where it is, its label (0 when unknown) and its frame count."""

    id: str
    uri: str
    label: int
    frames: int


@dataclass
class SnippetPlan:
    run: str
    videos: list[ScoredVideo]
    snippets: int
    jobs: list[DecodeJob]
    skipped: dict[str, str]  # video id -> why it was not scored

    def position(self, sample_id: str) -> tuple[int, int]:
        """(video index, snippet index) of a snippet's sample id."""
        video, snippet = sample_id.split("-", 1)
        return int(video[1:]), int(snippet[1:])


def snippet_offsets(frames: int, length: int, snippets: int) -> list[int]:
    """``snippets`` first-frame offsets spread evenly over the video, each leaving room for L+1 frames."""
    last = frames - (length + 1)
    if last < 0:
        raise ScoringError(f"a video of {frames} frames is shorter than a stack of L={length} (+1) frames")
    return [int(round(x)) for x in np.linspace(0, last, snippets)]


def plan_snippets(videos: list[ScoredVideo], *, run: str, features: dict[str, dict[str, Any]], length: int,
                  height: int, width: int, snippets: int = DEFAULT_SNIPPETS, epoch: int = 0,
                  max_inflight: int = 64, exclude: Iterable[str] = ()) -> SnippetPlan:
    """One decode job per (video, snippet); sample ids ``v<video>-s<snippet>`` keep the time order."""
    if snippets < 1:
        raise ScoringError(f"snippets must be >= 1, got {snippets}")
    excluded = set(exclude)
    usable: list[ScoredVideo] = []
    skipped: dict[str, str] = {}
    for video in videos:
        if video.uri in excluded:
            skipped[video.id] = "quarantined"
        elif video.frames < length + 1:
            skipped[video.id] = f"{video.frames} frames, fewer than the {length + 1} of one stack"
        else:
            usable.append(video)
    if not usable:
        raise ScoringError(f"no video to score ({len(videos)} given; skipped: {skipped or 'none'})")
    jobs = []
    for vi, video in enumerate(usable):
        for si, offset in enumerate(snippet_offsets(video.frames, length, snippets)):
            jobs.append(DecodeJob(run=run, epoch=epoch, sample_id=f"v{vi:05d}-s{si:03d}", video=video.uri,
                                  label=video.label, offset=offset, length=length, height=height, width=width,
                                  video_frames=video.frames, features=features, max_inflight=max_inflight))
    return SnippetPlan(run=run, videos=usable, snippets=snippets, jobs=jobs, skipped=skipped)
