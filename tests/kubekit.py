"""The real single-node cluster of `make e2e-k8s` (k8s/e2e/cluster.sh) for tests/test_e2e_k8s.py: kubectl
with the admin's or a service account's kubeconfig, the e2e overlay applied, the settings ConfigMap and the
credentials Secret written from a test's own settings, and a watch that counts the pods a run creates."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr

from essp.settings import Settings

REPO = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("ESSP_K8S_STATE") or "~/.local/state/essp/k8s").expanduser()
CACHE = Path(os.environ.get("ESSP_K8S_CACHE") or "~/.cache/essp/k8s").expanduser()
ADMIN = STATE / "admin.kubeconfig"
NAMESPACE = "essp"
OVERLAY = REPO / "k8s" / "overlays" / "e2e"
# Settings a pod must not get: host paths, and what only Airflow needs (its database, its login).
HOST_ONLY = ("state_dir", "airflow_home", "dags_folder", "plugins_folder", "project_dir", "ready_file")


def kubectl_binary() -> str:
    """The cluster's own kubectl (same version as the server), built by cluster.sh."""
    for path in sorted(CACHE.glob("*/bin/kubectl")):
        return str(path)
    raise AssertionError(f"no kubectl under {CACHE}: run `make e2e-k8s` (k8s/e2e/cluster.sh up)")


def kubectl(*args: str, kubeconfig: Path = ADMIN, stdin: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run([kubectl_binary(), "--kubeconfig", str(kubeconfig), *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done


def kubectl_json(*args: str, kubeconfig: Path = ADMIN) -> Any:
    return json.loads(kubectl(*args, "-o", "json", kubeconfig=kubeconfig).stdout)


def cluster_ready() -> None:
    if not ADMIN.is_file():
        raise AssertionError(f"no e2e cluster ({ADMIN} is missing): run `make e2e-k8s`, or k8s/e2e/cluster.sh up")
    nodes = kubectl_json("get", "nodes")["items"]
    ready = [n["metadata"]["name"] for n in nodes
             if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])]
    assert ready, f"no Ready node: {[n['metadata']['name'] for n in nodes]}"


def apply_overlay() -> None:
    """k8s/overlays/e2e, rendered by the venv's kustomize (the 1.20 kubectl's is too old for it), applied
    by the cluster's kubectl."""
    from essp.stack.services import venv_binary

    rendered = subprocess.run([venv_binary("kubectl"), "kustomize", str(OVERLAY)], capture_output=True, text=True,
                              timeout=120, check=True).stdout
    kubectl("apply", "-f", "-", stdin=rendered)


def pod_settings(settings: Settings) -> tuple[dict[str, str], dict[str, str]]:
    """(ConfigMap data, Secret data) of the pods, from ``settings``: every ESSP_* setting but the host paths
    and Airflow's own; the credentials the data plane needs go to the Secret."""
    config: dict[str, str] = {}
    secret: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None or name in HOST_ONLY or name.startswith(("pg_", "airflow_")):
            continue
        key = f"ESSP_{name.upper()}"
        if isinstance(value, SecretStr):
            secret[key] = value.get_secret_value()
        else:
            config[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return config, secret


def write_pod_settings(settings: Settings) -> None:
    config, secret = pod_settings(settings)
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "essp-settings", "namespace": NAMESPACE},
                 "data": config}
    kubectl("apply", "-f", "-", stdin=json.dumps(configmap))
    with tempfile.TemporaryDirectory(prefix="essp-k8s-") as tmp:  # the values never on a command line
        env_file = Path(tmp) / "credentials.env"
        env_file.touch(mode=0o600)
        env_file.write_text("".join(f"{k}={v}\n" for k, v in sorted(secret.items())))
        rendered = kubectl("-n", NAMESPACE, "create", "secret", "generic", settings.k8s_secret,
                           f"--from-env-file={env_file}", "--dry-run=client", "-o", "yaml").stdout
    kubectl("apply", "-f", "-", stdin=rendered)


def service_account_kubeconfig(account: str, path: Path) -> Path:
    """A kubeconfig holding ``account``'s token (from its token Secret, as Kubernetes 1.20 makes them)."""
    for _ in range(100):
        account_object = kubectl_json("-n", NAMESPACE, "get", "serviceaccount", account)
        names = [s["name"] for s in account_object.get("secrets") or []]
        if names:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"service account {account} got no token Secret")
    token = base64.b64decode(kubectl_json("-n", NAMESPACE, "get", "secret", names[0])["data"]["token"]).decode()
    admin = yaml.safe_load(ADMIN.read_text())
    config = {**admin, "users": [{"name": account, "user": {"token": token}}],
              "contexts": [{"name": "essp-e2e", "context": {"cluster": "essp-e2e", "user": account,
                                                            "namespace": NAMESPACE}}]}
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(config))
    return path


def api_server() -> str:
    """host:port of the API server, from the admin kubeconfig."""
    server = yaml.safe_load(ADMIN.read_text())["clusters"][0]["cluster"]["server"]
    return server.removeprefix("https://")


def pods(selector: str | None = None) -> list[dict[str, Any]]:
    args = ["-n", NAMESPACE, "get", "pods"] + (["-l", selector] if selector else [])
    return kubectl_json(*args)["items"]


def wait_until(what: str, check, timeout_s: float, poll_s: float = 1.0) -> Any:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s (last: {value!r})")
        time.sleep(poll_s)


@dataclass
class PodWatch:
    """Every pod of the namespace seen while it runs (a kubectl watch): name -> labels, phases seen."""

    seen: dict[str, dict[str, Any]] = field(default_factory=dict)
    _proc: subprocess.Popen | None = None
    _thread: threading.Thread | None = None

    def __enter__(self) -> PodWatch:
        self._proc = subprocess.Popen([kubectl_binary(), "--kubeconfig", str(ADMIN), "-n", NAMESPACE, "get", "pods",
                                       "--watch", "--output-watch-events", "-o", "json"],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        decoder = json.JSONDecoder()
        buffer = ""
        for line in self._proc.stdout:
            buffer += line
            try:
                event, end = decoder.raw_decode(buffer.lstrip())
            except json.JSONDecodeError:
                continue
            buffer = buffer.lstrip()[end:]
            pod = event.get("object") or {}
            meta = pod.get("metadata") or {}
            entry = self.seen.setdefault(meta.get("name", "?"), {"labels": meta.get("labels") or {}, "phases": []})
            phase = (pod.get("status") or {}).get("phase")
            if phase and (not entry["phases"] or entry["phases"][-1] != phase):
                entry["phases"].append(phase)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.seen if n.startswith(prefix))

    def by_label(self, key: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, entry in self.seen.items():
            value = entry["labels"].get(key)
            if value:
                out.setdefault(value, []).append(name)
        return out


def leftovers(run_label: str) -> dict[str, Iterable[str]]:
    """What a finished run left in the namespace: pods, ReplicaSets with replicas, and the run's objects."""
    left_pods = [p["metadata"]["name"] for p in pods()]
    sets = kubectl_json("-n", NAMESPACE, "get", "replicasets")["items"]
    busy_sets = [s["metadata"]["name"] for s in sets if (s["spec"].get("replicas") or 0) > 0
                 or (s["metadata"].get("labels") or {}).get("essp/run") == run_label]
    deployments = [d["metadata"]["name"] for d in kubectl_json("-n", NAMESPACE, "get", "deployments")["items"]
                   if (d["metadata"].get("labels") or {}).get("essp/run") == run_label]
    return {"pods": left_pods, "replicasets": busy_sets, "deployments": deployments}
