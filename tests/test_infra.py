"""The local stack's lifecycle on a stack of its own (own state folder and ports): `up` starts what
is missing and is a no-op the second time, a killed broker or S3 store comes back with its data,
and `down` leaves no process of ours running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, free_port_block

from essp.clients.kafka import MessageConsumer, MessageProducer, ensure_topics, kafka_admin
from essp.clients.s3 import ObjectStore
from essp.contract import SmokePing
from essp.settings import Settings, ensure_local_secrets
from essp.stack.procs import ProcessTable, pid_alive
from essp.stack.services import InfraError, LocalStack

pytestmark = pytest.mark.slow
SERVICES = ["redis", "s3", "kafka"]


@pytest.fixture
def own_stack(tmp_path):
    ensure_local_secrets(tmp_path)
    base = free_port_block(7)  # redis, s3, kafka, then weed's master, volume, filer, admin
    settings = Settings(state_dir=tmp_path, redis_port=base, s3_port=base + 1, kafka_port=base + 2,
                        weed_port_base=base + 3)
    stack = LocalStack(settings)
    yield stack
    stack.down(SERVICES)


def _kill(stack: LocalStack, name: str) -> int:
    record = stack.table.record(name)
    assert record is not None
    os.kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while pid_alive(record.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(record.pid)
    return record.pid


def _read(settings: Settings, group: str, topic: str, want: int, timeout_s: float = 20) -> list[str]:
    got: list[str] = []
    with MessageConsumer(settings, group, [topic], dead_letter_topic="dead") as consumer:
        deadline = time.monotonic() + timeout_s
        while len(got) < want and time.monotonic() < deadline:
            got += [r.message.token for r in consumer.poll(timeout_s=0.5, max_records=want - len(got))]
        consumer.commit()
    return got


def test_up_is_idempotent_restarts_keep_data_and_down_leaves_nothing(own_stack):
    stack, settings = own_stack, own_stack.settings
    first = {s.name: s for s in stack.up(SERVICES)}
    assert {n: s.action for n, s in first.items()} == {n: "started" for n in SERVICES}
    pids = {n: s.pid for n, s in first.items()}

    second = {s.name: s for s in stack.up(SERVICES)}
    assert {n: s.action for n, s in second.items()} == {n: "already running" for n in SERVICES}
    assert {n: s.pid for n, s in second.items()} == pids

    # Data: an object, a topic with 4 messages of which the group committed 2.
    store = ObjectStore(settings)
    store.ensure_bucket("keep")
    store.put_bytes("keep", "a/b.bin", b"payload")
    ensure_topics(settings, ["jobs"], partitions=1)
    with MessageProducer(settings) as producer:
        for i in range(4):
            producer.publish("jobs", SmokePing(token=f"m{i}"))
    assert _read(settings, "workers", "jobs", want=2) == ["m0", "m1"]

    # Kill the broker: `up` brings it back; topics and committed offsets survive.
    _kill(stack, "kafka")
    assert {s.name: s.state for s in stack.status(SERVICES)}["kafka"] == "down"
    again = {s.name: s for s in stack.up(SERVICES)}
    assert again["kafka"].action == "started" and again["kafka"].pid != pids["kafka"]
    admin = kafka_admin(settings)
    assert "jobs" in admin.list_topics()
    admin.close()
    assert _read(settings, "workers", "jobs", want=1) == ["m2"]

    # Kill the S3 store (and with it the broker's storage): both come back with their data.
    _kill(stack, "s3")
    assert stack.status(["s3"])[0].state == "down"
    assert {s.name: s.action for s in stack.up(SERVICES)}["s3"] == "started"
    assert ObjectStore(settings).get_bytes("keep", "a/b.bin") == b"payload"
    stack.up(SERVICES)  # the broker may have lost its storage meanwhile: up makes sure it answers
    assert _read(settings, "workers", "jobs", want=1) == ["m3"]

    recorded = [r.pid for r in (stack.table.record(n) for n in SERVICES) if r]
    assert len(recorded) == 3
    # `essp infra down` from another process, as a user runs it.
    done = subprocess.run([str(Path(sys.executable).parent / "essp"), "infra", "down"],
                          env={**os.environ, **settings.as_env()}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in SERVICES)
    deadline = time.monotonic() + 20
    while any(pid_alive(pid) for pid in recorded) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(pid) for pid in recorded)
    assert {s.state for s in stack.status(SERVICES)} == {"down"}
    assert stack.down(SERVICES) == []  # nothing left to stop


def test_committed_offsets_survive_a_broker_restart(own_stack):
    stack, settings = own_stack, own_stack.settings
    stack.up(SERVICES)
    ensure_topics(settings, ["jobs"], partitions=1)
    with MessageProducer(settings) as producer:
        for i in range(6):
            producer.publish("jobs", SmokePing(token=f"m{i}"))
    with MessageConsumer(settings, "workers", ["jobs"], dead_letter_topic="dead") as consumer:
        got: list[str] = []
        deadline = time.monotonic() + 20
        while len(got) < 4 and time.monotonic() < deadline:
            got += [r.message.token for r in consumer.poll(timeout_s=0.5, max_records=4 - len(got))]
        consumer.commit()
    assert got == ["m0", "m1", "m2", "m3"]

    _kill(stack, "kafka")
    stack.up(SERVICES)
    assert _read(settings, "workers", "jobs", want=2) == ["m4", "m5"]


def test_a_service_that_cannot_start_is_reported_with_its_log(tmp_path):
    ensure_local_secrets(tmp_path)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    # The S3 store's master port is taken by someone else: weed exits, and `up` says so.
    settings = Settings(state_dir=tmp_path, s3_port=free_port(), weed_port_base=taken.getsockname()[1])
    try:
        with pytest.raises(InfraError) as info:
            LocalStack(settings).up(["s3"])
    finally:
        taken.close()
    message = str(info.value)
    assert message.startswith(f"s3 did not answer on {settings.s3_url}")
    assert str(tmp_path / "logs" / "s3.log") in message
    assert "not available" in message  # the tail of weed's own log, quoted
    assert ProcessTable(tmp_path).record("s3") is None
