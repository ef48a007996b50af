"""Fault 15 of issue 11 on the real services: an epoch planned but not published. The planner's marker
is taken, then S3 (the run's spec) or Kafka (the epoch's jobs) fails before the publish: the next try of
the same DAG run must plan and publish the epoch instead of finding it "planned" and waiting for samples
that were never sent. The failure is real: the planner's settings point S3 or Kafka at a port where
nothing listens; the retry uses the real ones."""

from __future__ import annotations

import pytest
from faultkit import read_topic

from essp.clients.kafka import ensure_topics
from essp.clients.redis import redis_client
from essp.contract import DecodeChunk, RedisKeys, Topics, decode
from essp.datasets.ingest import ingest_directory
from essp.datasets.synth import synthesize
from essp.errors import EsspError
from essp.lifecycle.epochs import plan_epoch_once, verify_manifest
from essp.lifecycle.params import parse_params

pytestmark = pytest.mark.fault

RUN = "plan-fault"
TOKEN = "essp_train/manual__plan-fault"


@pytest.fixture
def spec(settings, tmp_path):
    synthesize(tmp_path / "videos", classes=2, videos_per_class=4, frames=16, height=32, width=32, keyint=4, seed=3)
    ingest_directory(settings, tmp_path / "videos", "planfault")
    spec = parse_params({"dataset": "planfault", "run": RUN, "rgb_arch": "tiny", "flow_arch": "tiny", "length": 4,
                         "size": 32, "samples_per_epoch": 12})
    verify_manifest(settings, spec)
    ensure_topics(settings, Topics(settings.topic_prefix).shared())  # what `essp infra init` creates
    return spec


def _jobs(settings) -> list[str]:
    topic = Topics(settings.topic_prefix).decode(RUN, 0)
    chunks = [decode(record.value, topic, (DecodeChunk,)) for record in read_topic(settings, topic)]
    return [job.sample_id for chunk in chunks for job in chunk.jobs]


@pytest.mark.parametrize("service", ["kafka", "s3"])
def test_an_epoch_whose_publish_failed_is_published_by_the_next_try(settings, spec, closed_port, service):
    broken = settings.model_copy(update={"kafka_port": closed_port} if service == "kafka" else
                                 {"s3_port": closed_port})
    with pytest.raises(EsspError):  # ServiceUnavailable names the service; it is an EsspError
        plan_epoch_once(broken, spec, 0, TOKEN, planner="train[0]#1")
    # the first try left no "planned" marker behind: the next try (or the other stream's task) plans
    key_pattern = RedisKeys(settings.redis_prefix).epoch_planned(RUN, 0, "*")
    assert not list(redis_client(settings).scan_iter(match=key_pattern))
    assert plan_epoch_once(settings, spec, 0, TOKEN, planner="train[0]#2") is True
    jobs = _jobs(settings)
    assert len(jobs) == 12 and len(set(jobs)) == 12
    # published once: the other stream's task of the DAG run finds it planned and publishes nothing
    assert plan_epoch_once(settings, spec, 0, TOKEN, planner="train[1]#1") is False
    assert len(_jobs(settings)) == 12
    request = redis_client(settings).get(RedisKeys(settings.redis_prefix).epoch_request(RUN))
    assert request is not None and b'"expected": 12' in request


def test_a_planner_that_died_holding_the_lease_is_replaced_by_its_next_try(settings, spec):
    # try 1 took the lease and died (SIGKILL: nothing gave it back); try 2 of the same task takes over at
    # once, another task waits for the lease and then finds the epoch planned
    keys = RedisKeys(settings.redis_prefix)
    import hashlib

    key = keys.epoch_planned(RUN, 0, hashlib.sha1(TOKEN.encode()).hexdigest()[:16])
    redis_client(settings).set(key, "planning train[0]#1 deadbeef", ex=600)
    assert plan_epoch_once(settings, spec, 0, TOKEN, planner="train[0]#2") is True
    assert len(_jobs(settings)) == 12
    # a lease held by another live task is waited for, then refused with its holder's name
    redis_client(settings).set(key, "planning train[1]#1 cafe", ex=600)
    with pytest.raises(EsspError, match=r"being planned by train\[1\]#1"):
        plan_epoch_once(settings, spec, 0, TOKEN, planner="train[0]#3", lease_s=0.5)
