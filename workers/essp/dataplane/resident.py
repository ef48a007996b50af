"""What every resident worker shares: a consumer-group loop with exact commits, control commands,
per-run pause/stop, heartbeats with counters, and a clean shutdown.

A worker serves every run: it subscribes to a topic pattern (``essp.<any run>.decode``), so a new
run's topics are picked up without a restart, and a new worker process takes partitions over by
rebalance (elasticity). A record is a chunk of samples (see essp.dataplane.plan). Notices are sent
without waiting for the broker, and the producer is flushed (every notice acknowledged) before the
offsets of the records they answer are committed, only for the partitions read. Commits are batched in
time (``commit_interval_s``; each costs the local broker S3 writes), and made at once when the worker goes
idle, stops, or is about to hand partitions over: a worker killed mid-chunk leaves what it had not
committed (at most that interval's chunks) to the next owner of its partition, which redoes it
(idempotent per sample).

Control (topic ``essp.control``): every worker reads every command (no consumer group, from the end)
and obeys those whose ``target`` is ``*``, its kind or its id. Without a run, pause / resume / stop
apply to the worker; with a run they apply to that run, whose state also lives in Redis
(:class:`RunControl`) so that a worker started later obeys it too.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import redis
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from essp.clients.kafka import (
    BOOTSTRAP_TIMEOUT_MS,
    NO_AUTO_CREATE,
    MessageConsumer,
    MessageProducer,
    RebalancedDuringWork,
    Received,
    ensure_topics,
)
from essp.clients.redis import redis_client
from essp.contract import ControlCommand, DeadLetter, Message, RedisKeys, Topics, WorkerEvent, decode, encode
from essp.errors import MalformedMessage, ServiceUnavailable
from essp.settings import Settings
from essp.stack.procs import on_stop_signals

log = logging.getLogger("essp.worker")

RUN_STATES = ("running", "paused", "stopped")
# How long the broker may hold a control fetch that finds nothing. Tansu reads the partition, sleeps half
# of this, and answers (a produce does not wake it; the next fetch sees the command): an idle listener
# costs the local broker a fetch (object-store reads) every second instead of four times a second, and a
# command waits at most about a second (see docs/dataplane.md, "Idle costs").
CONTROL_FETCH_WAIT_MS = 2000
_SET_LIVE_KEY = "#!lua flags=allow-oom\nreturn redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])"
# How long a worker's heartbeats carry its last error (a stalled epoch's message names it).
ERROR_SHOWN_S = 30.0


def limit_threads() -> None:
    """One compute thread per worker process: parallelism comes from processes (replicas), and
    threads of OpenCV / BLAS / torch would fight over the same cores."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    import cv2

    cv2.setNumThreads(1)
    import sys

    if "torch" in sys.modules:  # never import torch only to configure it
        sys.modules["torch"].set_num_threads(1)


class RunControl:
    """The state of each run (running / paused / stopped) in Redis, read with a short cache."""

    CACHE_S = 1.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = RedisKeys(settings.redis_prefix)
        self._cache: dict[str, tuple[float, str]] = {}
        self._known: dict[str, str] = {}  # the last state read or set, kept across forget()

    def set(self, run: str, state: str) -> None:
        if state not in RUN_STATES:
            raise ValueError(f"run state {state!r} is not one of {', '.join(RUN_STATES)}")
        redis_client(self.settings).set(self.keys.run_state(run), state)
        self._cache.pop(run, None)
        self._known[run] = state

    def get(self, run: str, *, fresh: bool = False) -> str:
        now = time.monotonic()
        cached = self._cache.get(run)
        if cached and not fresh and now - cached[0] < self.CACHE_S:
            return cached[1]
        known = self._known.get(run)
        try:
            client = redis_client(self.settings)
            value = client.get(self.keys.run_state(run))
            if value is None and known in ("paused", "stopped"):
                # Redis lost the key (restarted empty): a paused or stopped run must not silently become
                # running again. Resume writes "running" explicitly, so a missing key after a pause or
                # stop is a loss; put the state back (unless someone wrote one meanwhile).
                client.set(self.keys.run_state(run), known, nx=True)
                value = client.get(self.keys.run_state(run))
                log.warning("run %s: its state was gone from Redis (restarted?); restored %s", run, known)
        except redis.RedisError:
            # Redis away: keep the last known state; the job itself will stall until Redis is back.
            return known or "running"
        state = value.decode() if value else "running"
        self._cache[run] = (now, state)
        self._known[run] = state
        return state

    def forget(self, run: str) -> None:
        self._cache.pop(run, None)


