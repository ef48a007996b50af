"""Kafka protocol: topics, a producer of contract messages, and a consumer-group member that
validates what it reads, dead-letters what is malformed and commits only when told to."""

from __future__ import annotations

import base64
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import CommitFailedError, KafkaError, TopicAlreadyExistsError, UnknownTopicOrPartitionError
from kafka.structs import OffsetAndMetadata

from essp.contract import DeadLetter, Message, Topics, decode, encode
from essp.errors import MalformedMessage, ServiceUnavailable
from essp.settings import Settings

# How long a client waits for the first answer of the broker before it reports it unreachable.
BOOTSTRAP_TIMEOUT_MS = 8000
# Also the rebalance timeout: how long a rebalance waits for members to rejoin. Keep it short: a
# long one stalls every group of the broker (Tansu's coordinator) while one member is slow. Members
# busy for longer (waiting on back-pressure) call `keep_alive`.
MAX_POLL_INTERVAL_MS = 20000


class RebalancedDuringWork(Exception):
    """A commit was refused because the group rebalanced; the new owner redoes the uncommitted work."""


def _unavailable(settings: Settings, exc: Exception) -> ServiceUnavailable:
    return ServiceUnavailable("Kafka", settings.kafka_bootstrap, exc)


def _common(settings: Settings) -> dict:
    return {"bootstrap_servers": settings.kafka_bootstrap, "bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS}


# Clients never create topics by asking for them: the planner deletes an epoch's topics once it is over,
# and a client that still names one would bring it back, empty (measured: a run's topics grew by an
# epoch's worth every epoch). Tansu creates a topic named in a metadata request whatever the request's
# allow_auto_topic_creation says, and kafka-python's producer names every topic it ever sent to in each
# metadata request (on every new topic, i.e. every epoch); so our clients also ask for the metadata of
# all topics, which names none (_all_topics_metadata).
NO_AUTO_CREATE = {"allow_auto_create_topics": False}


def _forget_idle_partitions(producer: KafkaProducer) -> None:
    """kafka-python 3.x keeps an (empty) batch queue for every partition a producer ever sent to, and
    its sender asks for fresh metadata on every loop while one of them has no leader: once an epoch's
    topics are deleted, each producer that wrote to them spun on metadata requests (measured: the
    workers' CPU per sample tripled, and the broker's with it). Before each readiness check, drop the
    queues that are empty, under the partition's lock (an append re-creates its queue under that lock)."""
    accumulator = getattr(producer, "_accumulator", None)
    if accumulator is None or not hasattr(accumulator, "_batches") or not hasattr(accumulator, "_tp_lock"):
        return
    ready = accumulator.ready

    def ready_without_idle(cluster, now=None):  # noqa: ANN001, ANN202
        for tp in list(accumulator._batches):
            with accumulator._tp_lock(tp):
                if not accumulator._batches.get(tp, True):
                    del accumulator._batches[tp]
        return ready(cluster, now)

    accumulator.ready = ready_without_idle


def _all_topics_metadata(client: KafkaProducer | KafkaConsumer) -> None:
    """Make the client's metadata requests ask for every topic instead of naming the ones it knows."""
    cluster = getattr(client, "_metadata", None) or getattr(client, "_cluster", None)  # kafka-python 3.x
    if cluster is not None and hasattr(cluster, "need_all_topic_metadata"):
        cluster.need_all_topic_metadata = True
# A member following per-epoch topics by pattern reads only each run's EPOCH_WINDOW newest epochs. Tansu
# brings a deleted topic back while a member still fetches from it (whatever the flag above says), so
# the planner deletes only epochs that every member let go of one epoch earlier (essp.dataplane.plan).
EPOCH_WINDOW = 3
# A member following a pattern whose last poll found nothing looks for new topics this often (a metadata
# request, ~0.5 ms of the local broker's CPU), so the next epoch's topics are read within about this long
# of their creation; a busy member looks every ``metadata_max_age_ms``. Without it an epoch could wait
# 3-6 s for its members to notice its topics (two tiny epochs in a row: 2.5 s of 4).
IDLE_TOPICS_S = 0.5


def kafka_admin(settings: Settings) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(**_common(settings))
    except KafkaError as exc:
        raise _unavailable(settings, exc) from None


def ensure_topics(settings: Settings, names: Iterable[str], partitions: int | None = None) -> None:
    """Create the topics that do not exist yet (with the given partitions); others are left as they are."""
    names = list(dict.fromkeys(names))
    admin = kafka_admin(settings)
    try:
        existing = set(admin.list_topics())
        missing = [n for n in names if n not in existing]
        if not missing:
            return
        new = [NewTopic(n, partitions or settings.kafka_partitions, 1) for n in missing]
        try:
            admin.create_topics(new)
        except TopicAlreadyExistsError:  # created concurrently by another process
            pass
    except KafkaError as exc:
        raise _unavailable(settings, exc) from None
    finally:
        admin.close()


def list_topics(settings: Settings) -> list[str]:
    admin = kafka_admin(settings)
    try:
        return list(admin.list_topics())
    except KafkaError as exc:
        raise _unavailable(settings, exc) from None
    finally:
        admin.close()


def delete_topics(settings: Settings, names: Iterable[str]) -> None:
    admin = kafka_admin(settings)
    try:
        present = set(admin.list_topics())
        doomed = [n for n in names if n in present]
        if doomed:
            admin.delete_topics(doomed)
    except UnknownTopicOrPartitionError:
        pass
    finally:
        admin.close()


def topic_partitions(settings: Settings, topic: str) -> int:
    admin = kafka_admin(settings)
    try:
        (description,) = admin.describe_topics([topic])
        return len(description["partitions"])
    finally:
        admin.close()


class MessageProducer:
    """Publishes contract messages. ``publish`` returns once the broker has acknowledged, or at once
    with ``wait=False``: then :meth:`flush` (before the commit of what the messages answer) waits for
    every one, so a worker's notices are pipelined and it still never commits a job whose notice is lost."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        try:
            self._producer = KafkaProducer(**_common(settings), **NO_AUTO_CREATE, acks="all", linger_ms=2,
                                           retries=5, max_block_ms=30000)
        except KafkaError as exc:
            raise _unavailable(settings, exc) from None
        _all_topics_metadata(self._producer)
        _forget_idle_partitions(self._producer)
        self._pending: list = []  # futures of tracked sends not yet checked by flush()
        self._lock = threading.Lock()

    def publish(self, topic: str, message: Message, key: str | None = None, *,
                wait: bool = True, tracked: bool = True) -> tuple[int, int] | None:
        """Send one message; with ``wait``, return its (partition, offset) once acknowledged. Without,
        a ``tracked`` message is checked by the next :meth:`flush` (an untracked one, such as a
        heartbeat, may be lost without failing anything)."""
        return self.send_raw(topic, encode(message), key, wait=wait, tracked=tracked)

    def send_raw(self, topic: str, value: bytes, key: str | None = None, *,
                 wait: bool = True, tracked: bool = True) -> tuple[int, int] | None:
        """Send bytes as they are: for dead letters of foreign payloads and for tests."""
        try:
            future = self._producer.send(topic, value=value, key=key.encode() if key else None)
            if not wait:
                if tracked:
                    with self._lock:
                        self._pending.append(future)
                return None
            metadata = future.get(timeout=30)
        except KafkaError as exc:
            raise _unavailable(self.settings, exc) from None
        return metadata.partition, metadata.offset

    def publish_many(self, topic: str, messages: Iterable[tuple[str | None, Message]]) -> int:
        """Send many messages pipelined, then wait until the broker has acknowledged every one."""
        futures = []
        try:
            for key, message in messages:
                futures.append(self._producer.send(topic, value=encode(message),
                                                   key=key.encode() if key else None))
            for future in futures:
                future.get(timeout=60)
        except KafkaError as exc:
            raise _unavailable(self.settings, exc) from None
        return len(futures)

    def flush(self) -> None:
        """Wait until every message sent so far is acknowledged; :class:`ServiceUnavailable` when one
        tracked message sent without waiting failed (the caller then must not commit what it answers)."""
        with self._lock:
            pending, self._pending = self._pending, []
        try:
            self._producer.flush(timeout=30)
            for future in pending:
                future.get(timeout=30)  # done after the flush: raises the send's error, if any
        except KafkaError as exc:
            raise _unavailable(self.settings, exc) from None

    def close(self) -> None:
        self._producer.close(timeout=10)

    def __enter__(self) -> MessageProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Received:
    topic: str
    partition: int
    offset: int
    key: str | None
    message: Message


class MessageConsumer:
    """One member of a consumer group, reading contract messages with manual commits.

    ``poll`` returns valid messages only: a malformed one is published to ``dead_letter_topic``
    with its reason and original bytes (and counted in ``dead_lettered``) before ``poll`` returns,
    so it is never lost and never crashes the worker. Offsets move only on :meth:`commit`, which
    the caller calls after it has finished with everything ``poll`` returned (at-least-once).
    """

    def __init__(self, settings: Settings, group_id: str, topics: Iterable[str] = (), *,
                 dead_letter_topic: str, expected: tuple[type[Message], ...] = (),
                 pattern: str | None = None, auto_offset_reset: str = "earliest",
                 max_poll_interval_ms: int = MAX_POLL_INTERVAL_MS, metadata_max_age_ms: int = 3000,
                 membership: str | None = None, epoch_window: int | None = EPOCH_WINDOW,
                 fetch_max_wait_ms: int = 500) -> None:
        self.settings = settings
        self.group_id = group_id
        self.expected = expected
        self.dead_letter_topic = dead_letter_topic
        self.dead_lettered = 0
        self._dead_producer: MessageProducer | None = None
        self._last_poll = time.monotonic()
        self.membership = membership or settings.kafka_membership
        if self.membership not in ("group", "lease"):
            raise ValueError(f"membership {self.membership!r} is not 'group' or 'lease'")
        self._topics = list(topics)
        if bool(self._topics) == bool(pattern):
            raise ValueError("give either topics or a pattern")
        try:
            self._consumer = KafkaConsumer(
                *(self._topics if self.membership == "group" else ()), **_common(settings), **NO_AUTO_CREATE,
                group_id=group_id,
                enable_auto_commit=False, auto_offset_reset=auto_offset_reset,
                session_timeout_ms=settings.kafka_session_timeout_ms,
                heartbeat_interval_ms=max(1000, settings.kafka_session_timeout_ms // 3),
                max_poll_interval_ms=max_poll_interval_ms, metadata_max_age_ms=metadata_max_age_ms,
                fetch_max_wait_ms=fetch_max_wait_ms,
            )
        except KafkaError as exc:
            raise _unavailable(settings, exc) from None
        if self.membership == "lease":  # assigned partitions: their topics would be named in metadata requests
            _all_topics_metadata(self._consumer)
        # A pattern is resolved here rather than by the client's regex subscription: the matching
        # topics are listed every few seconds and followed by name.
        self._pattern = re.compile(pattern) if pattern else None
        self._epoch_window = epoch_window
        self._naming = Topics(settings.topic_prefix)
        self._topics_every_s = metadata_max_age_ms / 1000
        self._topics_checked = 0.0
        self._idle = True  # the last poll returned nothing: look for new topics sooner
        self._subscribed: set[str] = set()
        # Called with the partitions about to leave this member (a lease share or a subscription changes),
        # before they do: a member that commits in batches commits what it finished of them first.
        self.before_release: Callable[[set[tuple[str, int]]], None] | None = None
        self._lease: PartitionLease | None = None
        self._lease_generation = 0  # the lease's generation the current assignment was taken under
        if self.membership == "lease":
            self._lease = PartitionLease(settings, group_id)
            self._lease_generation = self._lease.generation
            self._lease.start()

    def _current_topics(self) -> set[str]:
        if self._pattern is None:
            return set(self._topics)
        found = {t for t in self._consumer.topics() if self._pattern.match(t)}
        return self._newest_epochs(found) if self._epoch_window else found

    def _newest_epochs(self, names: set[str]) -> set[str]:
        """Per run, the topics of its ``epoch_window`` newest epochs (and its per-run topics): a member
        lets go of an old epoch's topics before the planner deletes them (see EPOCH_WINDOW)."""
        newest: dict[str, int] = {}
        epochs: dict[str, tuple[str, int | None]] = {}
        for name in names:
            try:
                run, epoch = self._naming.run_of(name), self._naming.epoch_of(name)
            except ValueError:
                run, epoch = name, None
            epochs[name] = (run, epoch)
            if epoch is not None:
                newest[run] = max(newest.get(run, epoch), epoch)
        assert self._epoch_window is not None
        return {name for name, (run, epoch) in epochs.items()
                if epoch is None or epoch > newest[run] - self._epoch_window}

    def _refresh(self) -> None:
        """Follow the topics (pattern) and, with leases, take this member's share of partitions."""
        if self._lease is not None and self._lease.generation != self._lease_generation:
            # The lease lapsed (this process was stopped or starved past the session timeout): others
            # may own its partitions now and have moved their offsets. Forget the positions it held and
            # take its share again from the committed offsets (what it read since is refused a commit).
            self._lease_generation = self._lease.generation
            if self._consumer.assignment():
                self._consumer.assign([])
            self._topics_checked = 0.0
        idle = self._idle and self._pattern is not None
        relist_every = IDLE_TOPICS_S if idle else self._topics_every_s  # how often the topics are listed
        if time.monotonic() - self._topics_checked < min(1.0 if self._lease else self._topics_every_s, relist_every):
            return
        self._topics_checked = time.monotonic()
        if self._lease is None:
            if self._pattern is None:
                return
            found = self._current_topics()
            if found != self._subscribed:
                self._releasing(self._consumer.assignment())  # a new subscription may rebalance any of them
                if found:
                    self._consumer.subscribe(topics=sorted(found))
                else:
                    self._consumer.unsubscribe()
                self._subscribed = found
            return
        if time.monotonic() - self._lease.topics_at > relist_every or not self._subscribed:
            self._subscribed = self._current_topics()
            self._lease.topics_at = time.monotonic()
        partitions = []
        for topic in sorted(self._subscribed):
            for p in sorted(self._consumer.partitions_for_topic(topic) or ()):
                partitions.append(TopicPartition(topic, p))
        mine = set(self._lease.share(partitions))
        if mine != self._consumer.assignment():
            self._releasing(self._consumer.assignment() - mine)
            self._consumer.assign(sorted(mine))
            _all_topics_metadata(self._consumer)  # assign() (and unassigning all) resets it

    def _releasing(self, partitions: set) -> None:
        if partitions and self.before_release is not None:
            self.before_release({(tp.topic, tp.partition) for tp in partitions})

    def poll(self, timeout_s: float = 1.0, max_records: int = 100) -> list[Received]:
        self._last_poll = time.monotonic()
        try:
            self._refresh()
            if not self._consumer.assignment() and (self._lease or (self._pattern and not self._subscribed)):
                self._idle = True
                time.sleep(min(timeout_s, IDLE_TOPICS_S))  # no topic of ours yet, or no partition is ours
                return []
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
            self._idle = not any(batches.values())
        except KafkaError as exc:
            raise _unavailable(self.settings, exc) from None
        received: list[Received] = []
        for records in batches.values():
            for record in records:
                key = record.key.decode(errors="replace") if record.key else None
                try:
                    message = decode(record.value, record.topic, self.expected)
                except MalformedMessage as exc:
                    self._dead_letter(record, exc)
                    continue
                received.append(Received(record.topic, record.partition, record.offset, key, message))
        return received

    def _dead_letter(self, record, exc: MalformedMessage) -> None:  # noqa: ANN001
        if self._dead_producer is None:
            self._dead_producer = MessageProducer(self.settings)
        letter = DeadLetter(
            reason=exc.reason, source_topic=record.topic, source_partition=record.partition,
            source_offset=record.offset,
            payload_b64=base64.b64encode(record.value).decode() if record.value is not None else None,
        )
        self._dead_producer.publish(self.dead_letter_topic, letter, key=f"{record.topic}:{record.offset}")
        self.dead_lettered += 1

    def commit(self, offsets: dict[tuple[str, int], int] | None = None) -> None:
        """Commit the positions after everything polled, or exactly ``offsets``: (topic, partition)
        -> the next offset to read (the last processed offset + 1)."""
        if self._lease is not None and not self._lease.holds(self._lease_generation):
            # Fencing: a member whose lease lapsed must not commit over the partitions' new owner.
            raise RebalancedDuringWork(f"member {self._lease.member} of {self.group_id}: its lease lapsed "
                                       "before this commit; the partitions' new owners redo the work")
        try:
            if offsets is None:
                self._consumer.commit()
            elif offsets:
                self._consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                                       for (t, p), o in offsets.items()})
        except CommitFailedError as exc:
            # The group rebalanced while we worked: the partitions' new owners redo what we did
            # not commit (at-least-once), so this is not an error of the job.
            raise RebalancedDuringWork(str(exc)) from None
        except KafkaError as exc:
            raise _unavailable(self.settings, exc) from None

    def assignment(self) -> set:
        return self._consumer.assignment()

    def pause_only(self, paused: set) -> None:
        """Pause exactly these assigned partitions and resume the others."""
        assigned = self._consumer.assignment()
        to_pause = assigned & paused
        to_resume = (assigned - paused) & self._consumer.paused()
        if to_pause:
            self._consumer.pause(*to_pause)
        if to_resume:
            self._consumer.resume(*to_resume)

    def keep_alive(self, every_s: float = MAX_POLL_INTERVAL_MS / 4000) -> None:
        """Poll with every partition paused, so a member busy with one long job (waiting on
        back-pressure) keeps its place in the group without taking new records."""
        if time.monotonic() - self._last_poll < every_s:
            return
        assigned = self._consumer.assignment()
        was_paused = self._consumer.paused()
        if assigned:
            self._consumer.pause(*assigned)
        try:
            if self._consumer.assignment():
                self._consumer.poll(timeout_ms=0)
        except KafkaError as exc:
            raise _unavailable(self.settings, exc) from None
        finally:
            resume = self._consumer.assignment() - was_paused
            if resume:
                self._consumer.resume(*resume)
        self._last_poll = time.monotonic()

    def rewind(self, topic: str, partition: int, offset: int) -> None:
        """Read again from ``offset`` (a record taken but not processed, e.g. of a paused run)."""
        self._consumer.seek(TopicPartition(topic, partition), offset)

    def close(self) -> None:
        if self._lease is not None:
            self._lease.stop()
        self._consumer.close(autocommit=False)
        if self._dead_producer is not None:
            self._dead_producer.close()

    def __enter__(self) -> MessageConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# KEYS: the group's members. ARGV: member, ttl_s, key_ttl_s. Renews the member's lease on the server's
