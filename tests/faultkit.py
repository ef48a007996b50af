"""The fault-injection kit (test-only): private services a test may break, an epoch workload, and the
checker of the data plane's invariants (docs/reliability.md).

Every fault test is a workload (one epoch of a run, drained by one :class:`SampleStream` per stream as
a trainer drains it), a fault (injected while the epoch runs) and :func:`check_epoch`, which holds the
promises of the design against what happened:

* per stream, delivered + dead-lettered == planned, exactly, and no sample is both;
* every dead letter names its sample, run and epoch;
* the trainer sees no sample twice within the epoch;
* the run's in-flight count never exceeded its bound (sampled every 20 ms);
* no payload key (frames, features) and no in-flight slot is left after the epoch (the streams stay open
  up to ``SETTLE_S`` after it, as a resident trainer's do between epochs, to take late copies);
* no committed offset passed a job that was not done: each commit of the decode group (sampled every
  0.3 s) is checked against the frames notices and dead letters that existed when it was read, and no
  committed offset ever moves back (what a stale owner committing over its successor does).

:class:`PrivateStack` runs a Redis and a Tansu broker of the test's own (on free ports, the broker on
the shared S3 under its own bucket), and optionally an S3 server of its own, so that a test can stop,
restart or choke them without touching the shared services the rest of the suite uses.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_port, free_port_block
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from essp.clients.kafka import ensure_topics
from essp.clients.redis import redis_client
from essp.contract import DeadLetter, DecodeChunk, FeatureReady, FramesReady, Topics, decode
from essp.dataplane.consumer import SampleStream
from essp.dataplane.plan import EpochPlan, plan_epoch, publish_plan
from essp.datasets.manifest import Manifest
from essp.deploy.local import LocalProcess, LocalProcesses, worker_args, worker_name
from essp.settings import Settings
from essp.stack.services import LocalStack, isolated_settings

L, SIZE = 4, 32
FLOW = {"flow": {"method": "dis_ultrafast"}}
TWO_STREAMS = {"rgb": {}, **FLOW}


class PrivateStack:
    """Redis and a Kafka-protocol broker (and with ``s3=True`` an S3 server) of one test module, under
    its own state folder; :meth:`stop` / :meth:`start` / :meth:`restart` each of them."""

    def __init__(self, base: Settings, state_dir: Path, *, s3: bool = False,
                 redis_args: tuple[str, ...] = ()) -> None:
        tag = "f" + uuid.uuid4().hex[:10]
        update: dict[str, object] = {
            "state_dir": state_dir, "redis_port": free_port(), "kafka_port": free_port(),
            "kafka_storage_bucket": f"{tag}-kafka", "heartbeat_s": 1.0,
        }
        self.broker_settings = base.model_copy(update=update)  # the broker logs to the shared S3
        if s3:
            weed = free_port_block(4, 20000, 22000)  # weed's gRPC ports are its ports + 10000: free too
            update |= {"s3_port": free_port_block(1, 22000, 22767), "weed_port_base": weed}
        self.settings = isolated_settings(base.model_copy(update=update), tag)
        self.stack = LocalStack(self.settings)
        self.redis_args = redis_args
        self.s3 = s3
        if s3:
            self.stack.up(["s3"])
        self.start("redis")
        self.start("kafka")
        topics = Topics(self.settings.topic_prefix)
        ensure_topics(self.settings, [topics.control, topics.events, topics.dead])

    def start(self, name: str) -> None:
        if name == "kafka":
            LocalStack(self.broker_settings)._start_kafka()
        elif name == "redis":
            self.stack._start_redis()
            if self.redis_args:
                redis_client(self.settings).config_set(*self.redis_args)
        else:
            self.stack.up([name])

    def stop(self, name: str) -> None:
        table = LocalStack(self.broker_settings).table if name == "kafka" else self.stack.table
        assert table.stop(name), f"{name} was not running"

    def restart(self, name: str, down_s: float = 0.0) -> None:
        self.stop(name)
        time.sleep(down_s)
        self.start(name)

    def scoped(self, **updates: object) -> Settings:
        """Settings on the same private services under a prefix of their own (a second fleet that must
        not share its consumer groups with the module's), with ``updates``."""
        tag = "f" + uuid.uuid4().hex[:10]
        settings = isolated_settings(self.settings.model_copy(update=updates), tag)
        topics = Topics(tag)
        ensure_topics(settings, [topics.control, topics.events, topics.dead])
        return settings

    def redis_pid(self) -> int:
        record = self.stack.table.record("redis")
        assert record is not None, "the private Redis is not running"
        return record.pid

    def close(self) -> None:
        for name in ("kafka", "redis", "s3"):
            table = LocalStack(self.broker_settings).table if name == "kafka" else self.stack.table
            table.stop(name)


class Fleet:
    """The resident workers of a fault test, started the one way ESSP starts them, by role."""

    def __init__(self, settings: Settings, state_dir: Path) -> None:
        self.processes = LocalProcesses(settings, state_dir=state_dir)
        self.workers: dict[str, LocalProcess] = {}
        self._next: Counter = Counter()

    def start(self, *kinds: str) -> list[LocalProcess]:
        commands = []
        for kind in kinds:
            name = worker_name(kind, self._next[kind])
            self._next[kind] += 1
            commands.append((name, worker_args(kind)))
        started = self.processes.start(commands)
        for process in started:
            self.workers[process.name] = process
        return started

    def of(self, kind: str) -> list[LocalProcess]:
        prefix = worker_name(kind, 0)[:-1]
        return [p for name, p in self.workers.items() if name.startswith(prefix) and p.alive()]

    def kill(self, process: LocalProcess) -> None:
        process.kill()
        self.workers.pop(process.name, None)

    def stop(self) -> None:
        for process in list(self.workers.values()):
            process.stop(timeout_s=15)
        self.workers.clear()


@dataclass
class Tally:
    """What one stream of one epoch saw, and what the checker found."""

    stream: str
    planned: int
    delivered: int = 0
    dead: int = 0
    redone: int = 0
    duplicates_seen: int = 0  # by the trainer (after the stream's own de-duplication): must be 0
    duplicates_dropped: int = 0  # by the stream (at-least-once redeliveries it absorbed)

    def row(self) -> dict[str, int | str]:
        return {"stream": self.stream, "planned": self.planned, "delivered": self.delivered, "dead": self.dead,
                "redone": self.redone, "duplicates_seen": self.duplicates_seen,
                "duplicates_dropped": self.duplicates_dropped}


@dataclass
class EpochResult:
    plan: EpochPlan
    tallies: dict[str, Tally]
    letters: list[DeadLetter]
    inflight_peak: int
    bound: int
    commits_checked: int
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0
    remade: int = 0  # jobs published to the epoch's decode topic past the plan: redone by anyone

    def rows(self) -> list[dict[str, int | str]]:
        return [t.row() for t in self.tallies.values()]


class _Watch(threading.Thread):
    """Samples the run's in-flight count (every 20 ms) and the decode group's committed offsets (every
    0.3 s, with the wall-clock time each was read)."""

    def __init__(self, settings: Settings, run: str, epoch: int) -> None:
        super().__init__(daemon=True, name="fault-watch")
        self.settings, self.run_id, self.epoch = settings, run, epoch
        self.stop_event = threading.Event()
        self.peak = 0
        self.commits: list[tuple[float, dict[int, int]]] = []

    def run(self) -> None:
        key = f"{self.settings.redis_prefix}:{self.run_id}:inflight"
        topic = Topics(self.settings.topic_prefix).decode(self.run_id, self.epoch)
        group = f"{self.settings.topic_prefix}.decode"
        admin = None
        last_commit_read = 0.0
        while not self.stop_event.wait(0.02):
            try:
                self.peak = max(self.peak, int(redis_client(self.settings).zcard(key)))
            except Exception:  # noqa: BLE001 - Redis may be down: that is the fault
                pass
            if time.monotonic() - last_commit_read < 0.3:
                continue
            last_commit_read = time.monotonic()
            try:
                admin = admin or KafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap,
                                                  request_timeout_ms=5000)
                parts = [TopicPartition(topic, p) for p in range(self.settings.kafka_partitions)]
                offsets = admin.list_group_offsets({group: parts}).get(group, {})
                read_at = time.time()
                mine = {tp.partition: meta.offset for tp, meta in offsets.items()
                        if tp.topic == topic and meta.offset >= 0}
                if mine:
                    self.commits.append((read_at, mine))
            except Exception:  # noqa: BLE001 - the broker may be down: that is the fault
                if admin is not None:
                    admin.close()
                admin = None
        if admin is not None:
            admin.close()


