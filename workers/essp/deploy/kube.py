"""The resident workers in Kubernetes: scale their Deployments, clone the trainer template per run.

The manifests live in ``k8s/`` (a kustomize base and overlays). The data workers are one Deployment
per kind (``essp-decode``, ``essp-extract-<kind>``) that this module only scales; the trainer is a
template Deployment ``essp-trainer`` (``replicas: 0``) that :meth:`KubeWorkers.ensure_trainer`
clones into one Deployment per (run, stream). No Airflow here: the "ensure workers" step calls it.
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any

from essp.errors import EsspError

WORKER_DEPLOYMENTS: dict[str, str] = {
    "decode": "essp-decode",
    "flow": "essp-extract-flow",
    "rgb": "essp-extract-rgb",
    "framediff": "essp-extract-framediff",
}
TRAINER_TEMPLATE = "essp-trainer"
TRAINER_CONTAINER = "trainer"
GPU_RESOURCE = "nvidia.com/gpu"
LABEL_RUN = "essp/run"
LABEL_STREAM = "essp/stream"
LABEL_INSTANCE = "app.kubernetes.io/instance"
# Annotations keep the exact run and stream: names and label values may be cut or lower-cased.
ANNOTATION_RUN = "essp/run"
ANNOTATION_STREAM = "essp/stream"

# Metadata the API server (or a controller) writes; a clone must not carry the template's.
_SERVER_METADATA = ("uid", "resourceVersion", "creationTimestamp", "managedFields", "generation", "selfLink",
                    "ownerReferences", "deletionTimestamp", "deletionGracePeriodSeconds")
_SERVER_ANNOTATION_PREFIXES = ("deployment.kubernetes.io/", "kubectl.kubernetes.io/last-applied-configuration")


# --------------------------------------------------------------------------------------------------
# Names


def worker_kinds() -> list[str]:
    """The kinds a data-worker Deployment exists for: ``decode`` and every registered extractor kind."""
    from essp.dataplane.extractors import extractor_kinds

    return ["decode", *extractor_kinds()]


def deployment_name(kind: str) -> str:
    """The Deployment of worker ``kind``; plugin extractors get ``essp-extract-<kind>`` by convention."""
    known = worker_kinds()
    if kind not in known:
        raise EsspError(f"unknown worker kind {kind!r}; known kinds: {', '.join(known)} (extractors from "
                        "plugins are known once their module is loaded, see ESSP_EXTRACTOR_MODULES)")
    # Kubernetes names take no '_' (flow_bi -> essp-extract-flow-bi)
    return WORKER_DEPLOYMENTS.get(kind, f"essp-extract-{kind.replace('_', '-')}")


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def trainer_name(run: str, stream: str) -> str:
    """``essp-trainer-<run>-<stream>`` as a DNS-1123 label (<= 63 chars, lower case, '-' for '_').

    When that is too long the run part is cut and a short hash of (run, stream) is appended, so the
    name stays stable, distinct and still shows the stream.
    """
    def clean(text: str) -> str:
        return re.sub(r"[^a-z0-9-]", "-", text.lower()).strip("-")

    name = clean(f"essp-trainer-{run}-{stream}")
    if len(name) > 63:
        tail = f"-{clean(stream)}-{_short_hash(f'{run}/{stream}')}"
        name = f"{clean(f'essp-trainer-{run}')[:63 - len(tail)].rstrip('-')}{tail}"
    return name


def label_value(value: str) -> str:
    """``value`` as a valid label value: at most 63 characters, no non-alphanumeric ends."""
    value = re.sub(r"[^A-Za-z0-9._-]", "-", value)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


# --------------------------------------------------------------------------------------------------
# The trainer clone


def _container(pod_spec: dict[str, Any], owner: str) -> dict[str, Any]:
    containers = pod_spec.get("containers") or []
    if not containers:
        raise EsspError(f"Deployment {owner} has no containers in spec.template.spec.containers")
    for container in containers:
        if container.get("name") == TRAINER_CONTAINER:
            return container
    return containers[0]


def trainer_deployment(template: dict[str, Any], *, run: str, stream: str, nproc: int = 1,
                       gpus: bool = True) -> dict[str, Any]:
    """The trainer Deployment of (run, stream), cloned from the template Deployment ``template``.

    ``template`` is a Deployment as a dict (from YAML or the API, camelCase keys); it is not changed.
    The clone has its own name, 1 replica, the labels ``essp/run`` and ``essp/stream`` (also in its
    selector, so clones never share pods), the container args of ``essp worker train`` and
    ``nvidia.com/gpu: nproc`` (with ``gpus=False``: no GPU limit, toleration or GPU node selector).
    """
    if not isinstance(template, dict) or template.get("kind") != "Deployment":
        raise EsspError(f"the trainer template must be a Deployment dict, got {type(template).__name__} "
                        f"of kind {template.get('kind') if isinstance(template, dict) else None!r}")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise EsspError(f"nproc={nproc!r}: a trainer needs an integer >= 1 of processes")
    from essp.contract import STREAM_PATTERN, check_run_id

    try:
        check_run_id(run)
    except (ValueError, TypeError) as exc:
        raise EsspError(str(exc)) from None
    if not isinstance(stream, str) or not STREAM_PATTERN.match(stream):
        raise EsspError(f"stream {stream!r} is not a stream name (1-32 lower-case letters, digits or '_', "
                        "starting with a letter)")
    source = template.get("metadata", {}).get("name", "?")
    body = copy.deepcopy(template)
    body.pop("status", None)
    name = trainer_name(run, stream)
    meta = body.setdefault("metadata", {})
    for key in _SERVER_METADATA:
        meta.pop(key, None)
    meta["name"] = name
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                   if not k.startswith(_SERVER_ANNOTATION_PREFIXES) and k != "essp/role"}
    annotations.update({ANNOTATION_RUN: run, ANNOTATION_STREAM: stream, "essp/template": source})
    meta["annotations"] = annotations
    labels = {LABEL_INSTANCE: name, LABEL_RUN: label_value(run), LABEL_STREAM: label_value(stream)}
    meta["labels"] = {**(meta.get("labels") or {}), **labels}

    spec = body.setdefault("spec", {})
    spec["replicas"] = 1
    selector = spec.setdefault("selector", {})
    selector["matchLabels"] = {**(selector.get("matchLabels") or {}), **labels}
    pod_meta = spec.setdefault("template", {}).setdefault("metadata", {})
    pod_meta.pop("creationTimestamp", None)
    pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **labels}
    pod_spec = spec["template"].setdefault("spec", {})

    container = _container(pod_spec, source)
    container["args"] = ["worker", "train", "--run", run, "--stream", stream, "--nproc", str(nproc)]
    resources = container.setdefault("resources", {})
    limits = resources.setdefault("limits", {})
    requests = resources.get("requests") or {}
    if gpus:
        limits[GPU_RESOURCE] = str(nproc)
        if GPU_RESOURCE in requests:  # an extended resource's request must equal its limit
            requests[GPU_RESOURCE] = str(nproc)
    else:
        limits.pop(GPU_RESOURCE, None)
        requests.pop(GPU_RESOURCE, None)
        tolerations = [t for t in pod_spec.get("tolerations") or [] if t.get("key") != GPU_RESOURCE]
        if tolerations:
            pod_spec["tolerations"] = tolerations
        else:
            pod_spec.pop("tolerations", None)
        selectors = {k: v for k, v in (pod_spec.get("nodeSelector") or {}).items() if not k.startswith("nvidia.com/")}
        if selectors:
            pod_spec["nodeSelector"] = selectors
        else:
            pod_spec.pop("nodeSelector", None)
    return body


def _patch_body(body: dict[str, Any]) -> dict[str, Any]:
    """A strategic-merge patch that makes an existing clone equal ``body`` where it matters: maps are
    merged, so GPU keys the body lacks are deleted explicitly (null), and the tolerations list is sent
    whole (it is replaced)."""
    patch = copy.deepcopy(body)
    pod_spec = patch["spec"]["template"]["spec"]
    container = _container(pod_spec, patch["metadata"]["name"])
    resources = container.setdefault("resources", {})
    for part in ("limits", "requests"):
        values = resources.setdefault(part, {})
        values.setdefault(GPU_RESOURCE, None)
    pod_spec.setdefault("tolerations", [])
    selectors = pod_spec.setdefault("nodeSelector", {})
    selectors.setdefault("nvidia.com/gpu.present", None)
    return patch


# --------------------------------------------------------------------------------------------------
# The cluster side


def _to_dict(model: Any) -> Any:
    from kubernetes.client import ApiClient

    return model if isinstance(model, dict) else ApiClient().sanitize_for_serialization(model)


def _status(exc: Exception) -> int | None:
    return getattr(exc, "status", None)


def _kube_config() -> None:
    """The in-cluster config (a pod with a service account), else the kubeconfig (KUBECONFIG)."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as exc:
            raise EsspError("no Kubernetes configuration: not in a pod with a service account, and no "
                            f"usable kubeconfig ({exc})") from exc


