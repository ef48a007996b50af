"""Secrets of the local stack: the Redis ESSP starts asks for the generated password, and neither that
password nor PostgreSQL's reaches a command line (`ps`) or a log; a reused Redis without a password is
still reached with the generated one; one that wants another password is refused with a clear error."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import redis
from conftest import free_port

from essp.clients.redis import redis_client
from essp.settings import Settings, ensure_local_secrets, write_private
from essp.stack.services import InfraError, LocalStack, redis_login


def _local(tmp_path: Path, **overrides: object) -> Settings:
    ensure_local_secrets(tmp_path)
    return Settings(state_dir=tmp_path, **overrides)


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_the_redis_essp_starts_asks_for_the_generated_password_kept_off_its_command_line(tmp_path):
    settings = _local(tmp_path, redis_port=free_port())
    password = settings.secret("redis_password")  # generated with the other local credentials
    stack = LocalStack(settings)
    try:
        [status] = stack.up(["redis"])
        assert status.action == "started"
        assert redis_client(settings).ping()
        with pytest.raises(redis.AuthenticationError):  # no password: refused
            redis.Redis(port=settings.redis_port, socket_timeout=5).ping()
        # seen from the start: argv as spawned (the log's first line) and as /proc shows it
        assert password not in _cmdline(status.pid)
        assert password not in stack.table.log("redis").read_text()
        conf = stack.table.run_dir / "redis.conf"
        assert password in conf.read_text() and stat.S_IMODE(conf.stat().st_mode) == 0o600
    finally:
        stack.down(["redis"])


def test_a_reused_redis_without_a_password_takes_the_generated_one(tmp_path, base_settings):
    """This machine's own Redis on 6379 (no password) is what the CI and the tests run against: with a
    generated ESSP_REDIS_PASSWORD it is reused, and the sync and the triggerer's asyncio clients work."""
    if redis_login(base_settings.model_copy(update={"redis_password": None})) != "ok":
        pytest.skip("the shared Redis asks for a password: nothing to check here")
    settings = _local(tmp_path, redis_host=base_settings.redis_host, redis_port=base_settings.redis_port)
    assert settings.redis_password is not None
    [status] = LocalStack(settings).up(["redis"])
    assert status.state == "external" and status.action == "reused"
    assert redis_client(settings, db=1).ping()

    async def ping() -> bool:
        import redis.asyncio as aioredis

        client = aioredis.Redis(host=settings.redis_host, port=settings.redis_port,
                                password=settings.secret("redis_password"))
        try:
            return await client.ping()
        finally:
            await client.aclose()

    assert asyncio.run(ping())


def test_a_redis_that_wants_another_password_is_refused_with_the_variable_named(tmp_path):
    port = free_port()
    conf = tmp_path / "other.conf"
    write_private(conf, f'port {port}\nbind 127.0.0.1\nsave ""\nrequirepass "not-ours"\n')
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        settings = _local(tmp_path / "state", redis_port=port)
        deadline = time.monotonic() + 10
        while redis_login(settings) == "down" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert redis_login(settings) == "refused"
        with pytest.raises(InfraError, match="refuses ESSP_REDIS_PASSWORD"):
            LocalStack(settings).up(["redis"])
    finally:
        proc.terminate()
        proc.wait(10)



@pytest.fixture
def scram_cluster():
    """A PostgreSQL cluster of this test (scram-sha-256 over TCP, peer on the socket, every statement
    logged) whose user postgres has a password that is not ESSP's."""
    bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if os.geteuid() != 0 or not shutil.which("runuser") or not bindirs:
        pytest.skip("needs root, runuser and Debian's PostgreSQL")
    bindir = bindirs[-1].parent
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="essp-pg-"))
    shutil.chown(root, "postgres", "postgres")
    pwfile = root / "pw"
    pwfile.write_text("not-essps-password\n")
    shutil.chown(pwfile, "postgres", "postgres")
    port = free_port()
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, str(bindir / "initdb"), "-D", str(root / "data"), "-U", "postgres",
                    "--auth-local=peer", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"],
                   check=True, capture_output=True)
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c log_statement=all"
    subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-o", options, "-l",
                    str(root / "server.log"), "-w", "start"], check=True, capture_output=True)
    try:
        yield port, root / "server.log"
    finally:
        subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_the_generated_pg_password_is_set_through_stdin_as_a_scram_verifier(tmp_path, monkeypatch, scram_cluster):
    import psycopg2

    port, server_log = scram_cluster
    settings = _local(tmp_path, pg_port=port, pg_user="postgres")
    password = settings.secret("pg_password")
    # every argv given to runuser, recorded by a wrapper in front of the real one
    real = shutil.which("runuser")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "runuser"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/argv.log\nexec {real} "$@"\n')
    wrapper.chmod(0o700)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("PGPORT", str(port))  # whatever psql is given, never the shared cluster

    LocalStack(settings)._ready_postgres()  # refused at first: sets the password, then creates the database

    psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password=password,
                     dbname=settings.pg_database, connect_timeout=5).close()
    argv = (tmp_path / "argv.log").read_text()
    assert "psql" in argv and password not in argv
    log = server_log.read_text()
    assert "ALTER USER" in log and "SCRAM-SHA-256$4096:" in log and password not in log


