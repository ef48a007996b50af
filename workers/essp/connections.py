"""Airflow connections <-> ESSP settings, both ways, in one table.

Airflow holds the service addresses and credentials as connections (``essp_redis``, ``essp_kafka``,
``essp_s3``); a stage run by Airflow rebuilds its settings from them as ``ESSP_*`` variables. This
module imports nothing from Airflow: it reads any object with ``host``, ``port``, ``login``,
``password`` and ``extra_dejson``.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from essp.settings import ENV_PREFIX, Settings

REDIS_CONN_ID = "essp_redis"
KAFKA_CONN_ID = "essp_kafka"
S3_CONN_ID = "essp_s3"
CONN_IDS = (REDIS_CONN_ID, KAFKA_CONN_ID, S3_CONN_ID)

# conn id -> (host setting, port setting, login setting, password setting, extra settings)
_TABLE: dict[str, tuple[str, str, str | None, str | None, tuple[str, ...]]] = {
    REDIS_CONN_ID: ("redis_host", "redis_port", None, "redis_password", ("redis_db", "redis_prefix")),
    KAFKA_CONN_ID: ("kafka_host", "kafka_port", None, None, ("topic_prefix", "kafka_partitions")),
    S3_CONN_ID: ("s3_host", "s3_port", "s3_access_key", "s3_secret_key",
                 ("s3_secure", "s3_region", "bucket_videos", "bucket_models", "bucket_runs")),
}
_CONN_TYPES = {REDIS_CONN_ID: "redis", KAFKA_CONN_ID: "generic", S3_CONN_ID: "generic"}
SECRET_SETTINGS = frozenset({"redis_password", "s3_access_key", "s3_secret_key"})


class ConnectionLike(Protocol):
    host: str | None
    port: int | None
    login: str | None
    password: str | None

    @property
    def extra_dejson(self) -> dict[str, Any]: ...


def _plain(value: Any) -> Any:
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def connections_from_settings(settings: Settings) -> dict[str, dict[str, Any]]:
    """The connections to create in Airflow, as the JSON that `AIRFLOW_CONN_*` variables take."""
    out = {}
    for conn_id, (host, port, login, password, extras) in _TABLE.items():
        conn: dict[str, Any] = {"conn_type": _CONN_TYPES[conn_id], "host": getattr(settings, host),
                                "port": getattr(settings, port),
                                "extra": {name: _plain(getattr(settings, name)) for name in extras}}
        if login and getattr(settings, login) is not None:
            conn["login"] = _plain(getattr(settings, login))
        if password and getattr(settings, password) is not None:
            conn["password"] = _plain(getattr(settings, password))
        out[conn_id] = conn
    return out


def connection_env_vars(settings: Settings) -> dict[str, str]:
    """``AIRFLOW_CONN_ESSP_*`` variables defining the connections for Airflow processes."""
    return {f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(conn)
            for conn_id, conn in connections_from_settings(settings).items()}


def settings_env_from_connection(conn_id: str, conn: ConnectionLike, *,
                                 include_secrets: bool = True) -> dict[str, str]:
    """``ESSP_*`` variables that rebuild the settings this connection describes."""
    host, port, login, password, extras = _TABLE[conn_id]
    env: dict[str, str] = {}

    def put(name: str | None, value: Any) -> None:
        if name is None or value is None or value == "":
            return
        if name in SECRET_SETTINGS and not include_secrets:
            return
        env[f"{ENV_PREFIX}{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)

    put(host, conn.host)
    put(port, conn.port)
    put(login, conn.login)
    put(password, conn.password)
    extra = conn.extra_dejson or {}
    for name in extras:
        put(name, extra.get(name))
    return env
