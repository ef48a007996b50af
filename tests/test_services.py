"""Round trips through the real Redis, Kafka-protocol broker and S3 store, and clear errors when a
service is missing."""

from __future__ import annotations

import base64
import time

import pytest

from essp.clients.kafka import MessageConsumer, MessageProducer, ensure_topics, topic_partitions
from essp.clients.redis import check_redis
from essp.clients.s3 import ObjectNotFound, ObjectStore, S3Uri
from essp.contract import DeadLetter, DecodeJob, RedisKeys, SmokePing, Topics, decode
from essp.errors import ServiceUnavailable


def _job(i: int) -> DecodeJob:
    return DecodeJob(run="r1", epoch=0, sample_id=f"s{i:04d}", video="s3://v/a.mp4", label=i % 3,
                     offset=i, length=10, height=224, width=224)


def _drain(consumer: MessageConsumer, want: int, timeout_s: float = 30.0) -> list:
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got += consumer.poll(timeout_s=0.5)
    return got


def test_redis_round_trip_with_ttl(settings):
    client = check_redis(settings)
    key = RedisKeys(settings.redis_prefix).frames("r1", "s0001")
    payload = bytes(range(256)) * 1000
    client.set(key, payload, ex=30)
    assert client.get(key) == payload
    assert 0 < client.ttl(key) <= 30


def test_s3_round_trip_in_its_own_bucket(settings):
    store = ObjectStore(settings)
    store.ensure_bucket(settings.bucket_runs)
    store.ensure_bucket(settings.bucket_runs)  # idempotent
    uri = store.put_json(settings.bucket_runs, "r1/metrics.json", {"top1": 0.5})
    assert str(uri) == f"s3://{settings.bucket_runs}/r1/metrics.json"
    assert S3Uri.parse(str(uri)) == uri
    assert store.get_json(settings.bucket_runs, "r1/metrics.json") == {"top1": 0.5}
    assert store.exists(settings.bucket_runs, "r1/metrics.json")
    assert list(store.list_keys(settings.bucket_runs, "r1/")) == ["r1/metrics.json"]
    with pytest.raises(ObjectNotFound, match=f"s3://{settings.bucket_runs}/r1/missing.json"):
        store.get_bytes(settings.bucket_runs, "r1/missing.json")


def test_kafka_round_trip_through_a_consumer_group_with_manual_commit(settings):
    topics = Topics(settings.topic_prefix)
    topic = topics.decode("r1", 0)
    ensure_topics(settings, [topic, topics.run_dead("r1")], partitions=3)
    assert topic_partitions(settings, topic) == 3
    with MessageProducer(settings) as producer:
        for i in range(12):
            producer.publish(topic, _job(i), key=f"s{i:04d}")
    group = f"{settings.topic_prefix}-decode"
    with MessageConsumer(settings, group, [topic], dead_letter_topic=topics.run_dead("r1"),
                         expected=(DecodeJob,)) as consumer:
        got = _drain(consumer, 12)
        assert sorted(r.message.sample_id for r in got) == [f"s{i:04d}" for i in range(12)]
        consumer.commit()
    # Committed: a new member of the same group gets nothing more.
    with MessageConsumer(settings, group, [topic], dead_letter_topic=topics.run_dead("r1")) as again:
        assert _drain(again, 1, timeout_s=8) == []


def test_uncommitted_messages_are_delivered_again(settings):
    topics = Topics(settings.topic_prefix)
    topic = topics.decode("r1", 0)
    ensure_topics(settings, [topic, topics.run_dead("r1")], partitions=1)
    with MessageProducer(settings) as producer:
        for i in range(3):
            producer.publish(topic, _job(i))
    group = f"{settings.topic_prefix}-g"
    with MessageConsumer(settings, group, [topic], dead_letter_topic=topics.run_dead("r1")) as first:
        assert len(_drain(first, 3)) == 3  # read, but the worker "dies" before committing
    with MessageConsumer(settings, group, [topic], dead_letter_topic=topics.run_dead("r1")) as second:
        assert sorted(r.message.sample_id for r in _drain(second, 3)) == ["s0000", "s0001", "s0002"]