def read_topic(settings: Settings, topic: str) -> list:
    """Every record of a topic, from the start (no group)."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False,
                             allow_auto_create_topics=False, consumer_timeout_ms=3000)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        records = []
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            for batch in consumer.poll(timeout_ms=1000).values():
                records += batch
        return records
    finally:
        consumer.close()


def run_epoch(settings: Settings, manifest: Manifest, run: str, *, samples: int, epoch: int = 0,
              features: dict | None = None, max_inflight: int = 32, chunk: int | None = 8,
              during=None, consume_delay: float = 0.0, timeout_s: float = 120.0,  # noqa: ANN001
              before_publish=None, size: int = SIZE) -> EpochResult:  # noqa: ANN001
    """Plan, publish and drain one epoch while ``during(stop_event)`` runs in a thread (the fault), then
    check it. ``during`` should return soon after ``stop_event`` is set (the epoch is drained)."""
    features = features or TWO_STREAMS
    plan = plan_epoch(manifest, run=run, epoch=epoch, features=features, length=L, height=size, width=size,
                      samples=samples, max_inflight=max_inflight)
    seen: dict[str, list[str]] = {s: [] for s in features}
    stats: dict[str, object] = {}
    errors: list[BaseException] = []
    watch = _Watch(settings, run, epoch)
    done = threading.Event()

    def drain(stream: str) -> None:
        try:
            with SampleStream(settings, run, stream, prefetch=2) as samples_in:
                for sample in samples_in.epoch(epoch, len(plan.jobs), timeout_s=timeout_s):
                    seen[stream].append(sample.sample_id)
                    if consume_delay:
                        time.sleep(consume_delay(stream) if callable(consume_delay) else consume_delay)
                # Open a little longer, as a resident trainer's streams stay between epochs: late copies
                # (a redo that crossed its original) are taken and dropped, not left in Redis to their TTL.
                end(stream)
                all_ended.wait(timeout_s * 4)
                _settle(settings, run, SETTLE_S)
                stats[stream] = samples_in.stats
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
        finally:
            end(stream)

    ended: set[str] = set()
    all_ended = threading.Event()

    def end(stream: str) -> None:
        ended.add(stream)  # (under the GIL; a stream that fails counts as ended too)
        if len(ended) == len(features):
            all_ended.set()

    started = time.monotonic()
    threads = [threading.Thread(target=drain, args=(s,), name=f"drain-{s}") for s in features]
    for t in threads:
        t.start()
    watch.start()
    time.sleep(1.0)  # the streams join their groups before the first notice
    if before_publish is not None:
        before_publish()
    publish_plan(settings, plan, chunk=chunk)
    fault = threading.Thread(target=during, args=(done,), name="fault") if during else None
    if fault is not None:
        fault.start()
    for t in threads:
        t.join(timeout_s * 4)
    done.set()
    if fault is not None:
        fault.join(120)
    watch.stop_event.set()
    watch.join(10)
    if errors:
        raise AssertionError(f"{errors[0]}\n{diagnose(settings, plan, seen)}") from errors[0]
    if any(t.is_alive() for t in threads):
        raise AssertionError(f"the epoch of run {run} did not finish within {timeout_s * 4:.0f}s")
    result = check_epoch(settings, plan, seen, stats, watch, max_inflight)
    result.seconds = time.monotonic() - started
    return result


SETTLE_S = 15.0


def _settle(settings: Settings, run: str, within_s: float) -> None:
    """Wait until the run has no payload key and no in-flight slot (or ``within_s`` passed)."""
    client = redis_client(settings)
    prefix = f"{settings.redis_prefix}:{run}"
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not client.zcard(f"{prefix}:inflight") and not any(
                True for pattern in (f"{prefix}:frames:*", f"{prefix}:feat:*")
                for _ in client.scan_iter(match=pattern, count=1000)):
            return
        time.sleep(0.2)


def check_epoch(settings: Settings, plan: EpochPlan, seen: dict[str, list[str]], stats: dict,
                watch: _Watch, bound: int) -> EpochResult:
    """The invariants of the module's doc; violations are collected, :func:`assert_sound` raises them."""
    topics = Topics(settings.topic_prefix)
    run, epoch = plan.run, plan.epoch
    planned = set(plan.sample_ids())
    letters = [decode(r.value, r.topic, (DeadLetter,)) for r in read_topic(settings, topics.run_dead(run))]
    violations: list[str] = []
    for letter in letters:
        if letter.sample_id is None or letter.run != run or letter.epoch is None:
            violations.append(f"a dead letter does not name its sample, run and epoch: {letter.reason!r}")
    tallies = {}
    for stream, ids in seen.items():
        counts = Counter(ids)
        dead = {x.sample_id for x in letters if x.epoch == epoch and x.stream in (None, stream)} & planned
        delivered = set(counts)
        tally = Tally(stream, len(planned), delivered=len(delivered), dead=len(dead),
                      duplicates_seen=sum(n - 1 for n in counts.values()))
        if stream in stats:
            tally.redone = stats[stream].redone
            tally.duplicates_dropped = stats[stream].duplicates
        if delivered - planned:
            violations.append(f"{stream}: delivered samples that were never planned: {sorted(delivered - planned)[:5]}")
        if delivered & dead:
            violations.append(f"{stream}: samples both delivered and dead-lettered: {sorted(delivered & dead)[:5]}")
        if len(delivered | dead) != len(planned) or tally.delivered + tally.dead != tally.planned:
            missing = planned - delivered - dead
            violations.append(f"{stream}: delivered {tally.delivered} + dead {tally.dead} != planned "
                              f"{tally.planned}; missing {sorted(missing)[:5]}")
        if tally.duplicates_seen:
            violations.append(f"{stream}: the trainer saw {tally.duplicates_seen} duplicate(s)")
        tallies[stream] = tally
    if watch.peak > bound:
        violations.append(f"in flight peaked at {watch.peak}, over its bound {bound}")
    client = redis_client(settings)
    prefix = f"{settings.redis_prefix}:{run}"
    left = [k for pattern in (f"{prefix}:frames:*", f"{prefix}:feat:*")
            for k in client.scan_iter(match=pattern, count=1000)]
    if left:
        violations.append(f"{len(left)} payload key(s) left after the epoch, e.g. {left[0]!r}")
    if client.zcard(f"{prefix}:inflight"):
        violations.append(f"{client.zcard(f'{prefix}:inflight')} in-flight slot(s) left after the epoch")
    decode_records = read_topic(settings, topics.decode(run, epoch))
    violations += _check_commits(settings, plan, watch.commits, letters, decode_records)
    published = sum(len(decode(r.value, r.topic, (DecodeChunk,)).jobs) for r in decode_records)
    return EpochResult(plan, tallies, letters, watch.peak, bound, len(watch.commits), violations,
                       remade=published - len(plan.jobs))


