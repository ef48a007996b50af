"""The trainer's side of the data plane: ready samples of one stream, prefetched in the background.

:class:`SampleStream` is one member of the consumer group of (run, stream): a background thread reads
the stream's ready notices (chunks of samples, in each epoch's own topic) and the run's dead letters,
takes a chunk's payloads out of Redis in one round trip (which frees each sample's in-flight slot once
every stream has it), queues them, up to ``prefetch`` samples ahead, and then commits what it read, only
for the partitions it read, at most every ``commit_interval_s`` (and at once when it goes idle or stops).
:meth:`SampleStream.epoch` yields the samples of one epoch exactly once each (duplicates from
at-least-once delivery are dropped), ends when every planned sample has arrived or is known dead,
and counts the time the trainer spent waiting for data. Several members of one group split the
samples between them (under DDP one rank reads and hands sub-batches to the others, see
essp.training.trainer).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from essp.clients.kafka import MessageConsumer, MessageProducer, RebalancedDuringWork
from essp.contract import DeadLetter, DecodeChunk, DecodeJob, FeatureReady, RedisKeys, Topics, WorkerEvent
from essp.dataplane.payloads import SampleStore
from essp.errors import EsspError, ServiceUnavailable
from essp.settings import Settings

log = logging.getLogger("essp.dataplane.consumer")


# How long the stream's fetch may wait at the broker for a ready notice. The local broker (Tansu) answers
# an empty fetch only after sleeping half of this, and a produce does not wake it: a trainer that caught
# up with the plane then waited up to 250 ms for each chunk at the default 500 (data wait 13.8% at 80% of
# the plane's rate in `essp bench dataplane`, 4.5% at 100). The price: an idle stream costs the broker
# and itself ~40 ms of CPU a second instead of ~21 (a trainer is idle only between epochs).
READY_FETCH_WAIT_MS = 100


class EpochStalled(EsspError):
    """No sample arrived for too long: the workers are missing, paused or failing."""


class StreamClosed(EsspError):
    """The stream was interrupted (the trainer is stopping) while the epoch waited for samples."""


@dataclass(frozen=True)
class Sample:
    sample_id: str
    epoch: int
    label: int
    array: np.ndarray
    job: DecodeJob


@dataclass(frozen=True)
class _Dead:
    sample_id: str
    epoch: int
    reason: str


@dataclass
class StreamStats:
    delivered: int = 0
    dead: int = 0
    duplicates: int = 0
    redone: int = 0
    waited_s: float = 0.0
    dead_reasons: list[str] = field(default_factory=list)


class SampleStream:
    """Yields ready samples of one stream of one run; see the module's doc."""

    def __init__(self, settings: Settings, run: str, stream: str, *, prefetch: int | None = None,
                 group_id: str | None = None, poll_s: float = 0.5) -> None:
        self.settings = settings
        self.run = run
        self.stream = stream
        self.topics = Topics(settings.topic_prefix)
        self.store = SampleStore(settings, run)
        self.prefetch = prefetch or settings.prefetch_depth
        self.group_id = group_id or f"{settings.topic_prefix}.consume.{run}.{stream}"
        self.poll_s = poll_s
        self.stats = StreamStats()
        self._queue: queue.Queue[Sample | _Dead] = queue.Queue(maxsize=self.prefetch)
        self._carry: list[Sample | _Dead] = []
        # What the foreground has done, read by the background thread: the last epoch it finished and the
        # samples the current one has had. A late copy of either (a redo that crossed its original, work
        # redone after Redis lost the "consumed" state) is taken, freeing its payload and slot, and dropped
        # there, never queued nor made again (found by the fault suite: such a copy arriving after its
        # epoch sat in Redis, holding an in-flight slot, until its TTL).
        self._finished = -1
        self._had: tuple[int, set[str]] = (-1, set())
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._consumer = MessageConsumer(
            settings, self.group_id, pattern=self.topics.ready_pattern(run, stream),
            dead_letter_topic=self.topics.dead, expected=(FeatureReady, DeadLetter),
            fetch_max_wait_ms=READY_FETCH_WAIT_MS)
        self._producer = MessageProducer(settings)
        self._thread = threading.Thread(target=self._fill, name=f"essp-prefetch-{stream}", daemon=True)
        self._thread.start()

    # -- background ---------------------------------------------------------------------------------
    def _fill(self) -> None:
        read: dict[tuple[str, int], int] = {}  # queued, not yet committed: the next offset per partition

        def commit(partitions: set[tuple[str, int]] | None = None) -> None:
            todo = {tp: o for tp, o in read.items() if partitions is None or tp in partitions}
            if not todo:
                return
            try:
                self._consumer.commit(todo)
            except RebalancedDuringWork as exc:
                log.info("commit refused after a rebalance: %s", exc)
            except ServiceUnavailable as exc:  # the broker away: kept, committed with the next ones
                log.warning("commit failed, retried later: %s", exc)
                return
            for tp in todo:
                read.pop(tp, None)

        self._consumer.before_release = commit
        committed_at = time.monotonic()
        try:
            outage = 0.25
            while not self._stop.is_set():
                try:
                    batch = self._consumer.poll(self.poll_s, max_records=1)
                except ServiceUnavailable as exc:
                    # Redis (leases) or the broker away: ride it out (the iterating side times out on
                    # its own if nothing comes for the epoch's timeout).
                    outage = min(2 * outage, 5.0)
                    log.warning("%s; polling again in %.1fs", exc, outage)
                    self._stop.wait(outage)
                    continue
                outage = 0.25
                for received in batch:
                    for item in self._receive(received.message):
                        if not self._put(item):
                            commit()
                            return
                    read[(received.topic, received.partition)] = received.offset + 1
                # Batched in time like the workers' commits (each costs the local broker S3 writes).
                if read and (not batch or time.monotonic() - committed_at >= self.settings.commit_interval_s):
                    commit()
                    committed_at = time.monotonic()
            commit()
        except BaseException as exc:  # noqa: BLE001 - handed to the iterating thread
            self._error = exc

    def _put(self, item: Sample | _Dead) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                self._consumer.keep_alive()
        return False

    def _receive(self, message: FeatureReady | DeadLetter) -> list[Sample | _Dead]:
        if isinstance(message, DeadLetter):
            if message.run != self.run or message.sample_id is None or message.epoch is None:
                return []
            if message.stream not in (None, self.stream):
                return []  # another stream lost it; this one still gets it
            return [_Dead(message.sample_id, message.epoch, message.reason)]
        if message.stream != self.stream:
            return []
        jobs = message.jobs
        delay = 0.5
        while True:
            try:
                taken = self.store.take_many(self.stream, [job.sample_id for job in jobs])
                break
            except ServiceUnavailable as exc:  # Redis restarting: stall, then go on
                log.warning("%s; retrying", exc)
                if self._stop.wait(delay):
                    return []
                delay = min(2 * delay, 10.0)
        items: list[Sample | _Dead] = []
        lost: list[DecodeJob] = []
        for job, got in zip(jobs, taken, strict=True):
            if self._done_with(job):  # a late copy: taken (freed) or lost, either way not wanted again
                if got.status != "lost":
                    self.stats.duplicates += 1
            elif got.status == "taken":
                assert got.array is not None
                items.append(Sample(job.sample_id, job.epoch, job.label, got.array, job))
            elif got.status == "duplicate":
                self.stats.duplicates += 1
            else:
                lost.append(job)
        if lost:
            # Announced but gone (TTL or a Redis restart) and never consumed: have them made again.
            self._producer.publish(self.topics.decode(self.run, message.epoch), DecodeChunk(jobs=lost),
                                   key=lost[0].sample_id)
            self.stats.redone += len(lost)
        return items

    def _done_with(self, job: DecodeJob) -> bool:
        epoch, had = self._had
        return job.epoch <= self._finished or (job.epoch == epoch and job.sample_id in had)

    # -- foreground -------------------------------------------------------------------------------
    def epoch(self, epoch: int, expected: int, *, timeout_s: float = 120.0,
              keep_waiting: Callable[[], bool] | None = None) -> Iterator[Sample]:
        """Yield each of the ``expected`` samples of ``epoch`` once; samples that died (dead letters)
        count as accounted for. Raises :class:`EpochStalled` after ``timeout_s`` without progress.

        ``keep_waiting``: asked when ``timeout_s`` passes without a sample; true (the run is paused)
        waits on instead of raising."""
        seen: set[str] = set()
        self._had = (epoch, seen)
        pending, self._carry = self._carry, []
        while len(seen) < expected:
            if pending:
                item = pending.pop(0)
            else:
                item = self._next(timeout_s, epoch, len(seen), expected, keep_waiting=keep_waiting)
            if item.epoch > epoch:
                self._carry.append(item)  # the next epoch started early: keep it for then
                continue
            if item.epoch < epoch or item.sample_id in seen:
                self.stats.duplicates += 1
                continue
            seen.add(item.sample_id)
            if isinstance(item, _Dead):
                self.stats.dead += 1
                self.stats.dead_reasons.append(f"{item.sample_id}: {item.reason}")
                continue
            self.stats.delivered += 1
            yield item
        self._finished = max(self._finished, epoch)
        self._carry.extend(pending)

    def _next(self, timeout_s: float, epoch: int, have: int, expected: int,
              keep_waiting: Callable[[], bool] | None = None) -> Sample | _Dead:
        started = time.monotonic()
        progress = started
        while True:
            if self._stop.is_set():
                self.stats.waited_s += time.monotonic() - started
                raise StreamClosed(f"stream {self.stream} of run {self.run}: interrupted in epoch {epoch} "
                                   f"({have} of {expected} accounted for)")
            if self._error is not None:
                raise EsspError(f"stream {self.stream} of run {self.run}: the prefetch thread failed: "
                                f"{self._error}") from self._error
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() - progress > timeout_s and keep_waiting is not None and keep_waiting():
                    progress = time.monotonic()
                if time.monotonic() - progress > timeout_s:
                    self.stats.waited_s += time.monotonic() - started
                    raise EpochStalled(
                        f"stream {self.stream} of run {self.run}, epoch {epoch}: no sample for {timeout_s:.0f}s "
                        f"({have} of {expected} accounted for); are the decode and {self.stream} workers "
                        f"running and the run not paused?{self._worker_errors()}") from None
                continue
            self.stats.waited_s += time.monotonic() - started
            return item

    def _worker_errors(self) -> str:
        """The errors live workers report now (e.g. Redis full), for a stalled epoch's message."""
        try:
            client = self.store.redis
            errors = []
            for key in client.scan_iter(match=RedisKeys(self.settings.redis_prefix).workers(), count=1000):
                raw = client.get(key)
                event = WorkerEvent.model_validate_json(raw) if raw else None
                if event is not None and (event.event == "error" or (event.detail or "").startswith("error:")):
                    errors.append(f"{event.worker_id}: {(event.detail or '').removeprefix('error: ')}")
        except Exception:  # noqa: BLE001 - only a hint in an error message
            return ""
        return (" Workers report: " + "; ".join(sorted(errors)[:5])) if errors else ""

    def interrupt(self) -> None:
        """Make a waiting :meth:`epoch` raise :class:`StreamClosed` (from another thread or a signal)."""
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()
        self._producer.close()

    def __enter__(self) -> SampleStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

