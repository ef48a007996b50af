"""Every address, port, credential and name ESSP uses, in one settings object.

Values come from environment variables with the ``ESSP_`` prefix (``ESSP_REDIS_PORT=6380``), then
from ``<state_dir>/secrets.env`` (written by ``essp infra up`` with random local credentials), then
from the defaults below. The defaults describe the embedded local stack on 127.0.0.1; no credential
has a default here: a local run gets generated ones (see :func:`ensure_local_secrets`), a
Kubernetes pod gets them from a Secret, Docker Compose from its ``.env`` file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "ESSP_"
SECRETS_FILE = "secrets.env"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "essp"


def _state_dir_from_env() -> Path:
    return Path(os.environ.get(f"{ENV_PREFIX}STATE_DIR") or default_state_dir()).expanduser()


class Settings(BaseSettings):
    """The one source of truth for how ESSP reaches its services."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, validate_default=True
    )

    state_dir: Path = Field(default_factory=_state_dir_from_env,
                            description="Data, logs and PID files of the local stack.")

    # Redis: payloads (frames, features) with TTL, and the in-flight bound.
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_db: int = Field(0, ge=0, le=15)
    redis_password: SecretStr | None = None
    redis_prefix: str = Field("essp", description="Prefix of every Redis key ESSP writes.")
    redis_maxmemory_mb: int = Field(2048, ge=16, description=(
        "maxmemory of the Redis ESSP starts itself (noeviction): at the limit the decode waits (back-pressure) "
        "and a stalled epoch says why. A reused Redis keeps its own setting."))

    # Kafka protocol: jobs, ready notices, control, events, dead letters.
    kafka_host: str = "127.0.0.1"
    kafka_port: int = 19092
    topic_prefix: str = Field("essp", description="Prefix of every Kafka topic ESSP uses.")
    kafka_partitions: int = Field(4, ge=1, description="Partitions of per-run job topics.")
    kafka_session_timeout_ms: int = 6000
    kafka_membership: Literal["lease", "group"] = Field(
        "lease", description="How workers of one kind share partitions: leases in Redis (works on every "
                             "broker, Tansu included) or Kafka's group protocol.")
    kafka_storage_bucket: str = Field("essp-kafka", description="Bucket the local broker stores in.")

    # S3 (MinIO in production, SeaweedFS locally): videos, manifests, checkpoints, reports.
    s3_host: str = "127.0.0.1"
    s3_port: int = 8333
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    bucket_videos: str = "essp-videos"
    bucket_models: str = "essp-models"
    bucket_runs: str = "essp-runs"
    # The local SeaweedFS uses a block of ports from here on (master, volume, filer, admin).
    weed_port_base: int = 9333

    # PostgreSQL: Airflow's metadata database.
    pg_host: str = "127.0.0.1"
    pg_port: int = 5432
    pg_user: str = "postgres"
    pg_password: SecretStr | None = None
    pg_database: str = "essp_airflow"

    # Airflow.
    airflow_port: int = 8080
    airflow_user: str = "admin"
    airflow_password: SecretStr | None = None
    airflow_jwt_secret: SecretStr | None = Field(None, description="Shared by every Airflow process.")
    # The checkout (or image folder) that holds dags/, plugins/ and docs/: the folder ESSP's commands are
    # run from unless set (`make` runs them from the checkout's root).
    project_dir: Path = Field(default_factory=Path.cwd, description="The folder holding dags/, plugins/ and docs/.")
    dags_folder: Path | None = Field(None, description="Airflow's DAG folder; unset: <project_dir>/dags.")
    plugins_folder: Path | None = Field(None, description="Airflow's plugin folder; unset: <project_dir>/plugins.")

    pretrained_dirs: str = Field("", description=(
        "Comma-separated folders a run's local `pretrained` file must be in; unset: <state_dir>/pretrained. "
        "s3:// weights must be in the models bucket or a run's checkpoints."))

    # The streaming data plane.
    payload_ttl_s: int = Field(900, ge=10, description="Lifetime of frames and features in Redis.")
    max_inflight: int = Field(64, ge=1, description="Default bound on samples of one run in flight.")
    chunk_samples: int = Field(16, ge=1, le=256, description=(
        "Most samples one job / notice message carries (at most a quarter of a run's in-flight bound and an "
        "eighth of the epoch; see essp.dataplane.plan.chunk_size)."))
    commit_interval_s: float = Field(1.0, ge=0, description=(
        "Longest a worker or consumer holds finished records uncommitted: it commits what it finished at most "
        "this often, and at once when it goes idle, stops or hands partitions over (0: after every poll)."))
    video_cache_mb: int = Field(256, ge=0, description="In-memory LRU of video bytes per decode worker.")
    decode_timeout_s: float = Field(120.0, gt=0, description=(
        "Longest one sample's decode may take: a decoder hung longer ends its worker (restarted by its fleet), "
        "and a sample that ends or hangs the decoder 3 times is quarantined."))
    prefetch_depth: int = Field(8, ge=1, description="Samples a consumer holds ready ahead of the trainer.")
    heartbeat_s: float = Field(5.0, gt=0, description="Interval of worker heartbeats on the events topic.")
    extractor_modules: str = Field("", description="Comma-separated modules that register extra extractors.")
    ready_file: Path | None = Field(None, description="Set by a resident process's launcher: the process writes "
                                                      "this file once it serves (essp.deploy.local waits for it).")

    # How Airflow runs a stage: a local process of `essp stage ...`, or a Kubernetes pod.
    stage_mode: Literal["local", "kubernetes"] = "local"
    # Where the "ensure workers" step keeps the resident workers: local processes or Deployments
    # (k8s/); unset, the same as the stage mode.
    worker_mode: Literal["local", "kubernetes"] | None = None
    k8s_namespace: str = "essp"
    k8s_secret: str = Field("essp-credentials", description="Secret holding ESSP_* credentials.")
    image_worker_cpu: str = "ghcr.io/essp-project/essp-worker-cpu:0.1.0"
    image_worker_gpu: str = "ghcr.io/essp-project/essp-worker-gpu:0.1.0"
    k8s_service_account: str = Field("essp-airflow", description="Service account of the stage pods (k8s/).")
    k8s_trainer_gpus: bool = Field(True, description="Trainer Deployments and GPU stage pods request "
                                                     "nvidia.com/gpu (off on a cluster without GPUs: "
                                                     "k8s/overlays/local).")
    k8s_host_network: bool = Field(False, description=(
        "Stage pods use the node's network (hostNetwork), as the Deployments of k8s/overlays/e2e do: for a "
        "cluster whose data services listen on the node's loopback."))
    k8s_api_server: str = Field("", description=(
        "host:port at which stage pods that call the Kubernetes API reach it (KUBERNETES_SERVICE_HOST/PORT); "
        "empty: the cluster's kubernetes Service. For a cluster without kube-proxy (make e2e-k8s)."))
    k8s_stage_max_cpu: str = Field("", description=(
        "Cap on a stage pod's CPU request (its limit stays the stage's): a small cluster can still schedule "
        "the 4-CPU scoring stages. Empty: no cap."))
    k8s_stage_max_memory: str = Field("", description="Cap on a stage pod's memory request, as k8s_stage_max_cpu.")
    k8s_stage_wait_s: float = Field(30.0, ge=0, description=(
        "Seconds a stage task watches its new pod in the worker before deferring: a pod done by then needs no "
        "deferral, which Airflow 3.3.2 can fail when its trigger fires at once (apache/airflow#72716)."))

    @classmethod
    def settings_customise_sources(  # noqa: ANN206
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ):
        # secrets.env lives in the state folder, which is itself a setting: read it after env.
        from pydantic_settings import DotEnvSettingsSource

        state_dir = init_settings.init_kwargs.get("state_dir") or _state_dir_from_env()
        secrets_file = Path(state_dir).expanduser() / SECRETS_FILE
        local = DotEnvSettingsSource(settings_cls, env_file=secrets_file, env_prefix=ENV_PREFIX)
        return (init_settings, env_settings, local, file_secret_settings)

    @model_validator(mode="after")
    def _folders(self) -> Settings:
        # Frozen model: fill the derived folders in place, once, while validating.
        if self.dags_folder is None:
            object.__setattr__(self, "dags_folder", self.project_dir / "dags")
        if self.plugins_folder is None:
            object.__setattr__(self, "plugins_folder", self.project_dir / "plugins")
        return self

    @model_validator(mode="after")
    def _ports_in_range(self) -> Settings:
        for name in ("redis_port", "kafka_port", "s3_port", "pg_port", "airflow_port"):
            port = getattr(self, name)
            if not 0 < port < 65536:
                raise ValueError(f"{ENV_PREFIX}{name.upper()}={port} is not a TCP port")
        return self

    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.kafka_host}:{self.kafka_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"{self.s3_host}:{self.s3_port}"

    @property
    def s3_url(self) -> str:
        return f"{'https' if self.s3_secure else 'http'}://{self.s3_endpoint}"

    @property
    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.airflow_port}"

    @cached_property
    def airflow_home(self) -> Path:
        return self.state_dir / "airflow"

    def secret(self, name: str) -> str:
        """The plain value of a credential setting, or a clear error if none was configured."""
        value = getattr(self, name)
        if value is None:
            raise MissingSetting(
                f"{ENV_PREFIX}{name.upper()} is not set: run `essp infra up` to generate local "
                f"credentials in {self.state_dir / SECRETS_FILE}, or set the variable"
            )
        return value.get_secret_value() if isinstance(value, SecretStr) else str(value)

    def with_env(self, env: dict[str, str]) -> Settings:
        """These settings with the ``ESSP_*`` variables of ``env`` (e.g. from Airflow's connections) on top."""
        fields = type(self).model_fields
        updates = {key[len(ENV_PREFIX):].lower(): value for key, value in env.items()
                   if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].lower() in fields}
        return type(self)(**{**self.as_env_fields(), **updates})

    def as_env_fields(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in type(self).model_fields if getattr(self, name) is not None}

    def as_env(self) -> dict[str, str]:
        """The settings as ESSP_* variables, for a subprocess or a pod to rebuild them."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"{ENV_PREFIX}{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return env


class MissingSetting(RuntimeError):
    """A setting that has no default (a credential) was not configured."""


# Credentials the local stack generates once and keeps in <state_dir>/secrets.env. The Redis password is
# the one the Redis ESSP starts asks for; a reused Redis without a password is still reached with it: such a
# server's default user is `nopass`, which takes any password in redis-py's `HELLO 3 AUTH default <password>`.
LOCAL_SECRETS = ("s3_access_key", "s3_secret_key", "redis_password", "pg_password", "airflow_password",
                 "airflow_jwt_secret")


# Credentials of Airflow itself: its metadata database, its UI login, the secret that signs its tokens. No
# worker, trainer or stage needs them (they reach Redis, Kafka and S3 only).
ADMIN_SECRETS = ("pg_password", "airflow_password", "airflow_jwt_secret")


def worker_environ(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without what only Airflow needs, for a worker, trainer or stage process: the ``ESSP_*``
    variables of :data:`ADMIN_SECRETS` and every ``AIRFLOW*`` variable (Airflow's configuration holds its
    database URL with the password, its JWT, API and Fernet secrets; ``AIRFLOW_CONN_*`` hold the
    connections, whose credentials such a process gets as ``ESSP_*`` variables)."""
    denied = {f"{ENV_PREFIX}{name.upper()}" for name in ADMIN_SECRETS}
    return {key: value for key, value in env.items() if key not in denied and not key.startswith("AIRFLOW")}


def ensure_local_secrets(state_dir: Path | None = None) -> Path:
    """Write random local credentials to ``<state_dir>/secrets.env`` unless it already has them."""
    state_dir = state_dir or _state_dir_from_env()
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / SECRETS_FILE
    existing = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                existing[key.strip()] = value.strip()
    changed = False
    for name in LOCAL_SECRETS:
        key = f"{ENV_PREFIX}{name.upper()}"
        if key not in existing:
            existing[key] = ("essp" + secrets.token_hex(6)) if name == "s3_access_key" else secrets.token_urlsafe(18)
            changed = True
    if changed:
        write_private(path, "".join(f"{k}={v}\n" for k, v in sorted(existing.items())))
    return path


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only, from the first byte on: the file is created
    0600 (whatever the umask), written under a temporary name and renamed over ``path``. Writing it first
    and chmod-ing it after would leave the secret readable by others in between."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a stale temporary file keeps its old mode under O_CREAT
        data = text.encode()
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def get_settings(**overrides: object) -> Settings:
    """Settings from the environment and the state folder, with explicit overrides on top."""
    return Settings(**overrides)
