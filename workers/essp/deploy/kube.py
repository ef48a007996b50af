"""The resident workers in Kubernetes: scale their Deployments, clone the trainer template per run.

The manifests live in ``k8s/`` (a kustomize base and overlays). The data workers are one Deployment
per kind (``essp-decode``, ``essp-extract-<kind>``) that this module only scales; the trainer is a
template Deployment ``essp-trainer`` (``replicas: 0``) that :meth:`KubeWorkers.ensure_trainer`
clones into one Deployment per (run, stream). No Airflow here: the "ensure workers" step calls it.
"""

from __future__ import annotations

import copy
import hashlib
import json
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

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# The API server's quantity grammar (parse_quantity alone also takes "1 Gi" or "-1").
_QUANTITY = re.compile(r"^\+?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+|[KMGTPE]i|[numkMGTPE])?$")
# Metadata the API server (or a controller) writes; a clone must not carry the template's.
_SERVER_METADATA = ("uid", "resourceVersion", "creationTimestamp", "managedFields", "generation", "selfLink",
                    "ownerReferences", "deletionTimestamp", "deletionGracePeriodSeconds")
_SERVER_ANNOTATION_PREFIXES = ("deployment.kubernetes.io/", "kubectl.kubernetes.io/last-applied-configuration")

# Kinds whose apiVersion is fixed; anything else is looked up by its version in the client's models.
API_VERSIONS = {
    "Namespace": "v1", "ConfigMap": "v1", "Secret": "v1", "ServiceAccount": "v1", "Service": "v1", "Pod": "v1",
    "PersistentVolumeClaim": "v1", "Deployment": "apps/v1", "StatefulSet": "apps/v1", "DaemonSet": "apps/v1",
    "ReplicaSet": "apps/v1", "Job": "batch/v1", "CronJob": "batch/v1", "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1", "ClusterRole": "rbac.authorization.k8s.io/v1",
    "ClusterRoleBinding": "rbac.authorization.k8s.io/v1", "PodDisruptionBudget": "policy/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2", "NetworkPolicy": "networking.k8s.io/v1",
}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                   "CustomResourceDefinition", "PriorityClass"}


def is_namespaced(kind: str) -> bool:
    """Whether objects of ``kind`` live in a namespace (the built-in kinds ESSP uses)."""
    return kind not in _CLUSTER_SCOPED


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
    return WORKER_DEPLOYMENTS.get(kind, f"essp-extract-{kind}")


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
# Validation against the Kubernetes client's models


class _Response:
    """What ApiClient.deserialize reads: a body in ``data``."""

    def __init__(self, obj: dict[str, Any]) -> None:
        self.data = json.dumps(obj, default=str)


def _describe(obj: Any) -> str:
    if not isinstance(obj, dict):
        return f"object {obj!r:.60}"
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    where = f" in namespace {meta['namespace']}" if meta.get("namespace") else ""
    return f"{obj.get('kind', '?')} {meta.get('name', '?')!s}{where}"


def _unknown_keys(given: Any, known: Any, path: str) -> list[tuple[str, str | None]]:
    """Keys of ``given`` missing from ``known`` (the model's round trip) as (path, None), and mappings or
    lists where the model has a scalar as (path, the type given)."""
    found: list[tuple[str, str | None]] = []
    if isinstance(given, dict) and isinstance(known, dict):
        for key, value in given.items():
            if value is None:
                continue
            if key not in known:
                found.append((f"{path}.{key}" if path else str(key), None))
            else:
                found.extend(_unknown_keys(value, known[key], f"{path}.{key}" if path else str(key)))
    elif isinstance(given, list) and isinstance(known, list):
        for i, (a, b) in enumerate(zip(given, known, strict=False)):
            found.extend(_unknown_keys(a, b, f"{path}[{i}]"))
    elif isinstance(given, (dict, list)) and type(known) is not type(given):
        found.append((path, type(given).__name__))
    return found


