"""Batched commits of a resident worker, on the real broker: finished records are committed at most every
``commit_interval_s``, and at once when the worker goes idle, so an epoch's end is committed without
waiting for the interval, and a busy worker pays the broker one commit per interval instead of one per
record."""

from __future__ import annotations

import threading
import time

import pytest
from kafka import KafkaConsumer, TopicPartition

from essp.clients.kafka import MessageConsumer, MessageProducer, ensure_topics
from essp.contract import DecodeChunk, DecodeJob, Topics
from essp.dataplane.resident import ResidentWorker

RUN, RECORDS, PARTITIONS = "r-commit", 6, 2


class Recorder(ResidentWorker):
    """A worker whose work is to remember what it read (and take a little time over it)."""

    kind = "recorder"
    family = "decode"

    def __init__(self, settings, **kwargs) -> None:  # noqa: ANN001, ANN003
        super().__init__(settings, **kwargs)
        self.seen: list[tuple[int, int]] = []

    def group_id(self) -> str:
        return f"{self.settings.topic_prefix}.recorder"

    def pattern(self) -> str:
        return self.topics.decode_pattern(RUN)

    def expected(self) -> tuple:
        return (DecodeChunk,)

    def handle(self, received) -> None:  # noqa: ANN001
        time.sleep(0.05)
        self.seen.append((received.partition, received.offset))


def _chunk(i: int) -> DecodeChunk:
    return DecodeChunk(jobs=[DecodeJob(run=RUN, epoch=0, sample_id=f"s{i:03d}", video="s3://v/a.mp4", label=0,
                                       offset=i, length=4, height=32, width=32)])


def _committed(settings, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets (an OffsetFetch: reading them does not join the group)."""
    reader = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False)
    try:
        found = {p: reader.committed(TopicPartition(topic, p)) for p in range(PARTITIONS)}
    finally:
        reader.close()
    return {p: o for p, o in found.items() if o is not None and o >= 0}


@pytest.mark.parametrize(("interval_s", "most_commits"), [(60.0, 2), (0.0, None)])
def test_finished_records_are_committed_in_batches_and_at_once_when_idle(settings, monkeypatch, interval_s,
                                                                         most_commits):
    settings = settings.model_copy(update={"commit_interval_s": interval_s, "heartbeat_s": 30.0})
    topics = Topics(settings.topic_prefix)
    topic = topics.decode(RUN, 0)
    ensure_topics(settings, [topic, topics.control, topics.events, topics.dead], partitions=PARTITIONS)
    with MessageProducer(settings) as producer:
        for i in range(RECORDS):
            producer.publish(topic, _chunk(i), key=f"s{i:03d}")
    commits: list[dict] = []
    real_commit = MessageConsumer.commit

    def counting_commit(self, offsets=None):  # noqa: ANN001, ANN202 - the real commit, counted
        commits.append(dict(offsets or {}))
        return real_commit(self, offsets)

    monkeypatch.setattr(MessageConsumer, "commit", counting_commit)
    worker = Recorder(settings, worker_id="recorder-0")
    ready = threading.Event()
    thread = threading.Thread(target=worker.serve, kwargs={"install_signals": False, "ready": ready}, daemon=True)
    thread.start()
    try:
        assert ready.wait(30)
        deadline = time.monotonic() + 60
        while len(worker.seen) < RECORDS and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(worker.seen) == RECORDS
        # Idle now: everything it finished is committed well before the interval is over.
        ends: dict[int, int] = {}
        for partition, offset in worker.seen:
            ends[partition] = max(ends.get(partition, 0), offset + 1)
        deadline = time.monotonic() + 15
        while _committed(settings, worker.group_id(), topic) != ends and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _committed(settings, worker.group_id(), topic) == ends
        if most_commits is None:  # committing after every poll: one commit per record
            assert len(commits) >= RECORDS
        else:
            assert 1 <= len(commits) <= most_commits
    finally:
        worker.stop()
        thread.join(20)
    assert not thread.is_alive()