def publish_control(settings: Settings, command: str, *, run: str | None = None, target: str = "*",
                    epoch: int | None = None) -> ControlCommand:
    """Record a run's new state in Redis (for workers that start later) and tell every worker now."""
    if run and command in ("pause", "resume", "stop"):
        RunControl(settings).set(run, {"pause": "paused", "resume": "running", "stop": "stopped"}[command])
    message = ControlCommand(command=command, run=run, target=target, epoch=epoch)
    with MessageProducer(settings) as producer:
        producer.publish(Topics(settings.topic_prefix).control, message)
    return message


class ControlListener(threading.Thread):
    """Reads every control command from now on (no group: each worker must see all of them)."""

    def __init__(self, settings: Settings, on_command: Callable[[ControlCommand], None],
                 stopping: threading.Event) -> None:
        super().__init__(name="essp-control", daemon=True)
        self.settings = settings
        self.on_command = on_command
        self.stopping = stopping
        self.topic = Topics(settings.topic_prefix).control
        self.ready = threading.Event()

    def run(self) -> None:
        consumer = None
        while not self.stopping.is_set():
            try:
                if consumer is None:
                    consumer = KafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap,
                                             bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS, group_id=None,
                                             enable_auto_commit=False, fetch_max_wait_ms=CONTROL_FETCH_WAIT_MS,
                                             **NO_AUTO_CREATE)
                    parts = consumer.partitions_for_topic(self.topic) or {0}
                    consumer.assign([TopicPartition(self.topic, p) for p in parts])
                    consumer.seek_to_end()
                    for tp in consumer.assignment():
                        consumer.position(tp)  # resolve "end" now, before we report ready
                    self.ready.set()
                for records in consumer.poll(timeout_ms=500).values():
                    for record in records:
                        try:
                            message = decode(record.value, self.topic, (ControlCommand,))
                        except MalformedMessage as exc:
                            log.warning("ignored a control message: %s", exc)
                            continue
                        self.on_command(message)
            except KafkaError as exc:
                log.warning("control topic unreachable (%s); retrying", exc)
                if consumer is not None:
                    consumer.close()
                    consumer = None
                self.stopping.wait(2.0)
        if consumer is not None:
            consumer.close()


class WorkInterrupted(Exception):
    """Raised by ``handle`` when the worker is stopping before the job is done: it stays uncommitted."""


