"""The decode worker: a DecodeChunk in, each sample's L+1 resized frames in Redis, a FramesReady notice out.

For each chunk: take in-flight slots for its samples (wait while the run is at its bound: producers
wait, they never drop), fetch each video through an in-memory LRU of bytes, seek and decode the frames
(essp.datasets.video verifies the first frame's timestamp) in the layout the sample's extractors need
(:func:`essp.dataplane.extractors.frames_layout`: grey for flow, and only the colour frame rgb takes, from
the same decode), store them with a TTL (one round trip per chunk), publish one notice for the chunk.
The base class commits the chunk only after that. A chunk waits until the run has room for all of it
(chunks are at most a quarter of the bound), so chunks keep their size; one larger than that takes the
slots that are free, and the samples already decoded are stored and announced before the worker waits,
so a partial chunk never holds slots that nobody can free. A video that
cannot be decoded is dead-lettered (that sample only) on the run's dead topic with the reason, recorded
in the run's quarantine hash, and its sample is abandoned (slot freed) so the epoch goes on.
"""

from __future__ import annotations

import faulthandler
import logging
import threading
import time
from collections import OrderedDict
from typing import ClassVar

import numpy as np

from essp.clients.kafka import Received
from essp.clients.s3 import ObjectNotFound, ObjectStore, S3Uri
from essp.contract import DecodeChunk, DecodeJob, FramesReady, Message
from essp.dataplane.extractors import MixedFrames, frames_layout
from essp.dataplane.payloads import TO_EXTRACT, SampleStore
from essp.dataplane.resident import ResidentWorker, WorkInterrupted
from essp.datasets.video import VideoError, decode_segment
from essp.errors import ServiceUnavailable
from essp.failpoints import failpoint
from essp.settings import Settings

log = logging.getLogger("essp.decode")


class VideoCache:
    """Video bytes by URI, least recently used first out, bounded in bytes (never on disk)."""

    def __init__(self, store: ObjectStore, capacity_bytes: int) -> None:
        self.store = store
        self.capacity = capacity_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self.size = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def get(self, uri: str) -> bytes:
        with self._lock:
            data = self._items.get(uri)
            if data is not None:
                self._items.move_to_end(uri)
                self.hits += 1
                return data
        location = S3Uri.parse(uri)
        data = self.store.get_bytes(location.bucket, location.key)
        with self._lock:
            self.misses += 1
            if len(data) <= self.capacity and uri not in self._items:
                self._items[uri] = data
                self.size += len(data)
                while self.size > self.capacity:
                    _, old = self._items.popitem(last=False)
                    self.size -= len(old)
        return data


def decode_frames_for(data: bytes, job: DecodeJob, stats: dict[str, int]) -> np.ndarray | MixedFrames:
    """The frames of one job in the layout its streams need (:func:`frames_layout`): a grey stack, the
    colour stack, or a grey stack and the few colour frames some stream takes, converted from the same
    decoded frames; only colour frames (rgb alone): decoded from the keyframe before the first of them."""
    count, size = job.length + 1, (job.height, job.width)
    gray, colour_at = frames_layout(job.features, count)
    if colour_at is None:
        return decode_segment(data, job.video, job.offset, count, size, pix_fmt="rgb24", stats=stats)
    if not colour_at:
        return decode_segment(data, job.video, job.offset, count, size, pix_fmt="gray", stats=stats)
    colour: dict[int, np.ndarray] = {}
    if gray:
        stack = decode_segment(data, job.video, job.offset, count, size, pix_fmt="gray", stats=stats,
                               colour=colour, colour_at=colour_at)
        return MixedFrames(count, stack, colour)
    first, last = colour_at[0], colour_at[-1]
    span = decode_segment(data, job.video, job.offset + first, last - first + 1, size, pix_fmt="rgb24", stats=stats)
    return MixedFrames(count, None, {i: span[i - first] for i in colour_at})


def stack_format(job: DecodeJob) -> str:
    """The pixel format of the stack stored for the job: "gray" when there is a grey stack."""
    gray, _ = frames_layout(job.features, job.length + 1)
    return "gray" if gray else "rgb24"


