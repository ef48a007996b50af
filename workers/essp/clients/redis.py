"""Redis: one connection pool per address, and a ping that names the service when it fails.

Replies are parsed by hiredis (in C); commands are packed by redis-py's own serializer, which sends a
large value as it is (a buffer of its own in the socket write), where hiredis' packer copies every
argument into one new string: for the data plane's megabyte payloads that copy was 12% of a flow
worker's time."""

from __future__ import annotations

import threading

import redis
from redis.connection import Encoder, PythonRespSerializer

from essp.errors import ServiceUnavailable
from essp.settings import Settings

_pools: dict[tuple[str, int, int], redis.ConnectionPool] = {}
_lock = threading.Lock()


def redis_client(settings: Settings, *, db: int | None = None) -> redis.Redis:
    """A client on the shared pool of this address and database (pools are per process)."""
    db = settings.redis_db if db is None else db
    key = (settings.redis_host, settings.redis_port, db)
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            password = settings.redis_password.get_secret_value() if settings.redis_password else None
            pool = redis.ConnectionPool(
                host=settings.redis_host, port=settings.redis_port, db=db, password=password,
                socket_connect_timeout=3, socket_timeout=30, health_check_interval=30,
                command_packer=PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode),
            )
            _pools[key] = pool
    return redis.Redis(connection_pool=pool)


def check_redis(settings: Settings) -> redis.Redis:
    """A client that has answered PING, or :class:`ServiceUnavailable` naming Redis."""
    client = redis_client(settings)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise ServiceUnavailable("Redis", f"{settings.redis_host}:{settings.redis_port}", exc) from None
    return client