# clock, drops lapsed members, and returns 1 when this member's own lease had lapsed (or was gone).
_RENEW_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('EXPIRE', KEYS[1], ARGV[3])
if (not old) or tonumber(old) < now then return 1 end
return 0
"""


class PartitionLease(threading.Thread):
    """Membership of a group kept in Redis, for brokers whose group coordinator cannot be relied on.

    Tansu (the local broker) answers a follower's SyncGroup after a fixed pause, often with an
    empty assignment (tansu-io/tansu: "SyncGroup response missing member_assignment"), so members
    of a group other than its leader may never get partitions. In ``lease`` mode each member keeps
    a lease in a Redis sorted set (refreshed by this thread every second, expiring after the
    session timeout), and every member computes the same round-robin share of the partitions over
    the live members. Offsets are still committed to the Kafka group, so a partition that changes
    hands resumes from its last commit: a member that dies has its uncommitted work redone by the
    next owner, within a session timeout.
    """

    def __init__(self, settings: Settings, group_id: str) -> None:
        super().__init__(name=f"essp-lease-{group_id}", daemon=True)
        from essp.clients.redis import redis_client  # Kafka clients need Redis only for leases

        self.redis = redis_client(settings)
        self.key = f"{settings.redis_prefix}:members:{group_id}"
        self.member = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ttl_s = settings.kafka_session_timeout_ms / 1000
        self.topics_at = 0.0
        self.generation = 0  # +1 each time the lease is found lapsed
        self._beats = 0
        self._renew = self.redis.register_script(_RENEW_LEASE)
        self._stopping = threading.Event()
        self._beat()

    def _now(self) -> float:
        seconds, micros = self.redis.time()  # one clock for every member: the server's
        return seconds + micros / 1e6

    def _unavailable(self, exc: Exception) -> ServiceUnavailable:
        kwargs = self.redis.connection_pool.connection_kwargs
        return ServiceUnavailable("Redis", f"{kwargs.get('host')}:{kwargs.get('port')}", exc)

    def _beat(self) -> None:
        """Renew the lease; one that had lapsed (or vanished with a Redis restart) starts a new generation."""
        lapsed = int(self._renew(keys=[self.key], args=[self.member, self.ttl_s, int(self.ttl_s * 10)]))
        if lapsed and self._beats:
            self.generation += 1
        self._beats += 1

    def holds(self, generation: int) -> bool:
        """Whether this member's lease is live now and has not lapsed since ``generation``: the fence a
        commit passes first (a stopped process resumed past its lease must not commit over its successor)."""
        from redis import RedisError

        try:
            score = self.redis.zscore(self.key, self.member)
            now = self._now()
        except RedisError as exc:
            raise self._unavailable(exc) from None
        if score is None or score < now:
            self.generation += 1  # lapsed: its next poll takes its share afresh
        return self.generation == generation

    def run(self) -> None:
        while not self._stopping.wait(1.0):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - Redis away: the lease lapses and others take over
                continue

    def members(self) -> list[str]:
        """The live members; :class:`ServiceUnavailable` naming Redis while it is away (the caller rides
        it out: an outage must not end a worker or a trainer's prefetch thread)."""
        from redis import RedisError

        try:
            return sorted(m.decode() for m in self.redis.zrangebyscore(self.key, self._now(), "+inf"))
        except RedisError as exc:
            raise self._unavailable(exc) from None

    def share(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """This member's partitions: every member computes the same split from the same list."""
        members = self.members()
        if self.member not in members:
            return []
        index, count = members.index(self.member), len(members)
        return [tp for i, tp in enumerate(partitions) if i % count == index]

    def stop(self) -> None:
        self._stopping.set()
        try:
            self.redis.zrem(self.key, self.member)  # hand the partitions over now, not at expiry
        except Exception:  # noqa: BLE001 - it expires anyway
            pass