def _check_commits(settings: Settings, plan: EpochPlan, commits: list[tuple[float, dict[int, int]]],
                   letters: list[DeadLetter], decode_records: list) -> list[str]:
    """Each sampled commit of the decode group: every sample of the records before it had its frames
    announced or was dead-lettered before the commit was read (a worker flushes before it commits)."""
    topics = Topics(settings.topic_prefix)
    done_at: dict[str, float] = {}
    for record in read_topic(settings, topics.frames(plan.run, plan.epoch)):
        for job in decode(record.value, record.topic, (FramesReady,)).jobs:
            done_at[job.sample_id] = min(done_at.get(job.sample_id, 1e18), record.timestamp / 1000)
    # A letter's time is not in the message: a dead-lettered sample counts as done (its letter is flushed
    # before the commit like a notice); what matters here is samples neither announced nor dead.
    dead = {letter.sample_id for letter in letters}
    by_partition: dict[int, list] = {}
    for record in decode_records:
        by_partition.setdefault(record.partition, []).append(record)
    violations = []
    highest: dict[int, int] = {}
    for _, offsets in commits:  # a stale owner committing over its successor moves an offset back
        for partition, committed in offsets.items():
            if committed < highest.get(partition, -1):
                violations.append(f"the committed offset of decode partition {partition} went back from "
                                  f"{highest[partition]} to {committed}")
            highest[partition] = max(highest.get(partition, -1), committed)
    for read_at, offsets in commits:
        for partition, committed in offsets.items():
            for record in by_partition.get(partition, []):
                if record.offset >= committed:
                    continue
                for job in decode(record.value, record.topic, (DecodeChunk,)).jobs:
                    if job.sample_id in dead:
                        continue
                    if done_at.get(job.sample_id, 1e18) > read_at + 0.05:
                        violations.append(f"decode offset {committed} of partition {partition} was committed "
                                          f"(read at {read_at:.3f}) before sample {job.sample_id} was announced")
    return sorted(set(violations))[:10]


