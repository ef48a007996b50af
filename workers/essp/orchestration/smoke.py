"""Round-trip checks of the three services: the stages of the `essp_smoke` DAG, each named after its task."""

from __future__ import annotations

import secrets
import time
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from essp.clients.kafka import BOOTSTRAP_TIMEOUT_MS, MessageProducer, ensure_topics
from essp.clients.redis import check_redis
from essp.clients.s3 import ObjectStore
from essp.contract import RedisKeys, SmokePing, Topics, decode
from essp.errors import EsspError
from essp.orchestration.stages import stage
from essp.settings import Settings


def _token(token: str | None) -> str:
    return token or secrets.token_hex(8)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


@stage
def smoke_kafka(settings: Settings, token: str | None = None) -> dict[str, Any]:
    """Publish a ping and read that very record back from its partition and offset."""
    topic = Topics(settings.topic_prefix).smoke
    token = _token(token)
    ensure_topics(settings, [topic], partitions=1)
    start = time.perf_counter()
    with MessageProducer(settings) as producer:
        partition, offset = producer.publish(topic, SmokePing(token=token), key=token)
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                             bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS)
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for record in consumer.poll(timeout_ms=500).get(tp, []):
                if record.offset == offset:
                    message = decode(record.value, topic, (SmokePing,))
                    if message.token != token:
                        raise EsspError(f"Kafka {topic}[{partition}]@{offset} holds token "
                                        f"{message.token!r}, expected {token!r}")
                    return {"service": "kafka", "topic": topic, "partition": partition,
                            "offset": offset, "token": token, "round_trip_ms": _ms(start)}
    finally:
        consumer.close()
    raise EsspError(f"Kafka {topic}[{partition}]@{offset}: the ping was acknowledged but could "
                    "not be read back within 30 s")


@stage
def smoke_redis(settings: Settings, token: str | None = None) -> dict[str, Any]:
    """Write a payload with a TTL, read it back, delete it."""
    client = check_redis(settings)
    token = _token(token)
    key = RedisKeys(settings.redis_prefix).smoke(token)
    payload = secrets.token_bytes(64 * 1024)
    start = time.perf_counter()
    client.set(key, payload, ex=60)
    ttl = client.ttl(key)
    back = client.get(key)
    client.delete(key)
    if back != payload:
        raise EsspError(f"Redis {key}: the payload read back differs from the one written")
    if not 0 < ttl <= 60:
        raise EsspError(f"Redis {key}: expected a TTL of at most 60 s, found {ttl}")
    return {"service": "redis", "key": key, "bytes": len(payload), "ttl_s": ttl,
            "round_trip_ms": _ms(start)}


@stage
def smoke_s3(settings: Settings, token: str | None = None) -> dict[str, Any]:
    """Put an object in the runs bucket, read it back, delete it."""
    store = ObjectStore(settings)
    token = _token(token)
    bucket, key = settings.bucket_runs, f"smoke/{token}.bin"
    payload = secrets.token_bytes(256 * 1024)
    start = time.perf_counter()
    store.ensure_bucket(bucket)
    store.put_bytes(bucket, key, payload)
    back = store.get_bytes(bucket, key)
    store.delete(bucket, key)
    if back != payload:
        raise EsspError(f"s3://{bucket}/{key}: the object read back differs from the one written")
    return {"service": "s3", "uri": f"s3://{bucket}/{key}", "bytes": len(payload),
            "round_trip_ms": _ms(start)}