def _locate(client: Any, data: Any, type_name: str, path: str) -> str | None:
    """Where ``data`` fails to deserialise as ``type_name`` (the innermost part), as a message."""
    import kubernetes.client

    listed = re.match(r"^list\[(.+)\]$", type_name)
    mapped = re.match(r"^dict\(([^,]+), (.+)\)$", type_name)
    if listed and isinstance(data, list):
        items: list[tuple[str, Any]] = [(f"{path}[{i}]", item) for i, item in enumerate(data)]
        return next((f for p, item in items if (f := _locate(client, item, listed.group(1), p))), None)
    if mapped and isinstance(data, dict):
        items = [(f"{path}.{k}", v) for k, v in data.items()]
        return next((f for p, v in items if (f := _locate(client, v, mapped.group(2), p))), None)
    klass = getattr(kubernetes.client, type_name, None)
    if klass is not None and isinstance(data, dict):
        for attr, sub_type in klass.openapi_types.items():
            key = klass.attribute_map[attr]
            if data.get(key) is not None:
                found = _locate(client, data[key], sub_type, f"{path}.{key}" if path else key)
                if found:
                    return found
    try:
        client.deserialize(_Response(data), type_name)
    except (ValueError, TypeError, AttributeError) as exc:
        missing = re.match(r"Invalid value for `(\w+)`, must not be `None`", str(exc))
        if missing and klass is not None:
            field = klass.attribute_map.get(missing.group(1), missing.group(1))
            return f"{path + '.' if path else ''}{field} is required"
        return f"{path or 'the object'}: {exc}"
    return None


