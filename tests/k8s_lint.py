"""A manifest linter for the tests: a Kubernetes object (a dict, as in ``k8s/`` or as sent to the API)
checked against the Kubernetes client's models, the way the API server would reject or drop it.

Test-only: the library (``essp.deploy.kube``) builds and sends manifests, it does not lint them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from essp.errors import EsspError

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# The API server's quantity grammar (parse_quantity alone also takes "1 Gi" or "-1").
_QUANTITY = re.compile(r"^\+?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+|[KMGTPE]i|[numkMGTPE])?$")

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


def hardening_problems(pod_spec: dict[str, Any], *, api_token: bool = False) -> list[str]:
    """What a pod spec (the API's JSON form) lacks of ESSP's hardening: runAsNonRoot, seccomp RuntimeDefault,
    no service-account token unless ``api_token`` (the pod talks to the Kubernetes API), and in every container
    no privilege escalation, every capability dropped and a read-only root filesystem."""
    problems: list[str] = []
    pod_sc = pod_spec.get("securityContext") or {}
    if pod_sc.get("runAsNonRoot") is not True:
        problems.append("securityContext.runAsNonRoot must be true")
    if (pod_sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append("securityContext.seccompProfile.type must be RuntimeDefault")
    if not api_token and pod_spec.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken must be false (the pod does not talk to the API)")
    for field in ("initContainers", "containers"):
        for container in pod_spec.get(field) or []:
            sc = container.get("securityContext") or {}
            at = f"{field}[{container.get('name')}].securityContext"
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}.allowPrivilegeEscalation must be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}.readOnlyRootFilesystem must be true")
            if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
                problems.append(f"{at}.capabilities.drop must be [ALL]")
            if sc.get("privileged"):
                problems.append(f"{at}.privileged must not be set")
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