# What the process starting workers and stages holds when it is an Airflow task: Airflow's own
# configuration (database URL with its password, token secrets) and the ESSP settings of Airflow's processes.
AIRFLOW_TASK_ENV = {
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://postgres:db-pw-{tag}@127.0.0.1:5432/essp",
    "AIRFLOW__API_AUTH__JWT_SECRET": "jwt-{tag}", "AIRFLOW__API__SECRET_KEY": "api-{tag}",
    "AIRFLOW__CORE__FERNET_KEY": "fernet-{tag}",
    "ESSP_PG_PASSWORD": "pg-{tag}", "ESSP_AIRFLOW_PASSWORD": "ui-{tag}", "ESSP_AIRFLOW_JWT_SECRET": "jwt2-{tag}",
}


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _airflow_task_env(monkeypatch, settings: Settings) -> tuple[Settings, list[str]]:
    tag = os.urandom(6).hex()
    env = {key: value.format(tag=tag) for key, value in AIRFLOW_TASK_ENV.items()}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    secrets_ = {"pg_password": env["ESSP_PG_PASSWORD"], "airflow_password": env["ESSP_AIRFLOW_PASSWORD"],
                "airflow_jwt_secret": env["ESSP_AIRFLOW_JWT_SECRET"]}
    return settings.model_copy(update=secrets_), [v for v in env.values() if tag in v]


def test_a_resident_worker_gets_the_data_credentials_and_none_of_airflows(settings, base_settings, tmp_path,
                                                                          monkeypatch):
    from essp.deploy.local import LocalProcesses

    shutil.copy(base_settings.state_dir / "secrets.env", tmp_path / "secrets.env")
    given, forbidden = _airflow_task_env(monkeypatch, settings.model_copy(update={"state_dir": tmp_path}))
    assert given.pg_password is not None
    [worker] = LocalProcesses(given).start([("worker-decode-0", ["decode"])])
    try:
        env = _environ(worker.pid)
    finally:
        worker.stop()
    assert env["ESSP_S3_SECRET_KEY"] == settings.secret("s3_secret_key")
    assert env["ESSP_REDIS_PASSWORD"] == settings.secret("redis_password")
    assert not [value for value in forbidden if value in "\n".join(env.values())]
    assert not [key for key in env if key.startswith("AIRFLOW")]


def test_a_local_stage_process_gets_none_of_airflows_credentials(settings, monkeypatch):
    import threading

    from essp.connections import connection_env_vars
    from essp.operators.stage import EsspStageOperator

    _given, forbidden = _airflow_task_env(monkeypatch, settings)
    for name, value in connection_env_vars(settings).items():
        monkeypatch.setenv(name, value)
    op = EsspStageOperator(task_id="smoke_redis", stage_params={"token": "env"}, mode="local")
    done: dict = {}
    runner = threading.Thread(target=lambda: done.update(op.execute({})))
    runner.start()
    seen: dict[str, str] = {}
    while runner.is_alive() and not seen:  # the stage process lives a second or two: read it meanwhile
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == os.getpid() and b"stage\0smoke-redis" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    seen = _environ(int(pid))
            except OSError:
                continue
        time.sleep(0.02)
    runner.join(60)
    assert done["service"] == "redis" and seen, "the stage ran and was seen"
    assert seen["ESSP_REDIS_PASSWORD"] == settings.secret("redis_password")
    assert not [value for value in forbidden if value in "\n".join(seen.values())]
    assert not [key for key in seen if key.startswith("AIRFLOW")]
