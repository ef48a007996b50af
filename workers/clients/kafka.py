"""Kafka protocol: topics, a producer of contract messages, and a consumer-group member that
validates what it reads, dead-letters what is malformed and commits only when told to."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError, UnknownTopicOrPartitionError

from essp.contract import DeadLetter, Message, decode, encode
from essp.errors import MalformedMessage, ServiceUnavailable
from essp.settings import Settings

# How long a client waits for the first answer of the broker before it reports it unreachable.
BOOTSTRAP_TIMEOUT_MS = 8000


def _unavailable(settings: Settings, exc: Exception) -> ServiceUnavailable:
    return ServiceUnavailable("Kafka", settings.kafka_bootstrap, exc)


def _common(settings: Settings) -> dict:
    return {"bootstrap_servers": settings.kafka_bootstrap, "bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS}


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
    """Publishes contract messages; ``publish`` returns once the broker has acknowledged."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        try:
            self._producer = KafkaProducer(**_common(settings), acks="all", linger_ms=2, retries=5,
                                           max_block_ms=30000)
        except KafkaError as exc:
            raise _unavailable(settings, exc) from None

    def publish(self, topic: str, message: Message, key: str | None = None, *,
                wait: bool = True) -> tuple[int, int] | None:
        """Send one message; with ``wait``, return its (partition, offset) once acknowledged."""
        return self.send_raw(topic, encode(message), key, wait=wait)

    def send_raw(self, topic: str, value: bytes, key: str | None = None, *,
                 wait: bool = True) -> tuple[int, int] | None:
        """Send bytes as they are: for dead letters of foreign payloads and for tests."""
        try:
            future = self._producer.send(topic, value=value, key=key.encode() if key else None)
            if not wait:
                return None
            metadata = future.get(timeout=30)
        except KafkaError as exc:
            raise _unavailable(self.settings, exc) from None
        return metadata.partition, metadata.offset

    def flush(self) -> None:
        self._producer.flush(timeout=30)

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

    def __init__(self, settings: Settings, group_id: str, topics: Iterable[str], *,
                 dead_letter_topic: str, expected: tuple[type[Message], ...] = (),
                 auto_offset_reset: str = "earliest", max_poll_interval_ms: int = 300000) -> None:
        self.settings = settings
        self.expected = expected
        self.dead_letter_topic = dead_letter_topic
        self.dead_lettered = 0
        self._dead_producer: MessageProducer | None = None
        try:
            self._consumer = KafkaConsumer(
                *topics, **_common(settings), group_id=group_id, enable_auto_commit=False,
                auto_offset_reset=auto_offset_reset,
                session_timeout_ms=settings.kafka_session_timeout_ms,
                heartbeat_interval_ms=max(1000, settings.kafka_session_timeout_ms // 3),
                max_poll_interval_ms=max_poll_interval_ms,
            )
        except KafkaError as exc:
            raise _unavailable(settings, exc) from None

    def poll(self, timeout_s: float = 1.0, max_records: int = 100) -> list[Received]:
        try:
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
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

    def commit(self) -> None:
        try:
            self._consumer.commit()
        except KafkaError as exc:
            raise _unavailable(self.settings, exc) from None

    def assignment(self) -> set:
        return self._consumer.assignment()

    def close(self) -> None:
        self._consumer.close(autocommit=False)
        if self._dead_producer is not None:
            self._dead_producer.close()

    def __enter__(self) -> MessageConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