class ResidentProcess(ABC):
    """What every resident process shares, the data workers and the trainers alike: its id and kind,
    events on the events topic (started, heartbeat, error, stopped) mirrored to its live key in Redis,
    heartbeats with its counters, the control listener, SIGTERM/SIGINT, and telling its launcher that it
    serves (the file ``ESSP_READY_FILE`` names, see :mod:`essp.deploy.local`)."""

    kind: str  # the `worker_kind` of its events: decode, an extractor kind, trainer-<stream>
    family: ClassVar[str]  # a control target that reaches every process of the family: decode, extract, trainer

    def __init__(self, settings: Settings, *, worker_id: str) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.keys = RedisKeys(settings.redis_prefix)
        self.worker_id = worker_id
        self.stopping = threading.Event()
        self.control = RunControl(settings)
        self.producer: MessageProducer | None = None
        self._listener: ControlListener | None = None
        self._started = time.monotonic()

    # -- what subclasses define -------------------------------------------------------------------
    def event_counters(self) -> dict[str, float]:
        """The counters its heartbeats and other events carry."""
        return {}

    def event_run(self) -> str | None:
        """The run its events belong to (a trainer's), or None (data workers serve every run)."""
        return None

    def heartbeat_detail(self) -> str | None:
        return None

    def announces_ready(self) -> bool:
        """Whether this process tells its launcher it serves (under DDP only rank 0 does)."""
        return True

    @abstractmethod
    def obey(self, command: ControlCommand) -> None:
        """Act on a control command addressed to this process (its target already matched)."""

    # -- shared -----------------------------------------------------------------------------------
    def targets(self) -> tuple[str, ...]:
        return ("*", self.family, self.kind, self.worker_id)

    def on_command(self, command: ControlCommand) -> None:
        if command.target in self.targets():
            self.obey(command)

    def stop(self) -> None:
        self.stopping.set()

    def event(self, event: str, *, detail: str | None = None, epoch: int | None = None,
              counters: dict[str, float] | None = None, publish: bool = True) -> None:
        """Publish a WorkerEvent and keep it as the live key (expires when heartbeats stop); never raises.
        ``publish=False`` only updates the live key (a state that changes often, such as going idle: the
        next heartbeat tells the events topic)."""
        values = dict(self.event_counters() if counters is None else counters)
        values["uptime_s"] = round(time.monotonic() - self._started, 3)
        message = WorkerEvent(event=event, worker_id=self.worker_id, worker_kind=self.kind, run=self.event_run(),
                              epoch=epoch, counters=values, detail=detail)
        try:
            if self.producer is not None and publish:
                self.producer.publish(self.topics.events, message, key=self.worker_id, wait=False, tracked=False)
            # A script flagged allow-oom: a worker must still say why it waits when Redis is full.
            redis_client(self.settings).eval(_SET_LIVE_KEY, 1, self.keys.worker(self.worker_id), encode(message),
                                             max(10, int(self.settings.heartbeat_s * 3)))
        except Exception as exc:  # noqa: BLE001 - an event never kills a resident process
            log.warning("could not send %s event: %s", event, exc)

    def _heartbeats(self) -> None:
        while not self.stopping.wait(self.settings.heartbeat_s):
            self.event("heartbeat", detail=self.heartbeat_detail())

    def start_resident(self, *, install_signals: bool = True, detail: str | None = None) -> None:
        """Signals, the producer, the control listener and heartbeats; then the "started" event, and the
        launcher is told this process serves."""
        if install_signals:  # SIGTERM/SIGINT call stop(), safely (see on_stop_signals)
            on_stop_signals(self.stop)
        # The shared topics it reads and writes; clients never create a topic by naming it (clients.kafka).
        ensure_topics(self.settings, [self.topics.control, self.topics.events, self.topics.dead])
        self.producer = MessageProducer(self.settings)
        self._listener = ControlListener(self.settings, self.on_command, self.stopping)
        self._listener.start()
        self._listener.ready.wait(15)
        threading.Thread(target=self._heartbeats, name="essp-heartbeat", daemon=True).start()
        self.event("started", detail=detail)
        if self.announces_ready():
            mark_ready(self.settings, self.worker_id)

    def stop_resident(self) -> None:
        """The "stopped" event, then the producer and the control listener close."""
        self.stopping.set()
        self.event("stopped")
        if self.producer is not None:
            self.producer.close()
        if self._listener is not None:
            self._listener.join(5)


def mark_ready(settings: Settings, worker_id: str) -> None:
    """Write the ready file its launcher waits for (``ESSP_READY_FILE``), if it gave one."""
    path = settings.ready_file
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "worker": worker_id, "at": time.time()}))
    tmp.replace(path)


