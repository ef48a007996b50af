"""Epoch planning (the paper's §3.2): which frames of which videos one epoch trains on.

For each sample a seeded generator draws a class, then a video of that class, then a frame offset
that leaves room for the L+1 frames of the stack. The generator is seeded by (seed, run, epoch), so
the same run re-plans the same epoch identically (a retried Airflow task publishes the same jobs,
and the consumer's de-duplication by sample id absorbs the repeats). Drawing the class first keeps
the classes balanced however unequal their video counts are.

**Chunks.** The jobs are published as :class:`~essp.contract.DecodeChunk` messages of consecutive
samples, and every later hop keeps the chunk (one frames notice, one notice per stream, one commit per
chunk), so the broker's cost is paid per chunk while payloads, progress and redos stay per sample.
:func:`chunk_size` picks the size: the larger it is, the less the broker costs per sample (on the local
stack each produce and commit is a few S3 writes: ~40 ms of CPU per sample with one message per hop),
but a sample waits for its chunk at every hop (latency ~ chunk x per-sample work per stage) and a worker
that dies redoes its whole chunk. Back-pressure bounds it too: a run holds at most ``max_inflight``
samples, and the stages only overlap (one chunk decoded while another is extracted, a third consumed, a
fourth queued) when the bound holds four chunks or more. So the size is ``min(chunk_samples,
max_inflight // 4)``: 16 by default (64 in flight), i.e. ~2.5 ms of broker CPU per sample, ~0.2-0.4 s
of added latency per hop at 12-25 ms of work per sample, and at most 16 samples redone per fault. A small
epoch is cut in at least eight chunks (``samples // 8``), so that its stages still overlap: with two
chunks an epoch would be decoded, then extracted, then trained, one after the other.

**Topics per epoch.** Publishing epoch ``e`` creates the topics of ``e`` and ``e + 1`` (so the workers,
which follow topic patterns, already read the next epoch's topics when it is published) and deletes
the run's topics of epochs before ``e - 2``: the broker keeps at most four epochs of a run, so its cost
per sample does not grow with the run (Tansu has no DeleteRecords; a fetch there lists every stored batch
of the partition). Members follow only a run's three newest epochs (``EPOCH_WINDOW``), so when ``e + 1``
appears they let go of ``e - 2``, which is deleted one epoch later: Tansu re-creates a deleted topic that
a member still fetches from, and deleting only what nobody reads keeps it deleted.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from essp.clients.kafka import MessageProducer, delete_topics, ensure_topics, list_topics
from essp.contract import MAX_CHUNK, DecodeChunk, DecodeJob, Topics, check_run_id
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

    def chunks(self, size: int) -> list[DecodeChunk]:
        """The jobs as chunk messages of ``size`` consecutive samples (the last one may be shorter)."""
        if size < 1:
            raise PlanError(f"chunk size must be >= 1, got {size}")
        return [DecodeChunk(jobs=self.jobs[i:i + size]) for i in range(0, len(self.jobs), size)]


def chunk_size(settings: Settings, max_inflight: int, samples: int | None = None) -> int:
    """Samples per chunk message: ``settings.chunk_samples``, at most a quarter of the in-flight bound,
    and at most an eighth of the epoch (see the module's doc for the reasoning)."""
    size = min(settings.chunk_samples, max_inflight // 4, MAX_CHUNK)
    if samples is not None:
        size = min(size, samples // 8)
    return max(1, size)


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


def publish_plan(settings: Settings, plan: EpochPlan, *, chunk: int | None = None) -> int:
    """Create the epoch's topics (and the next epoch's), delete the run's topics of epochs before
    ``epoch - 2``, and publish every job in chunks keyed by their first sample id (a redo of a chunk
    lands on the same partition). Returns the number of jobs published."""
    topics = Topics(settings.topic_prefix)
    streams = plan.streams
    ensure_topics(settings, [*topics.run_topics(plan.run, streams, plan.epoch),
                             *topics.epoch_topics(plan.run, plan.epoch + 1, streams)])
    drop_epoch_topics(settings, plan.run, before=plan.epoch - 2)
    if not plan.jobs:
        return 0
    size = chunk or chunk_size(settings, plan.jobs[0].max_inflight, len(plan.jobs))
    with MessageProducer(settings) as producer:
        producer.publish_many(topics.decode(plan.run, plan.epoch),
                              ((c.jobs[0].sample_id, c) for c in plan.chunks(size)))
    return len(plan.jobs)


def run_topic_names(settings: Settings, run: str) -> list[str]:
    """Every topic of the run on the broker: each epoch's and its dead letters."""
    topics = Topics(settings.topic_prefix)
    return sorted(t for t in list_topics(settings) if topics.is_run_topic(t, run))


def drop_epoch_topics(settings: Settings, run: str, *, before: int) -> list[str]:
    """Delete the run's per-epoch topics of epochs ``< before`` (finished: their jobs and notices are all
    consumed); returns the names deleted."""
    topics = Topics(settings.topic_prefix)
    doomed = [t for t in run_topic_names(settings, run) if (topics.epoch_of(t) is not None
                                                           and topics.epoch_of(t) < before)]
    if doomed:
        delete_topics(settings, doomed)
    return doomed


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