def _core_api(core_api: Any = None) -> Any:
    if core_api is None:
        from kubernetes import client

        _kube_config()
        core_api = client.CoreV1Api()
    return core_api


# A container waiting for one of these will not start by waiting alone (a missing image under
# imagePullPolicy Never, a bad name, a missing Secret key, a crash loop).
WAITING_BLOCKERS = frozenset({"ErrImageNeverPull", "ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                              "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
                              "CrashLoopBackOff"})


def pod_blocker(pod: dict[str, Any]) -> str | None:
    """Why ``pod`` (as the API returns it, a dict) does not run, in the API's words: the scheduler's reason
    (e.g. "0/1 nodes are available: 1 Insufficient cpu.") or its container's waiting reason; else None."""
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return None
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            reason, message = condition.get("reason") or "no reason", (condition.get("message") or "").strip()
            return f"not scheduled ({reason}): {message}" if message else f"not scheduled ({reason})"
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in WAITING_BLOCKERS:
            message = (waiting.get("message") or "").strip()
            head = f"container {container.get('name')} waiting ({waiting['reason']})"
            return f"{head}: {message}" if message else head
    return None


def trainer_blockers(namespace: str, run: str, streams: list[str], core_api: Any = None) -> dict[str, str]:
    """The streams of ``run`` whose trainer pods do not run, each with "pod NAME: why" (:func:`pod_blocker`)
    for those pods; a stream with one running pod is left out."""
    from kubernetes.client.exceptions import ApiException

    core_api = _core_api(core_api)
    selector = f"{LABEL_RUN}={label_value(run)}"
    try:
        pods = _to_dict(core_api.list_namespaced_pod(namespace, label_selector=selector)).get("items") or []
    except ApiException as exc:
        raise EsspError(f"list the trainer pods ({selector}) in namespace {namespace}: the Kubernetes API "
                        f"answered {_status(exc)} {getattr(exc, 'reason', '')}") from None
    by_label = {label_value(stream): stream for stream in streams}
    why: dict[str, list[str]] = {}
    running: set[str] = set()
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        stream = by_label.get(((pod["metadata"].get("labels") or {}).get(LABEL_STREAM)) or "")
        if stream is None or pod["metadata"].get("deletionTimestamp"):
            continue
        blocker = pod_blocker(pod)
        if blocker is None:
            running.add(stream)
        else:
            why.setdefault(stream, []).append(f"pod {pod['metadata']['name']}: {blocker}")
    return {stream: "; ".join(lines) for stream, lines in why.items() if stream not in running}