def _pod_specs(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = obj.get("spec") or {}
    kind = obj.get("kind")
    if kind == "Pod":
        return [("spec", spec)]
    if kind == "CronJob":
        return [("spec.jobTemplate.spec.template.spec",
                 ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template", {}).get("spec") or {})]
    template = spec.get("template")
    if isinstance(template, dict) and isinstance(template.get("spec"), dict):
        return [("spec.template.spec", template["spec"])]
    return []


def _check_pod_specs(obj: dict[str, Any]) -> list[str]:
    from kubernetes.utils import parse_quantity

    problems: list[str] = []
    for where, pod_spec in _pod_specs(obj):
        if not pod_spec.get("containers"):
            problems.append(f"{where}.containers: a pod needs at least one container")
        for field in ("initContainers", "containers"):
            for container in pod_spec.get(field) or []:
                resources = container.get("resources") or {}
                parsed: dict[str, dict[str, Any]] = {}
                for part in ("requests", "limits"):
                    for resource, quantity in (resources.get(part) or {}).items():
                        at = f"{where}.{field}[{container.get('name')}].resources.{part}.{resource}"
                        try:
                            if not _QUANTITY.match(str(quantity)):
                                raise ValueError("expected a non-negative number with an optional suffix "
                                                 "such as m, Mi, Gi")
                            parsed.setdefault(part, {})[resource] = parse_quantity(quantity)
                        except (ValueError, TypeError) as exc:
                            problems.append(f"{at}={quantity!r} is not a quantity ({exc})")
                requests, limits = parsed.get("requests", {}), parsed.get("limits", {})
                for resource, amount in requests.items():
                    if resource in limits and amount > limits[resource]:
                        problems.append(f"{where}.{field}[{container.get('name')}]: request {resource}="
                                        f"{amount} exceeds its limit {limits[resource]}")
                for resource in set(requests) | set(limits):
                    if "/" not in resource or resource.split("/")[0].endswith("kubernetes.io"):
                        continue
                    # Extended resources (nvidia.com/gpu): whole numbers, a limit, request == limit.
                    at = f"{where}.{field}[{container.get('name')}] {resource}"
                    if resource not in limits:
                        problems.append(f"{at}: an extended resource needs a limit")
                    elif resource in requests and requests[resource] != limits[resource]:
                        problems.append(f"{at}: request and limit of an extended resource must be equal")
                    elif limits[resource] != int(limits[resource]):
                        problems.append(f"{at}: an extended resource must be a whole number")
    return problems


def _check_labels(obj: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    maps = [("metadata.labels", (obj.get("metadata") or {}).get("labels"))]
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    if isinstance(spec.get("selector"), dict):
        maps.append(("spec.selector.matchLabels", spec["selector"].get("matchLabels")))
    if isinstance(spec.get("template"), dict):
        maps.append(("spec.template.metadata.labels", (spec["template"].get("metadata") or {}).get("labels")))
    for where, labels in maps:
        for key, value in (labels or {}).items():
            prefix, _, name = str(key).rpartition("/")
            if (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix))) or len(name) > 63 \
                    or not _LABEL_NAME.match(name):
                problems.append(f"{where}: {key!r} is not a valid label key")
            if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
                problems.append(f"{where}: {key}={value!r} is not a valid label value (a string of at most 63 "
                                "letters, digits, '-', '_' or '.', starting and ending with a letter or digit)")
    return problems


def validate_object(obj: dict[str, Any]) -> object:
    """``obj`` (a manifest as a dict) as the Kubernetes client's model of its kind, e.g. V1Deployment.

    Raises EsspError naming the object and the problem: a missing required field, an unknown kind or
    apiVersion, a field the model does not know (a typo the API server would reject or drop), a bad
    name or label, or a container resource that is not a valid quantity.
    """
    import kubernetes.client
    from kubernetes.client import ApiClient

    if not isinstance(obj, dict):
        raise EsspError(f"a Kubernetes object must be a mapping, got {type(obj).__name__}")
    what = _describe(obj)
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str) or not api_version or not kind:
        raise EsspError(f"{what}: apiVersion and kind are required")
    expected = API_VERSIONS.get(kind)
    if expected and api_version != expected:
        raise EsspError(f"{what}: apiVersion {api_version!r} is not served for {kind}; use {expected!r}")
    version = api_version.rpartition("/")[2]
    model_name = f"{version[:1].upper()}{version[1:]}{kind}"
    if not hasattr(kubernetes.client, model_name):
        raise EsspError(f"{what}: unknown kind {kind!r} for apiVersion {api_version!r} "
                        f"(no model {model_name} in the kubernetes client)")
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not (meta.get("name") or meta.get("generateName")):
        raise EsspError(f"{what}: metadata.name is required")
    name = meta.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.match(name)):
        raise EsspError(f"{what}: metadata.name {name!r} is not a DNS-1123 subdomain (lower-case letters, "
                        "digits, '-' and '.', at most 253 characters)")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Service", "Namespace") and isinstance(name, str) \
            and (len(name) > 63 or not _DNS_LABEL.match(name)):
        raise EsspError(f"{what}: metadata.name {name!r} must be a DNS-1123 label (at most 63 characters)")

    client = ApiClient()
    try:
        model = client.deserialize(_Response(obj), model_name)
    except (ValueError, TypeError, AttributeError) as exc:
        where = _locate(client, obj, model_name, "") or str(exc)
        raise EsspError(f"{what}: not a valid {model_name}: {where}") from None
    found = _unknown_keys(obj, client.sanitize_for_serialization(model), "")
    unknown = [at for at, given in found if given is None]
    if unknown:
        raise EsspError(f"{what}: unknown field(s) {', '.join(unknown)} (not in {model_name}; a typo?)")
    if found:
        raise EsspError(f"{what}: " + ", ".join(f"{at} must not be a {given}" for at, given in found))
    problems = _check_labels(obj) + _check_pod_specs(obj)
    if problems:
        raise EsspError(f"{what}: " + "; ".join(problems))
    return model


# --------------------------------------------------------------------------------------------------
# The cluster side


def _to_dict(model: Any) -> Any:
    from kubernetes.client import ApiClient

    return model if isinstance(model, dict) else ApiClient().sanitize_for_serialization(model)


def _status(exc: Exception) -> int | None:
    return getattr(exc, "status", None)


class KubeWorkers:
    """Scale the worker Deployments of one namespace and manage the per-run trainer clones.

    :param namespace: the namespace the manifests of ``k8s/`` were applied to.
    :param apps_api: an ``AppsV1Api``; None loads the in-cluster config (or else the kubeconfig).
    """

    def __init__(self, namespace: str, apps_api: Any = None) -> None:
        self.namespace = namespace
        if apps_api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                try:
                    config.load_kube_config()
                except (config.ConfigException, OSError) as exc:
                    raise EsspError("no Kubernetes configuration: not in a pod with a service account, and no "
                                    f"usable kubeconfig ({exc})") from exc
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
