"""One operator, two modes: run `essp stage NAME` as a Kubernetes pod or as a local process.

The mode is the setting ``ESSP_STAGE_MODE`` (``local`` by default, ``kubernetes`` in production),
read when the task runs; a DAG never changes between the two. Either way the stage gets its
service settings from Airflow's ``essp_*`` connections (in Kubernetes, credentials come from the
Secret ``ESSP_K8S_SECRET`` instead) and returns small JSON, which becomes the task's XCom (a pod writes it to
S3 and the operator reads it from there: no XCom sidecar, no exec into the pod).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from airflow.exceptions import AirflowException
from airflow.providers.cncf.kubernetes.backcompat.backwards_compat_converters import (
    convert_env_vars_or_raise_error,
)
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s

from essp.operators.hooks import EsspHook
from essp.operators.links import WorkerLogsLink
from essp.operators.refusal import StageRefused, refuse
from essp.orchestration.stages import RESULT_FILE_ENV, kubernetes_result_uri, stage_name
from essp.settings import Settings, worker_environ
from essp.stack.services import venv_binary

OUTPUT_TAIL_LINES = 40
# The stage param naming the task's DAG run (essp.orchestration.links.DagRun), templated: what a stage records
# for the DAG run's "ESSP report" tab.
DAG_RUN = {"dag_id": "{{ dag.dag_id }}", "dag_run_id": "{{ run_id }}"}
LOGGING_INTERVAL_S = 120
TERMINATION_GRACE_S = 60
# Stages that call the Kubernetes API (essp.deploy.kube: scale the workers, clone and delete trainers): only
# their pods get the service account's token.
POD_NAME_ENV = "ESSP_POD_NAME"
KUBE_API_STAGES = frozenset({"ensure-workers", "release-trainers", "release-workers"})


def _quantity(text: str) -> float:
    """A Kubernetes quantity (``500m``, ``2``, ``1Gi``, ``512Mi``) as a number, to compare two of one kind."""
    from kubernetes.utils.quantity import parse_quantity

    return float(parse_quantity(text))


def _capped(request: str, cap: str) -> str:
    return cap if cap and _quantity(cap) < _quantity(request) else request


def pull_upstream(context: Any, task: Any, sources: Mapping[str, tuple[str, str | None]]) -> dict[str, Any]:
    """``{name: value}`` read, when ``task`` runs, from the results of tasks upstream of it: ``sources`` maps
    each name to ``(task_id, key)``, ``key`` an item of that task's result dict, or None for all of it.

    A task of an ESSP DAG takes XComArgs only from the task right before it, so that the edge the graph draws
    is the dependency; a value from further up (the run id of the plan, read by every task) is read this way,
    or every task would have an edge from the plan task (issue 13: ten edges out of validate_params)."""
    ti = context["ti"]
    upstream = task.get_flat_relative_ids(upstream=True)
    results: dict[str, Any] = {}
    out = {}
    for name, (task_id, key) in sources.items():
        if task_id not in upstream:
            raise AirflowException(f"{task.task_id} reads {name!r} from task {task_id}, which is not upstream of it")
        if task_id not in results:
            results[task_id] = ti.xcom_pull(task_ids=task_id)
        result = results[task_id]
        if result is None or (key is not None and key not in result):
            raise AirflowException(f"{task.task_id} reads {name!r} from task {task_id}, whose result has none "
                                   f"(it returned {result!r:.200})")
        out[name] = result if key is None else result[key]
    return out


class EsspStageOperator(KubernetesPodOperator):
    """Run the ESSP stage named after the task (task ``verify_manifest``: stage ``verify-manifest``, the
    function :func:`essp.orchestration.train.verify_manifest`) with ``stage_params`` (templated) and push
    its JSON result.

    :param stage_params: JSON-serialisable params, passed as ``--params-json``; templated.
    :param dag_params: also pass the DAG run's params, as the stage param ``params``.
    :param xcom_params: stage params read, when the task runs, from the results of upstream tasks: ``{param:
        (task_id, key)}`` (see :func:`pull_upstream`); an XComArg in ``stage_params`` is for the task right before.
    :param gpus: GPUs the pod requests (``nvidia.com/gpu``); a GPU stage uses the GPU image.
    :param cpu: CPU request (and limit) of the pod.
    :param memory: memory request (and limit) of the pod.
    :param mode: ``local`` or ``kubernetes``; None (the default) reads ``ESSP_STAGE_MODE`` at run time.
    """

    template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields, "stage_params")
    ui_color = "#d6e9f8"
    operator_extra_links = (WorkerLogsLink(),)

    def __init__(self, *, task_id: str, stage_params: dict[str, Any] | None = None, dag_params: bool = False,
                 xcom_params: Mapping[str, tuple[str, str | None]] | None = None, gpus: int = 0, cpu: str = "1",
                 memory: str = "2Gi", mode: str | None = None, **kwargs: Any) -> None:
        stage = stage_name(task_id)
        settings = Settings()
        gpus = gpus if settings.k8s_trainer_gpus else 0  # a cluster without GPUs (k8s/overlays/local)
        limits = {"cpu": cpu, "memory": memory}
        # A small cluster caps the requests (ESSP_K8S_STAGE_MAX_CPU/MEMORY); the limits stay the stage's.
        requests = {"cpu": _capped(cpu, settings.k8s_stage_max_cpu),
                    "memory": _capped(memory, settings.k8s_stage_max_memory)}
        if gpus:
            limits["nvidia.com/gpu"] = str(gpus)
            requests["nvidia.com/gpu"] = str(gpus)
        kwargs.setdefault("name", f"essp-{stage}")
        kwargs.setdefault("namespace", settings.k8s_namespace)
        kwargs.setdefault("image", settings.image_worker_gpu if gpus else settings.image_worker_cpu)
        kwargs.setdefault("cmds", ["essp"])
        kwargs.setdefault("container_resources", k8s.V1ResourceRequirements(
            requests=requests, limits=limits))
        kwargs.setdefault("env_from", [
            k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name="essp-settings", optional=True)),
            k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=settings.k8s_secret))])
        kwargs.setdefault("service_account_name", settings.k8s_service_account)
        # Hardened as the worker pods of k8s/: non-root, no privilege escalation, no capabilities, a read-only
        # root (a /tmp emptyDir for caches), seccomp RuntimeDefault, and no API token unless the stage scales
        # the workers through the Kubernetes API.
        kwargs.setdefault("automount_service_account_token", stage in KUBE_API_STAGES)
        kwargs.setdefault("security_context", k8s.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=10001, run_as_group=10001, fs_group=10001,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")))
        kwargs.setdefault("container_security_context", k8s.V1SecurityContext(
            allow_privilege_escalation=False, read_only_root_filesystem=True,
            capabilities=k8s.V1Capabilities(drop=["ALL"])))
        kwargs.setdefault("volumes", [k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="1Gi"))])
        kwargs.setdefault("volume_mounts", [k8s.V1VolumeMount(name="tmp", mount_path="/tmp")])
        kwargs.setdefault("labels", {"app.kubernetes.io/part-of": "essp", "essp/stage": stage})
        kwargs.setdefault("hostnetwork", settings.k8s_host_network)
        if gpus:
            kwargs.setdefault("tolerations", [k8s.V1Toleration(
                key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")])
            kwargs.setdefault("node_selector", {"nvidia.com/gpu.present": "true"})
        # In Kubernetes mode the wait for the pod happens in the triggerer, not in a worker slot (after a short
        # wait in the worker: see invoke_defer_method); its log reaches the task log every LOGGING_INTERVAL_S.
        kwargs.setdefault("deferrable", True)
        kwargs.setdefault("logging_interval", LOGGING_INTERVAL_S)
        # A retry (or a worker lost mid-wait) finds the try's pod again by its persisted identity instead of
        # starting a second one; a killed task (cleared, marked failed, timed out) deletes its pod, which gets
        # TERMINATION_GRACE_S to stop (a stage writes its result once, at the end).
        kwargs.setdefault("durable", True)
        kwargs.setdefault("on_kill_action", "delete_pod")
        kwargs.setdefault("termination_grace_period", TERMINATION_GRACE_S)
        kwargs.setdefault("on_finish_action", "delete_pod")
        kwargs.setdefault("do_xcom_push", True)
        kwargs.setdefault("get_logs", True)
        super().__init__(task_id=task_id, **kwargs)
        self.stage = stage
        self.stage_params = stage_params or {}
        self.dag_params = dag_params
        self.xcom_params = dict(xcom_params or {})
        self._refused: str | None = None  # what a refused stage's pod wrote (extract_xcom)
        self.gpus = gpus
        self.mode = mode

    def _arguments(self) -> list[str]:
        return ["stage", self.stage, "--params-json", json.dumps(self.stage_params, sort_keys=True)]

    def resolved_mode(self) -> str:
        mode = self.mode or Settings().stage_mode
        if mode not in ("local", "kubernetes"):
            raise AirflowException(f"ESSP_STAGE_MODE={mode!r}: expected 'local' or 'kubernetes'")
        return mode

    def build_pod_request_obj(self, context: Any = None, *, dry_run: bool = False) -> k8s.V1Pod:
        self.arguments = self._arguments()
        settings = Settings()
        # Addresses (not credentials: those come from the Secret) from the connections when running.
        addresses = {} if dry_run else EsspHook().env(include_secrets=False)
        env = {"ESSP_STAGE_MODE": "kubernetes", "HOME": "/tmp", "ESSP_K8S_NAMESPACE": settings.k8s_namespace,
               RESULT_FILE_ENV: kubernetes_result_uri(settings.with_env(addresses), f"$({POD_NAME_ENV})"),
               **addresses}
        if settings.k8s_api_server and self.stage in KUBE_API_STAGES:
            # No kube-proxy (or a host-network pod): the API server's own address, not the kubernetes Service.
            host, _, port = settings.k8s_api_server.rpartition(":")
            env.update(KUBERNETES_SERVICE_HOST=host.strip("[]"), KUBERNETES_SERVICE_PORT=port)
        # A user's env_vars (a dict or V1EnvVar list) win over ours.
        own = convert_env_vars_or_raise_error(self.env_vars) if self.env_vars else []
        existing = {e.name for e in own}
        pod_name = k8s.V1EnvVar(name=POD_NAME_ENV, value_from=k8s.V1EnvVarSource(
            field_ref=k8s.V1ObjectFieldSelector(field_path="metadata.name")))  # before the result's $(...)
        self.env_vars = [*own, pod_name,
                         *(k8s.V1EnvVar(name=k, value=v) for k, v in sorted(env.items()) if k not in existing)]
        # The result comes back through S3 (extract_xcom), not through an XCom sidecar read by exec.
        push, self.do_xcom_push = self.do_xcom_push, False
        try:
            return super().build_pod_request_obj(context, dry_run=dry_run)
        finally:
            self.do_xcom_push = push

    def invoke_defer_method(self, last_log_time: Any = None, context: Any = None) -> None:
        """Watch a new pod from the worker for up to ``ESSP_K8S_STAGE_WAIT_S`` before deferring: a pod done by
        then finishes here, with no deferral (the provider skips it for a finished pod).

        Airflow 3.3.2's scheduler fails a deferred task whose trigger fires before the scheduler has seen the
        worker exit that deferred it ("finished with state success, but the task instance's state attribute
        is queued": apache/airflow#67287, #72716), which a stage pod done in a few seconds hits often. A pod
        still running after the wait defers, and its trigger fires long after that exit was seen."""
        wait_s = Settings().k8s_stage_wait_s
        if last_log_time is None and self.pod is not None and context is not None:
            deadline = time.monotonic() + wait_s
            while True:
                pod = self.pod_manager.read_pod(self.pod)
                phase = pod.status.phase if pod.status is not None else None
                if phase in ("Succeeded", "Failed"):
                    # Done: finish as the trigger's event would, and keep the result (the provider's own
                    # no-deferral path drops what trigger_reentry returns, so the task would push no XCom).
                    self.pod = pod
                    self._result_in_worker = self.trigger_reentry(context=context, event={
                        "status": "success" if phase == "Succeeded" else "failed",
                        "namespace": pod.metadata.namespace, "name": pod.metadata.name,
                        "message": f"pod {phase.lower()} within {wait_s:.0f} s", "last_log_time": None})
                    return
                if time.monotonic() >= deadline:
                    break
                time.sleep(1.0)
        super().invoke_defer_method(last_log_time=last_log_time, context=context)

    def extract_xcom(self, pod: k8s.V1Pod, **_kwargs: Any) -> dict[str, Any] | None:
        """The stage's result, which its pod wrote to S3 (:func:`kubernetes_result_uri`), removed once read."""
        from airflow.providers.cncf.kubernetes.utils.container import container_is_succeeded

        from essp.clients.s3 import ObjectNotFound, ObjectStore, S3Uri

        settings = EsspHook().settings()
        uri = S3Uri.parse(kubernetes_result_uri(settings, pod.metadata.name))
        store = ObjectStore(settings)
        try:
            result = store.get_json(uri.bucket, uri.key)
        except ObjectNotFound:
            if pod.status is not None and container_is_succeeded(pod, self.base_container_name):
                raise AirflowException(f"stage {self.stage} exited 0 but wrote no result to {uri}") from None
            return None  # a failed pod: its error is the task's
        store.delete(uri.bucket, uri.key)
        if isinstance(result, dict) and "refused" in result and not (
                pod.status is not None and container_is_succeeded(pod, self.base_container_name)):
            self._refused = str(result["refused"])  # trigger_reentry fails the task with it
            return None
        return result

    def trigger_reentry(self, context: Any, event: dict[str, Any]) -> Any:
        """The provider's, except that a pod whose stage refused its params fails the task with its one line."""
        self._refused = None
        try:
            return super().trigger_reentry(context, event)
        except AirflowException:
            if self._refused is not None:
                refuse(context, self._refused)
            raise

    def execute(self, context: Any) -> Any:
        if self.xcom_params:
            self.stage_params = {**self.stage_params, **pull_upstream(context, self, self.xcom_params)}
        if self.dag_params:
            self.stage_params = {**self.stage_params, "params": dict(context["params"])}
        if self.resolved_mode() == "kubernetes":
            if not self.deferrable:  # the synchronous path waits for an XCom sidecar, which these pods lack
                raise AirflowException(f"{self.task_id}: EsspStageOperator runs its pod deferrable in Kubernetes "
                                       "mode (deferrable=False is not supported)")
            self._result_in_worker = None
            result = super().execute(context)  # raises TaskDeferred unless the pod finished in the worker
            return result if result is not None else self._result_in_worker
        try:
            return self.execute_local()
        except StageRefused as exc:
            refuse(context, exc.line)

    def execute_local(self) -> dict[str, Any]:
        """Run the same command as a local process, its output streamed into the task log."""
        argv = [venv_binary("essp"), *self._arguments()]
        with tempfile.TemporaryDirectory(prefix="essp-stage-") as tmp:
            result_file = Path(tmp) / "result.json"
            # Not Airflow's own credentials and configuration (database URL, JWT secret): a stage needs none.
            env = {**worker_environ(os.environ), **EsspHook().env(include_secrets=True), "ESSP_STAGE_MODE": "local",
                   RESULT_FILE_ENV: str(result_file), "PYTHONUNBUFFERED": "1"}
            self.log.info("Running stage %s locally: %s", self.stage, " ".join(argv))
            tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            assert proc.stdout is not None
            for line in proc.stdout:
                self.log.info("%s", line.rstrip())
                tail.append(line.rstrip())
            code = proc.wait()
            if code != 0:
                refused = json.loads(result_file.read_text()).get("refused") if result_file.exists() else None
                if refused:  # a UserError: its line is the whole story (essp.operators.refusal)
                    raise StageRefused(self.stage, refused)
                raise AirflowException(f"stage {self.stage} exited with code {code}:\n" + "\n".join(tail))
            if not result_file.exists():
                raise AirflowException(f"stage {self.stage} exited 0 but wrote no result")
            return json.loads(result_file.read_text())