def pod_records(namespace: str, run: str, tail_lines: int, core_api: Any = None) -> list[dict[str, Any]]:
    """The run's trainer pods and the data-worker pods of ``namespace``, each with the last ``tail_lines``
    of its log read through the API (``pods/log``, which the Role of k8s/ grants): name, role, phase,
    ready, node, restarts, why (:func:`pod_blocker`), tail."""
    from kubernetes.client.exceptions import ApiException

    core_api = _core_api(core_api)
    selectors = (("trainer", f"{LABEL_RUN}={label_value(run)}"),
                 ("data worker", "app.kubernetes.io/component=data-worker"))
    out = []
    for role, selector in selectors:
        try:
            found = _to_dict(core_api.list_namespaced_pod(namespace, label_selector=selector))
        except ApiException as exc:
            raise EsspError(f"list the pods of {role}s ({selector}) in namespace {namespace}: the Kubernetes API "
                            f"answered {_status(exc)} {getattr(exc, 'reason', '')}") from None
        for pod in sorted(found.get("items") or [], key=lambda p: p["metadata"]["name"]):
            name = pod["metadata"]["name"]
            status = pod.get("status") or {}
            containers = status.get("containerStatuses") or []
            try:
                tail = core_api.read_namespaced_pod_log(name, namespace, tail_lines=tail_lines) or "(empty log)"
            except ApiException as exc:
                tail = f"(no log: {_status(exc)} {getattr(exc, 'reason', '')})"
            out.append({"name": name, "role": role, "phase": status.get("phase"),
                        "ready": bool(containers) and all(c.get("ready") for c in containers),
                        "restarts": sum(int(c.get("restartCount") or 0) for c in containers),
                        "node": (pod.get("spec") or {}).get("nodeName"), "why": pod_blocker(pod), "tail": tail})
    return out