def assert_sound(result: EpochResult) -> None:
    assert not result.violations, "\n".join(result.violations)


def every(seconds: float, action, stop: threading.Event, *, jitter: float = 0.0) -> int:  # noqa: ANN001
    """Call ``action()`` every ``seconds`` (± jitter) until ``stop`` is set; returns how many times."""
    count = 0
    while not stop.wait(seconds + random.uniform(-jitter, jitter)):
        action()
        count += 1
    return count


def ready_notices(settings: Settings, run: str, stream: str, epoch: int = 0) -> list[FeatureReady]:
    topic = Topics(settings.topic_prefix).ready(run, stream, epoch)
    return [decode(r.value, r.topic, (FeatureReady,)) for r in read_topic(settings, topic)]


def diagnose(settings: Settings, plan: EpochPlan, seen: dict[str, list[str]]) -> str:
    """Where the samples that did not arrive are: their state in Redis, the records that carry them, and
    what each group committed (for the failure message of a stalled epoch)."""
    topics = Topics(settings.topic_prefix)
    client = redis_client(settings)
    lines = []
    names = {"decode": topics.decode(plan.run, plan.epoch), "frames": topics.frames(plan.run, plan.epoch)}
    names |= {f"ready.{s}": topics.ready(plan.run, s, plan.epoch) for s in seen}
    where: dict[str, list[str]] = {}
    for label, topic in names.items():
        for record in read_topic(settings, topic):
            message = decode(record.value, record.topic, (DecodeChunk, FramesReady, FeatureReady))
            for job in message.jobs:
                where.setdefault(job.sample_id, []).append(f"{label}@{record.partition}:{record.offset}")
    groups = {"decode": f"{settings.topic_prefix}.decode"}
    groups |= {f"extract.{s}": f"{settings.topic_prefix}.extract.{s}" for s in seen}
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=5000)
    try:
        for label, group in groups.items():
            topic = names["decode" if label == "decode" else "frames"]
            parts = [TopicPartition(topic, p) for p in range(settings.kafka_partitions)]
            offsets = admin.list_group_offsets({group: parts}).get(group, {})
            lines.append(f"committed {label}: {sorted((tp.partition, m.offset) for tp, m in offsets.items())}")
        for stream in seen:
            group = f"{settings.topic_prefix}.consume.{plan.run}.{stream}"
            topic = names[f"ready.{stream}"]
            parts = [TopicPartition(topic, p) for p in range(settings.kafka_partitions)]
            offsets = admin.list_group_offsets({group: parts}).get(group, {})
            lines.append(f"committed consume.{stream}: {sorted((tp.partition, m.offset) for tp, m in offsets.items())}")
    finally:
        admin.close()
    memory = client.info("memory")
    payload_keys = [k for pattern in (f"{settings.redis_prefix}:{plan.run}:frames:*",
                                      f"{settings.redis_prefix}:{plan.run}:feat:*")
                    for k in client.scan_iter(match=pattern, count=1000)]
    lines.append(f"redis: used_memory {memory['used_memory']} maxmemory {memory.get('maxmemory')} "
                 f"dbsize {client.dbsize()} payload keys {len(payload_keys)} "
                 f"({sum(int(client.strlen(k)) for k in payload_keys)} bytes) "
                 f"in flight {client.zcard(f'{settings.redis_prefix}:{plan.run}:inflight')}")
    for stream, ids in seen.items():
        missing = [j for j in plan.sample_ids() if j not in set(ids)]
        lines.append(f"{stream}: {len(missing)} missing")
        for sample_id in missing[:12]:
            state = client.hgetall(f"{settings.redis_prefix}:{plan.run}:state:{sample_id}")
            lines.append(f"  {sample_id}: state {state} records {where.get(sample_id)}")
    return "\n".join(lines)