class DecodeWorker(ResidentWorker):
    kind = "decode"
    family: ClassVar[str] = "decode"
    NOT_FOUND_RETRIES_S: ClassVar[tuple[float, ...]] = (1.0, 3.0)  # reads again before a video is "missing"
    MAX_ATTEMPTS: ClassVar[int] = 3  # decodes of one sample begun (crashed or hung) before it is given up

    def __init__(self, settings: Settings, **kwargs) -> None:  # noqa: ANN003
        super().__init__(settings, **kwargs)
        self.cache = VideoCache(ObjectStore(settings), settings.video_cache_mb * 1024 * 1024)
        self._stores: dict[str, SampleStore] = {}
        self._finished_videos: dict[str, list[str]] = {}  # per run: decoded since the counts were written
        self.counters.update({"work_cpu_s": 0.0, "frames": 0, "frames_decoded": 0})

    def group_id(self) -> str:
        return f"{self.settings.topic_prefix}.decode"

    def pattern(self) -> str:
        return self.topics.decode_pattern(self.run_filter)

    def expected(self) -> tuple[type[Message], ...]:
        return (DecodeChunk,)

    def store(self, run: str) -> SampleStore:
        if run not in self._stores:
            self._stores[run] = SampleStore(self.settings, run)
        return self._stores[run]

    def skip_stopped(self, received: Received, run: str) -> None:
        super().skip_stopped(received, run)
        chunk = received.message
        assert isinstance(chunk, DecodeChunk)
        for job in chunk.jobs:
            self.store(run).abandon(job.sample_id, list(job.features))

    def give_up(self, received: Received, reason: str, *, run: str | None) -> None:
        """Every sample of the chunk that no stream has taken yet is dead-lettered by name and abandoned
        (its slot freed); one a stream already took or extracted goes on (it is not lost)."""
        chunk = received.message
        assert isinstance(chunk, DecodeChunk)
        store = self.store(chunk.run)
        for job in chunk.jobs:
            streams = list(job.features)
            states = [store.stream_state(job.sample_id, s) for s in streams]
            if any(state is not None and state != TO_EXTRACT for state in states):
                continue
            store.abandon(job.sample_id, streams)
            self.dead_letter(received, reason, run=job.run, epoch=job.epoch, sample_id=job.sample_id,
                             video=job.video, payload=job)

    def handle(self, received: Received) -> None:
        chunk = received.message
        assert isinstance(chunk, DecodeChunk)
        store = self.store(chunk.run)
        todo = list(chunk.jobs)
        while todo:
            granted = self._wait_for_slots(store, todo)
            if not granted:
                raise WorkInterrupted(f"stopping while sample {todo[0].sample_id} waited for a slot")
            batch, todo = todo[:granted], todo[granted:]
            decoded = [(job, frames) for job in batch if (frames := self._decode(received, job, store)) is not None]
            self._store_and_announce(store, decoded)

    def _fetch(self, video: str) -> bytes:
        """The video's bytes; :class:`ObjectNotFound` only when it is really gone. An S3 server that is
        starting answers "not found" for a while (its filer not loaded yet): a missing bucket is an S3
        outage (retried by the caller), and a missing key is read again before the video is given up."""
        for wait_s in self.NOT_FOUND_RETRIES_S:
            try:
                return self.cache.get(video)  # S3 on a miss: the plane's cost, not decode work
            except ObjectNotFound as exc:
                location = S3Uri.parse(video)
                if not self.cache.store.bucket_exists(location.bucket):
                    raise ServiceUnavailable("S3", self.settings.s3_url, f"bucket {location.bucket} not found "
                                             f"({exc})", "S3 starting, or the wrong endpoint") from None
                log.info("%s not found; reading it again in %.1fs before giving it up", video, wait_s)
                if self.stopping.wait(wait_s):
                    raise WorkInterrupted(f"stopping while {video} was read again") from None
        return self.cache.get(video)

    def _decode(self, received: Received, job: DecodeJob, store: SampleStore):  # noqa: ANN202
        stats: dict[str, int] = {}
        started = None
        try:
            data = self._fetch(job.video)
            # A poison video (one that crashes the decoder's process or hangs it) must not take the
            # decode pool down in turn: each decode of a video is counted before it starts, and a video
            # whose decodes began more than MAX_ATTEMPTS times without one finishing is quarantined (its
            # other samples fail at once).
            begun = store.start_attempt(job.video, self._finished_videos.pop(job.run, []))
            if begun > self.MAX_ATTEMPTS:
                self._fail(received, job, store, f"video {job.video}: the decoder crashed or hung {begun - 1} "
                                                 f"times on frames {job.offset}..{job.offset + job.length} "
                                                 f"(over {self.settings.decode_timeout_s:.0f} s, or its process "
                                                 "ended): given up")
                return None
            started = time.thread_time()
            # A hang ends the process: faulthandler's own thread (no GIL needed) dumps the stacks and exits
            # after decode_timeout_s; the fleet (a Deployment, a supervisor) starts the worker again.
            faulthandler.dump_traceback_later(self.settings.decode_timeout_s, exit=True)
            try:
                failpoint("decode", job.video)
                frames = decode_frames_for(data, job, stats)
            finally:
                faulthandler.cancel_dump_traceback_later()
        except (VideoError, ObjectNotFound) as exc:
            self._fail(received, job, store, str(exc))
            return None
        except (ServiceUnavailable, WorkInterrupted):
            raise
        except Exception as exc:  # noqa: BLE001 - the decoder's own error on this video: this sample only
            if started is None:
                raise  # S3 answered with an error (403, ...): the chunk is retried, then dead-lettered
            self._fail(received, job, store, f"video {job.video}: the decoder failed on frames {job.offset}.."
                                             f"{job.offset + job.length}: {type(exc).__name__}: {exc}",
                       quarantine=False)
            return None
        finally:
            if started is not None:  # the work counter: CPU of this thread inside the decode itself
                self.count("work_cpu_s", time.thread_time() - started)
        self._finished_videos.setdefault(job.run, []).append(job.video)  # cleared with the next round trip
        self.count("frames", stats.get("used", 0))
        self.count("frames_decoded", stats.get("decoded", 0))
        return frames

    def _store_and_announce(self, store: SampleStore, decoded: list[tuple[DecodeJob, object]]) -> None:
        if not decoded:
            return
        todo = store.put_frames_many([(job.sample_id, frames, list(job.features)) for job, frames in decoded])
        store.finish_attempts(self._finished_videos.pop(store.run, []))
        fresh = [job for (job, _), n in zip(decoded, todo, strict=True) if n]
        self.count("duplicates", len(decoded) - len(fresh))  # every stream already had it: a redelivered job
        self.count("jobs_done", len(decoded))
        if fresh:
            first = fresh[0]
            self.publish(self.topics.frames(first.run, first.epoch),
                         FramesReady(jobs=fresh, pix_fmt=stack_format(first)), key=first.sample_id)

    def _wait_for_slots(self, store: SampleStore, jobs: list[DecodeJob]) -> int:
        """Back-pressure: block until the first samples hold in-flight slots (or the worker stops: 0);
        returns how many do."""
        started = None
        limit = jobs[0].max_inflight
        # Whole chunks when the bound allows (a chunk is at most a quarter of it, essp.dataplane.plan): a
        # worker that took whatever was free would cut the epoch's chunks into ever smaller pieces, each
        # with its notices and commits (measured: 11 samples a notice on average instead of 16).
        least = min(len(jobs), max(1, limit // 4))
        while not (granted := store.acquire_many([job.sample_id for job in jobs], limit, least=least)):
            if started is None:
                started = time.monotonic()
            if self.stopping.wait(0.05):
                return 0
            if self.consumer is not None:
                self.consumer.keep_alive()
        if started is not None:
            self.count("waited_s", time.monotonic() - started)
        return granted

    def _fail(self, received: Received, job: DecodeJob, store: SampleStore, reason: str, *,
              quarantine: bool = True) -> None:
        """Dead-letter one sample; ``quarantine``: the video itself is bad (the next epochs leave it out)."""
        log.warning("sample %s of run %s: %s", job.sample_id, job.run, reason)
        self.count("failures")
        if quarantine:
            store.quarantine(job.video, reason)
        store.abandon(job.sample_id, list(job.features))
        self.dead_letter(received, reason, run=job.run, epoch=job.epoch, sample_id=job.sample_id,
                         video=job.video, payload=job)
