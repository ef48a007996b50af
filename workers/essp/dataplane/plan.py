"""Epoch planning (the paper's §3.2): which frames of which videos one epoch trains on.

For each sample a seeded generator draws a class, then a video of that class, then a frame offset
that leaves room for the L+1 frames of the stack. The generator is seeded by (seed, run, epoch), so
the same run re-plans the same epoch identically (a retried Airflow task publishes the same jobs,
and the consumer's de-duplication by sample id absorbs the repeats). Drawing the class first keeps
the classes balanced however unequal their video counts are.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from essp.clients.kafka import MessageProducer, ensure_topics
from essp.contract import DecodeJob, Topics, check_run_id
from essp.datasets.manifest import Manifest, ManifestVideo
from essp.settings import Settings


class PlanError(ValueError):
    """The plan cannot be made from this manifest with these parameters."""


@dataclass(frozen=True)
class EpochPlan:
    run: str
    epoch: int
    seed: int
    jobs: list[DecodeJob] = field(repr=False)

    @property
    def streams(self) -> list[str]:
        return list(self.jobs[0].features) if self.jobs else []

    def class_counts(self) -> Counter:
        return Counter(job.label for job in self.jobs)

    def sample_ids(self) -> list[str]:
        return [job.sample_id for job in self.jobs]


def sample_id(epoch: int, index: int) -> str:
    return f"e{epoch:04d}-{index:07d}"


def _rng(seed: int, run: str, epoch: int) -> np.random.Generator:
    # A stable digest of the run id (Python's hash() is salted per process).
    run_key = int.from_bytes(hashlib.sha256(run.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, run_key, epoch])


def plan_epoch(manifest: Manifest, *, run: str, epoch: int, features: dict[str, dict[str, Any]],
               length: int = 10, height: int = 112, width: int = 112, samples: int | None = None,
               seed: int = 0, split: str = "train", max_inflight: int = 64,
               exclude: set[str] | frozenset[str] = frozenset()) -> EpochPlan:
    """Draw the decode jobs of one epoch.

    ``samples`` defaults to the number of usable videos of the split (one pass worth of samples).
    Videos shorter than L+1 frames and videos in ``exclude`` (quarantined by decode) are skipped.
    """
    check_run_id(run)
    if epoch < 0:
        raise PlanError(f"epoch must be >= 0, got {epoch}")
    if length < 1:
        raise PlanError(f"stack length L must be >= 1, got {length}")
    if not features:
        raise PlanError("no features requested: name at least one extractor (e.g. rgb, flow)")
    if split not in manifest.splits:
        raise PlanError(f"manifest {manifest.name} v{manifest.version} has no split {split!r} "
                        f"(it has {', '.join(sorted(manifest.splits)) or 'none'})")
    by_class: dict[int, list[ManifestVideo]] = {}
    for video in manifest.split(split):
        if video.frames >= length + 1 and video.uri not in exclude:
            by_class.setdefault(video.label, []).append(video)
    if not by_class:
        raise PlanError(f"manifest {manifest.name} v{manifest.version}, split {split!r}: no video has the "
                        f"{length + 1} frames a stack of L={length} needs")
    classes = sorted(by_class)
    for videos in by_class.values():
        videos.sort(key=lambda v: v.id)  # the draw must not depend on manifest order
    total = samples if samples is not None else sum(len(v) for v in by_class.values())
    if total < 1:
        raise PlanError(f"samples must be >= 1, got {total}")

    rng = _rng(seed, run, epoch)
    jobs = []
    for index in range(total):
        label = classes[int(rng.integers(len(classes)))]
        video = by_class[label][int(rng.integers(len(by_class[label])))]
        offset = int(rng.integers(video.frames - length))  # offset + L + 1 <= frames
        jobs.append(DecodeJob(
            run=run, epoch=epoch, sample_id=sample_id(epoch, index), video=video.uri, label=label,
            offset=offset, length=length, height=height, width=width, video_frames=video.frames,
            features=features, max_inflight=max_inflight,
        ))
    return EpochPlan(run=run, epoch=epoch, seed=seed, jobs=jobs)


def publish_plan(settings: Settings, plan: EpochPlan) -> int:
    """Create the run's topics if needed and publish every job, keyed by sample id (a sample's
    redos land on the same partition). Returns the number of jobs published."""
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.run_topics(plan.run, plan.streams))
    with MessageProducer(settings) as producer:
        return producer.publish_many(topics.decode(plan.run), ((job.sample_id, job) for job in plan.jobs))


def parse_features(spec: str) -> dict[str, dict[str, Any]]:
    """``"rgb,flow:method=dis_fast:bound=20"`` -> ``{"rgb": {}, "flow": {"method": "dis_fast", "bound": 20}}``."""
    features: dict[str, dict[str, Any]] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, *pairs = part.split(":")
        options: dict[str, Any] = {}
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            if not sep or not key:
                raise PlanError(f"feature option {pair!r} of {name!r} must be KEY=VALUE")
            value: Any = raw
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    continue
            options[key] = value
        features[name.strip()] = options
    if not features:
        raise PlanError(f"no feature named in {spec!r}")
    return features


def decode_quarantine(settings: Settings, run: str) -> dict[str, str]:
    """Videos of ``run`` that failed to decode: URI -> reason (written by the decode workers)."""
    from essp.clients.redis import redis_client
    from essp.contract import RedisKeys

    raw = redis_client(settings).hgetall(RedisKeys(settings.redis_prefix).quarantine(run))
    return {k.decode(): v.decode() for k, v in raw.items()}


def record_decode_quarantine(settings: Settings, manifest: Manifest, run: str) -> tuple[Manifest, str | None]:
    """Write a new manifest version listing the run's undecodable videos as quarantined (stage
    ``decode``), so later epochs and runs skip them. Returns the manifest and its new URI (None when
    nothing new was quarantined)."""
    from essp.datasets.manifest import ManifestStore

    present = {video.uri for video in manifest.videos}
    bad = {uri: reason for uri, reason in decode_quarantine(settings, run).items() if uri in present}
    if not bad:
        return manifest, None
    updated = manifest
    for uri, reason in sorted(bad.items()):
        updated = updated.quarantine(uri, reason, "decode")
    store = ManifestStore(settings)
    uri = store.save(updated.model_copy(update={"version": 0}))
    return store.load(uri), uri