class ResidentWorker(ResidentProcess):
    """A long-lived member of one consumer group. Subclasses say what to read and how to handle one
    message; this class does the loop, the commits and the run controls, :class:`ResidentProcess` the rest."""

    family: ClassVar[str]  # decode | extract
    max_records: ClassVar[int] = 1  # chunks per poll: each is several samples of work
    ATTEMPTS: ClassVar[int] = 3  # tries of a record that fails with an unknown error before give_up

    def __init__(self, settings: Settings, *, worker_id: str | None = None, run: str | None = None) -> None:
        super().__init__(settings, worker_id=worker_id or f"{self.kind}-{socket.gethostname()}-{os.getpid()}")
        self.run_filter = run
        self.counters: dict[str, float] = {"jobs_done": 0, "failures": 0, "busy_s": 0.0, "waited_s": 0.0,
                                           "duplicates": 0, "redone": 0, "dead_lettered": 0}
        self.paused = False
        self._outage_delay = 0.25  # the wait before polling again while a service is away (doubles)
        self._last_error: tuple[float, str] | None = None  # (when, what): heartbeats carry it for a while
        self.consumer: MessageConsumer | None = None
        self._lock = threading.Lock()
        self._first_offsets: dict[tuple[str, int], int] = {}
        # Finished but not yet committed, per (topic, partition): the next offset to commit, and the first
        # offset read since the last commit (where to read again if the notices answering them fail).
        self._finished: dict[tuple[str, int], int] = {}
        self._finished_from: dict[tuple[str, int], int] = {}
        self._committed_at = time.monotonic()
        self._worked = False

    # -- what subclasses define -------------------------------------------------------------------
    @abstractmethod
    def group_id(self) -> str: ...

    @abstractmethod
    def pattern(self) -> str: ...

    @abstractmethod
    def expected(self) -> tuple[type[Message], ...]: ...

    @abstractmethod
    def handle(self, received: Received) -> None:
        """Process one message completely (payload in Redis, notice published) or dead-letter it.
        Raise :class:`ServiceUnavailable` to have it retried once the service is back."""

    def run_of(self, received: Received) -> str:
        return self.topics.run_of(received.topic)

    # -- shared helpers ---------------------------------------------------------------------------
    def count(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + amount

    def publish(self, topic: str, message: Message, key: str | None = None) -> None:
        """Send without waiting; the loop flushes before it commits (see the module's doc)."""
        assert self.producer is not None
        self.producer.publish(topic, message, key=key, wait=False)

    def dead_letter(self, received: Received, reason: str, *, run: str | None, epoch: int | None = None,
                    sample_id: str | None = None, video: str | None = None, stream: str | None = None,
                    payload: Message | None = None) -> None:
        """Publish a dead letter for the record, or for one sample of it (``payload``: its job)."""
        letter = DeadLetter(reason=reason, source_topic=received.topic, source_partition=received.partition,
                            source_offset=received.offset, run=run, epoch=epoch, sample_id=sample_id,
                            video=video, stream=stream,
                            payload_b64=base64.b64encode(encode(payload or received.message)).decode())
        topic = self.topics.run_dead(run) if run else self.topics.dead
        self.publish(topic, letter, key=sample_id)
        self.count("dead_lettered")

    def event_counters(self) -> dict[str, float]:
        with self._lock:
            counters = dict(self.counters)
        if self.consumer is not None:  # malformed messages the consumer dead-lettered itself
            counters["dead_lettered"] += self.consumer.dead_lettered
        return counters

    def heartbeat_detail(self) -> str | None:
        if self.paused:
            return "paused"
        if self._last_error and time.monotonic() - self._last_error[0] < ERROR_SHOWN_S:
            return f"error: {self._last_error[1]}"  # what a stalled epoch's message quotes
        return None if self._worked else "idle"  # idle: its last poll found no work

    def event(self, event: str, *, detail: str | None = None, **kwargs) -> None:  # noqa: ANN003
        if event == "error" and detail:
            self._last_error = (time.monotonic(), detail)
        super().event(event, detail=detail, **kwargs)

    # -- control ------------------------------------------------------------------------------------
    def obey(self, command: ControlCommand) -> None:
        if command.run:
            self.control.forget(command.run)  # re-read its state from Redis now
            return
        if command.command == "pause":
            self.paused = True
            self.event("heartbeat", detail="paused")
        elif command.command == "resume":
            self.paused = False
            self.event("heartbeat", detail="resumed")
        elif command.command == "stop":
            self.stop()

    # -- the loop -----------------------------------------------------------------------------------
    def _paused_partitions(self) -> set:
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        if self.paused:
            return set(assigned)
        held = set()
        for tp in assigned:
            try:
                if self.control.get(self.topics.run_of(tp.topic)) == "paused":
                    held.add(tp)
            except ValueError:
                continue
        return held

    def serve(self, *, install_signals: bool = True, ready: threading.Event | None = None) -> dict[str, float]:
        """Run until stopped (SIGTERM, SIGINT, a stop command, or :meth:`stop`). Returns the counters."""
        self.consumer = MessageConsumer(self.settings, self.group_id(), pattern=self.pattern(),
                                        dead_letter_topic=self.topics.dead, expected=self.expected())
        self.consumer.before_release = self._commit_finished
        self.start_resident(install_signals=install_signals)
        log.info("%s serving %s as group %s", self.worker_id, self.pattern(), self.group_id())
        if ready is not None:
            ready.set()
        try:
            while not self.stopping.is_set():
                self._step()
        finally:
            try:
                self._commit_finished()
            except Exception as exc:  # noqa: BLE001 - left uncommitted, the next owner redoes it
                log.warning("final commit failed, the last jobs will be redone: %s", exc)
            self.stop_resident()
            self.consumer.close()
        return dict(self.counters)

    def _step(self) -> None:
        assert self.consumer is not None
        try:
            self.consumer.pause_only(self._paused_partitions())
            batch = self.consumer.poll(timeout_s=0.5, max_records=self.max_records)
        except ServiceUnavailable as exc:
            # Redis (partition leases) or the broker away: wait, then poll again; what was read and not
            # committed stays with this member or goes to the next owner of its partitions.
            self._outage_delay = min(2 * self._outage_delay, 5.0)
            log.warning("%s; polling again in %.1fs", exc, self._outage_delay)
            self.event("error", detail=str(exc), publish=False)
            self.stopping.wait(self._outage_delay)
            return
        self._outage_delay = 0.25
        if not batch and self._worked:
            # Going idle: the live key now carries the counters of the work just finished (a monitor or the
            # benchmark reads exact figures at an epoch's end without waiting for the next heartbeat). Not
            # on the events topic: a worker goes idle between most chunks while it waits for the stage
            # before it, and each event there costs the local broker S3 writes (~8 ms of its CPU); the next
            # heartbeat publishes the counters.
            self._worked = False
            self.event("heartbeat", detail="idle", publish=False)
        self._worked = self._worked or bool(batch)
        self._first_offsets = {}
        for received in batch:
            self._first_offsets.setdefault((received.topic, received.partition), received.offset)
        done: dict[tuple[str, int], int] = {}
        held: set[tuple[str, int]] = set()
        for received in batch:
            tp = (received.topic, received.partition)
            if tp in held:
                continue
            if self._decide(received) == "hold" or not self._handle_with_retry(received):
                # Leave it (and what follows on its partition) for later, or for another member.
                self.consumer.rewind(received.topic, received.partition, received.offset)
                held.add(tp)
                continue
            done[tp] = received.offset + 1
        for tp, offset in done.items():
            self._finished[tp] = offset
            self._finished_from.setdefault(tp, self._first_offsets[tp])
        # Commits cost the broker S3 writes: batched in time, and at once on going idle or stopping.
        if self._finished and (not batch or self.stopping.is_set()
                               or time.monotonic() - self._committed_at >= self.settings.commit_interval_s):
            self._commit_finished()

    def _commit_finished(self, partitions: set[tuple[str, int]] | None = None) -> None:
        """Commit the finished records (of ``partitions`` only, when given: those about to leave this member),
        after every notice they produced is acknowledged. If a notice failed, they are read again here."""
        todo = {tp: o for tp, o in self._finished.items() if partitions is None or tp in partitions}
        if not todo or self.consumer is None:
            return
        try:
            assert self.producer is not None
            self.producer.flush()  # every notice of these records acknowledged before their commit
            self.consumer.commit(todo)
        except RebalancedDuringWork as exc:
            log.info("commit refused after a rebalance (the new owner redoes the work): %s", exc)
        except ServiceUnavailable as exc:
            log.warning("notices or commit failed, the jobs will be redone: %s", exc)
            for topic, partition in todo:  # read them again here (idempotent per sample)
                if partitions is None:
                    self.consumer.rewind(topic, partition, self._finished_from[(topic, partition)])
        finally:
            for tp in todo:
                self._finished.pop(tp, None)
                self._finished_from.pop(tp, None)
            if partitions is None:
                self._committed_at = time.monotonic()

    def _decide(self, received: Received) -> str:
        """process / hold (worker or run paused, or stopping)."""
        if self.paused or self.stopping.is_set():
            return "hold"
        try:
            run = self.run_of(received)
        except ValueError:
            return "process"
        return "hold" if self.control.get(run) == "paused" else "process"

    def skip_stopped(self, received: Received, run: str) -> None:
        """A job of a stopped run is committed without work; subclasses may clean up its sample."""
        self.count("skipped")

    def _handle_with_retry(self, received: Received) -> bool:
        """True when the message is finished with (processed, skipped or dead-lettered)."""
        delay, attempts = 0.5, 0
        try:
            run: str | None = self.run_of(received)
        except ValueError:
            run = None
        while True:
            if run and self.control.get(run) == "stopped":
                self.skip_stopped(received, run)
                return True
            started = time.monotonic()
            try:
                self.handle(received)
                self.count("busy_s", time.monotonic() - started)
                return True
            except WorkInterrupted:
                return False
            except ServiceUnavailable as exc:
                # Redis or Kafka restarting: stall, then resume where we were (nothing committed).
                log.warning("%s; retrying in %.1fs", exc, delay)
                self.event("error", detail=str(exc))
                if self.stopping.wait(delay):
                    return False
                delay = min(delay * 2, 10.0)
            except Exception as exc:  # noqa: BLE001 - one bad message must not kill the worker
                # An error of a kind the worker does not know (a Redis ResponseError, an S3 403, a bug):
                # maybe transient, so tried again a few times; then every sample of the record is
                # dead-lettered by name (give_up), so that the consumers account for them and free their
                # slots, instead of one anonymous letter that nobody can match to a sample.
                attempts += 1
                self.count("failures")
                reason = f"{type(exc).__name__}: {exc}"
                if attempts < self.ATTEMPTS:
                    log.warning("job failed (attempt %d of %d), retrying in %.1fs: %s", attempts, self.ATTEMPTS,
                                delay, reason)
                    self.event("error", detail=reason)
                    if self.stopping.wait(delay):
                        return False
                    delay = min(delay * 2, 10.0)
                    continue
                log.exception("job failed %d times, dead-lettered: %s", attempts, reason)
                try:
                    self.give_up(received, f"failed {attempts} times: {reason}", run=run)
                except ServiceUnavailable as down:  # cannot even record it: read it again later
                    log.warning("could not dead-letter the job (%s); it stays uncommitted", down)
                    return False
                return True

    def give_up(self, received: Received, reason: str, *, run: str | None) -> None:
        """Dead-letter a record that kept failing; subclasses name each of its samples."""
        self.dead_letter(received, reason, run=run)
