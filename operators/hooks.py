"""ESSP's services as Airflow sees them: the connections ``essp_redis``, ``essp_kafka`` and ``essp_s3``.

:class:`EsspHook` is the one way the operators and triggers reach ESSP's settings from inside Airflow:
the environment's ``ESSP_*`` settings with the connections on top (a connection that is not defined
falls back to the settings, so ``dag.test()`` works without them). A trigger keeps only connection ids
in its kwargs, never a credential: Airflow stores trigger kwargs in its database and shows them in its
REST API.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from essp.connections import CONN_IDS, REDIS_CONN_ID, settings_env_from_connection
from essp.settings import Settings


class EsspHook(BaseHook):
    """Settings from the ESSP connections (see the module's doc)."""

    def __init__(self, conn_ids: tuple[str, ...] = CONN_IDS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_ids = tuple(conn_ids)

    def env(self, *, include_secrets: bool = True) -> dict[str, str]:
        """``ESSP_*`` variables from the connections that are defined."""
        env: dict[str, str] = {}
        for conn_id in self.conn_ids:
            try:
                conn = self.get_connection(conn_id)
            except Exception:  # noqa: BLE001 - an undefined connection falls back to the ESSP_* settings
                continue
            env.update(settings_env_from_connection(conn_id, conn, include_secrets=include_secrets))
        return env

    async def aenv(self) -> dict[str, str]:
        """:meth:`env` from the triggerer's event loop."""
        env: dict[str, str] = {}
        for conn_id in self.conn_ids:
            try:
                conn = await self.aget_connection(conn_id)
            except Exception:  # noqa: BLE001 - as in env()
                continue
            env.update(settings_env_from_connection(conn_id, conn))
        return env

    def settings(self) -> Settings:
        """The environment's settings with the connections on top."""
        return Settings().with_env(self.env())

    async def asettings(self) -> Settings:
        return Settings().with_env(await self.aenv())

    def get_conn(self) -> Settings:
        return self.settings()


def stage_settings() -> Settings:
    """The ESSP settings inside an Airflow task."""
    return EsspHook().settings()


async def redis_client(conn_id: str = REDIS_CONN_ID) -> tuple[Any, str]:
    """An asyncio Redis client for the triggerer, from the connection ``conn_id``, and the key prefix."""
    import redis.asyncio as aioredis

    settings = await EsspHook((conn_id,)).asettings()
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    client = aioredis.Redis(host=settings.redis_host, port=settings.redis_port, db=settings.redis_db,
                            password=password, socket_connect_timeout=5, socket_timeout=30)
    return client, settings.redis_prefix
