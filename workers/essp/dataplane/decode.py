"""The decode worker: DecodeJob in, L+1 resized frames in Redis and a FramesReady notice out.

For each job: take an in-flight slot for the sample (wait while the run is at its bound: producers
wait, they never drop), fetch the video through an in-memory LRU of bytes, seek and decode the
frames (essp.datasets.video verifies the first frame's timestamp), store them with a TTL, publish the notice.
The base class commits the job only after that. A video that cannot be decoded is dead-lettered
on the run's dead topic with the reason, recorded in the run's quarantine hash, and its sample is
abandoned (slot freed) so the epoch goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import ClassVar

from essp.clients.kafka import Received
from essp.clients.redis import redis_client
from essp.clients.s3 import ObjectNotFound, ObjectStore, S3Uri
from essp.contract import DecodeJob, FramesReady, Message
from essp.dataplane.payloads import SampleStore
from essp.dataplane.resident import ResidentWorker, WorkInterrupted
from essp.datasets.video import VideoError, decode_segment
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


class DecodeWorker(ResidentWorker):
    kind = "decode"
    family: ClassVar[str] = "decode"
    max_records: ClassVar[int] = 2

    def __init__(self, settings: Settings, **kwargs) -> None:  # noqa: ANN003
        super().__init__(settings, **kwargs)
        self.cache = VideoCache(ObjectStore(settings), settings.video_cache_mb * 1024 * 1024)
        self._stores: dict[str, SampleStore] = {}

    def group_id(self) -> str:
        return f"{self.settings.topic_prefix}.decode"

    def pattern(self) -> str:
        return self.topics.decode_pattern(self.run_filter)

    def expected(self) -> tuple[type[Message], ...]:
        return (DecodeJob,)

    def store(self, run: str) -> SampleStore:
        if run not in self._stores:
            self._stores[run] = SampleStore(self.settings, run)
        return self._stores[run]

    def skip_stopped(self, received: Received, run: str) -> None:
        super().skip_stopped(received, run)
        job = received.message
        assert isinstance(job, DecodeJob)
        self.store(run).abandon(job.sample_id, list(job.features))

    def handle(self, received: Received) -> None:
        job = received.message
        assert isinstance(job, DecodeJob)
        store = self.store(job.run)
        streams = list(job.features)
        if not self._wait_for_slot(store, job):
            raise WorkInterrupted(f"stopping while sample {job.sample_id} waited for a slot")
        try:
            data = self.cache.get(job.video)
            frames = decode_segment(data, job.video, job.offset, job.length + 1, (job.height, job.width))
        except (VideoError, ObjectNotFound) as exc:
            self._fail(received, job, store, str(exc))
            return
        todo = store.put_frames(job.sample_id, frames, streams)
        if todo:
            self.publish(self.topics.frames(job.run),
                         FramesReady(job=job, key=store.frames_key(job.sample_id), shape=list(frames.shape)),
                         key=job.sample_id)
        else:
            self.count("duplicates")  # every stream already has it: a redelivered job
        self.count("jobs_done")
        self.count("frames", len(frames))

    def _wait_for_slot(self, store: SampleStore, job: DecodeJob) -> bool:
        """Back-pressure: block until the sample holds an in-flight slot (or the worker stops)."""
        started = None
        while not store.acquire(job.sample_id, job.max_inflight):
            if started is None:
                started = time.monotonic()
            if self.stopping.wait(0.05):
                return False
            if self.consumer is not None:
                self.consumer.keep_alive()
        if started is not None:
            self.count("waited_s", time.monotonic() - started)
        return True

    def _fail(self, received: Received, job: DecodeJob, store: SampleStore, reason: str) -> None:
        log.warning("sample %s of run %s: %s", job.sample_id, job.run, reason)
        self.count("failures")
        redis_client(self.settings).hset(self.keys.quarantine(job.run), job.video, reason)
        store.abandon(job.sample_id, list(job.features))
        self.dead_letter(received, reason, run=job.run, epoch=job.epoch, sample_id=job.sample_id,
                         video=job.video)