def test_malformed_message_goes_to_the_dead_letter_topic_and_the_consumer_goes_on(settings):
    topics = Topics(settings.topic_prefix)
    topic, dead = topics.decode("r1", 0), topics.run_dead("r1")
    ensure_topics(settings, [topic, dead], partitions=1)
    with MessageProducer(settings) as producer:
        producer.publish(topic, _job(1))
        producer.send_raw(topic, b"\x00 not json")
        producer.publish(topic, SmokePing(token="wrong-topic"))
        producer.publish(topic, _job(2))
    with MessageConsumer(settings, "g", [topic], dead_letter_topic=dead, expected=(DecodeJob,)) as consumer:
        got = _drain(consumer, 2)
        consumer.commit()
        assert [r.message.sample_id for r in got] == ["s0001", "s0002"]
        assert consumer.dead_lettered == 2
    with MessageConsumer(settings, "dead-reader", [dead], dead_letter_topic=topics.dead) as reader:
        letters = [r.message for r in _drain(reader, 2)]
    assert all(isinstance(letter, DeadLetter) for letter in letters)
    by_offset = {letter.source_offset: letter for letter in letters}
    assert "not JSON" in by_offset[1].reason and by_offset[1].source_topic == topic
    assert by_offset[1].payload() == b"\x00 not json"
    assert "does not belong here" in by_offset[2].reason
    assert decode(base64.b64decode(by_offset[2].payload_b64), topic) == SmokePing(
        token="wrong-topic", sent_at=decode(by_offset[2].payload(), topic).sent_at)


@pytest.mark.parametrize("service", ["Redis", "Kafka", "S3"])
def test_a_missing_service_gives_a_clear_error_naming_it(settings, service, closed_port):
    port = closed_port
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as info:
        if service == "Redis":
            check_redis(settings.model_copy(update={"redis_port": port}))
        elif service == "Kafka":
            ensure_topics(settings.model_copy(update={"kafka_port": port}), ["x"])
        else:
            ObjectStore(settings.model_copy(update={"s3_port": port})).check()
    message = str(info.value)
    assert message.startswith(f"{service} at ") and f":{port}" in message
    assert "not reachable" in message and "essp infra up" in message
    assert time.monotonic() - started < 20, "the error must come quickly, not after minutes of retries"


def test_a_member_whose_lease_lapsed_cannot_commit_over_its_successor(settings):
    # What a worker stopped (SIGSTOP) past its lease looks like from Redis: it stops renewing. Its
    # successor takes the partition and commits further; the stale member then finishes and commits its
    # older offset. The fence must refuse that commit (it would move the group's offset back).
    from kafka import KafkaAdminClient, TopicPartition

    from essp.clients.kafka import RebalancedDuringWork

    settings = settings.model_copy(update={"kafka_membership": "lease", "kafka_session_timeout_ms": 3000})
    topics = Topics(settings.topic_prefix)
    topic = topics.decode("r1", 0)
    ensure_topics(settings, [topic, topics.run_dead("r1")], partitions=1)
    with MessageProducer(settings) as producer:
        for i in range(6):
            producer.publish(topic, _job(i))
    group = f"{settings.topic_prefix}-fenced"
    stale = MessageConsumer(settings, group, [topic], dead_letter_topic=topics.run_dead("r1"))
    try:
        assert len(_drain(stale, 6)) == 6
        stale._lease._stopping.set()  # frozen: its lease is no longer renewed
        time.sleep(3.5)
        with MessageConsumer(settings, group, [topic], dead_letter_topic=topics.run_dead("r1")) as successor:
            assert len(_drain(successor, 6)) == 6  # nothing was committed: all of it again
            successor.commit({(topic, 0): 6})
        with pytest.raises(RebalancedDuringWork, match="lease lapsed"):
            stale.commit({(topic, 0): 2})
    finally:
        stale.close()
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    try:
        offsets = admin.list_group_offsets({group: [TopicPartition(topic, 0)]})[group]
    finally:
        admin.close()
    assert offsets[TopicPartition(topic, 0)].offset == 6
