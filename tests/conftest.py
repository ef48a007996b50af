"""Fixtures on the real local services. Each test gets its own topic prefix, Redis key prefix and
buckets, so tests never see each other's data; what a test creates is removed afterwards."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest

from essp.clients.kafka import delete_topics, kafka_admin
from essp.clients.redis import redis_client
from essp.clients.s3 import ObjectStore
from essp.errors import EsspError
from essp.infra import LocalStack, prepare_settings
from essp.settings import Settings


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    """Settings of the shared local stack, started (or reused) once per test session."""
    settings = prepare_settings()
    LocalStack(settings).up()
    return settings


@pytest.fixture
def settings(base_settings: Settings) -> Iterator[Settings]:
    """Settings isolated for one test: own topic prefix, Redis key prefix and buckets."""
    tag = "t" + uuid.uuid4().hex[:10]
    isolated = base_settings.model_copy(update={
        "topic_prefix": tag, "redis_prefix": tag, "bucket_videos": f"{tag}-videos",
        "bucket_models": f"{tag}-models", "bucket_runs": f"{tag}-runs",
    })
    yield isolated
    _cleanup(isolated)


def _cleanup(settings: Settings) -> None:
    client = redis_client(settings)
    keys = list(client.scan_iter(match=f"{settings.redis_prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    store = ObjectStore(settings)
    for bucket in (settings.bucket_videos, settings.bucket_models, settings.bucket_runs):
        try:
            store.delete_bucket(bucket)
        except EsspError:
            pass
    admin = kafka_admin(settings)
    try:
        topics = [t for t in admin.list_topics() if t.startswith(settings.topic_prefix + ".")]
    finally:
        admin.close()
    if topics:
        delete_topics(settings, topics)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on (bound and released; nothing of ours will take it meanwhile)."""
    return free_port()