class KubeWorkers:
    """Scale the worker Deployments of one namespace and manage the per-run trainer clones.

    :param namespace: the namespace the manifests of ``k8s/`` were applied to.
    :param apps_api: an ``AppsV1Api``; None loads the in-cluster config (or else the kubeconfig).
    """

    def __init__(self, namespace: str, apps_api: Any = None) -> None:
        self.namespace = namespace
        if apps_api is None:
            from kubernetes import client

            _kube_config()
            apps_api = client.AppsV1Api()
        self.api = apps_api

    def _fail(self, exc: Exception, action: str, name: str) -> EsspError:
        status = _status(exc)
        if status == 404:
            return EsspError(f"{action}: Deployment {name} does not exist in namespace {self.namespace}; apply "
                             "the manifests of k8s/ first (kubectl apply -k k8s/overlays/<overlay>)")
        if status in (401, 403):
            return EsspError(f"{action}: the Kubernetes API refused ({status}) for Deployment {name} in "
                             f"namespace {self.namespace}; the service account needs the Role of "
                             "k8s/base/rbac.yaml (deployments, deployments/scale)")
        reason = getattr(exc, "reason", None) or exc
        return EsspError(f"{action}: Kubernetes API error on Deployment {name} in namespace "
                         f"{self.namespace}: {status} {reason}")

    def _name(self, kind_or_name: str) -> str:
        if kind_or_name in worker_kinds():
            return deployment_name(kind_or_name)
        if kind_or_name == TRAINER_TEMPLATE or kind_or_name.startswith("essp-"):
            return kind_or_name
        return deployment_name(kind_or_name)  # raises, naming the kinds

    def scale(self, kind: str, replicas: int) -> dict[str, Any]:
        """Set the replicas of worker ``kind``'s Deployment; returns deployment, replicas, previous."""
        from kubernetes.client.exceptions import ApiException

        name = deployment_name(kind)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise EsspError(f"replicas={replicas!r} for {name}: an integer >= 0")
        try:
            current = _to_dict(self.api.read_namespaced_deployment_scale(name, self.namespace))
            self.api.patch_namespaced_deployment_scale(name, self.namespace, {"spec": {"replicas": replicas}})
        except ApiException as exc:
            raise self._fail(exc, f"scale {kind} to {replicas}", name) from None
        previous = (current.get("spec") or {}).get("replicas") or 0
        return {"deployment": name, "replicas": replicas, "previous": previous}

    def ensure_trainer(self, run: str, stream: str, nproc: int = 1, gpus: bool = True) -> dict[str, Any]:
        """Create (or update) the trainer Deployment of (run, stream) from the template; idempotent.

        Returns ``{"deployment", "created", "nproc", "gpus"}``.
        """
        from kubernetes.client.exceptions import ApiException

        try:
            template = _to_dict(self.api.read_namespaced_deployment(TRAINER_TEMPLATE, self.namespace))
        except ApiException as exc:
            raise self._fail(exc, f"read the trainer template for {run}/{stream}", TRAINER_TEMPLATE) from None
        body = trainer_deployment(template, run=run, stream=stream, nproc=nproc, gpus=gpus)
        name = body["metadata"]["name"]
        action = f"ensure the trainer of {run}/{stream}"
        try:
            self.api.create_namespaced_deployment(self.namespace, body)
            created = True
        except ApiException as exc:
            if _status(exc) != 409:
                raise self._fail(exc, action, name) from None
            created = False
        if not created:
            try:
                existing = _to_dict(self.api.read_namespaced_deployment(name, self.namespace))
                annotations = (existing.get("metadata") or {}).get("annotations") or {}
                owner = (annotations.get(ANNOTATION_RUN), annotations.get(ANNOTATION_STREAM))
                if owner != (run, stream):
                    raise EsspError(f"{action}: Deployment {name} already exists for run {owner[0]!r}, stream "
                                    f"{owner[1]!r} (their names coincide); delete it or choose another run id")
                self.api.patch_namespaced_deployment(name, self.namespace, _patch_body(body))
            except ApiException as exc:
                raise self._fail(exc, action, name) from None
        return {"deployment": name, "created": created, "nproc": nproc, "gpus": gpus}

    def delete_trainer(self, run: str, stream: str) -> bool:
        """Delete the trainer Deployment of (run, stream) and its pods; False if there was none."""
        from kubernetes.client.exceptions import ApiException

        name = trainer_name(run, stream)
        try:
            self.api.delete_namespaced_deployment(name, self.namespace, propagation_policy="Foreground")
        except ApiException as exc:
            if _status(exc) == 404:
                return False
            raise self._fail(exc, f"delete the trainer of {run}/{stream}", name) from None
        return True

    def ready(self, kind_or_deployment_name: str) -> tuple[int, int]:
        """(ready replicas, wanted replicas) of a worker kind's or a named Deployment."""
        from kubernetes.client.exceptions import ApiException

        name = self._name(kind_or_deployment_name)
        try:
            deployment = _to_dict(self.api.read_namespaced_deployment(name, self.namespace))
        except ApiException as exc:
            raise self._fail(exc, f"read {kind_or_deployment_name}", name) from None
        ready = (deployment.get("status") or {}).get("readyReplicas") or 0
        wanted = (deployment.get("spec") or {}).get("replicas")
        return int(ready), int(1 if wanted is None else wanted)
