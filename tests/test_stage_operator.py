"""The stage operator: one command, run as a local process or rendered as a Kubernetes pod."""

from __future__ import annotations

import inspect
import json

import pytest
from airflow.exceptions import AirflowException
from k8s_lint import hardening_problems
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s

from essp.connections import REDIS_CONN_ID, connection_env_vars
from essp.operators.stage import KUBE_API_STAGES, EsspStageOperator
from essp.orchestration.stages import STAGES


def _render(op: EsspStageOperator) -> k8s.V1Pod:
    pod = op.build_pod_request_obj(dry_run=True)
    # Serialise as the API server would receive it, and read it back into the API models.
    api = ApiClient()
    body = api.sanitize_for_serialization(pod)

    class _Response:
        data = json.dumps(body)

    return api.deserialize(_Response(), "V1Pod"), body


def test_cpu_stage_renders_a_valid_pod_spec():
    op = EsspStageOperator(task_id="smoke_s3", stage_params={"token": "x"}, cpu="500m", memory="1Gi")
    pod, body = _render(op)
    assert body["apiVersion"] == "v1" and body["kind"] == "Pod"
    assert pod.metadata.namespace == "essp"
    assert pod.metadata.labels["essp/stage"] == "smoke-s3"
    main = pod.spec.containers[0]
    assert main.image.startswith("ghcr.io/essp-project/essp-worker-cpu:")
    assert main.command == ["essp"]
    assert main.args == ["stage", "smoke-s3", "--params-json", '{"token": "x"}']
    assert main.resources.requests == {"cpu": "500m", "memory": "1Gi"}
    assert "nvidia.com/gpu" not in main.resources.limits
    # addresses from the ConfigMap of k8s/, credentials from the Secret; the pod runs as essp-airflow
    assert main.env_from[0].config_map_ref.name == "essp-settings"
    assert main.env_from[1].secret_ref.name == "essp-credentials"
    assert pod.spec.service_account_name == "essp-airflow"
    assert op.deferrable is True
    env = {e.name: e.value for e in main.env}
    # the result goes to S3 under the pod's own name (the kubelet expands $(ESSP_POD_NAME), defined before it)
    assert env["ESSP_RESULT_FILE"] == "s3://essp-runs/stage-results/$(ESSP_POD_NAME).json"
    names = [e.name for e in main.env]
    assert names.index("ESSP_POD_NAME") < names.index("ESSP_RESULT_FILE")
    assert main.env[names.index("ESSP_POD_NAME")].value_from.field_ref.field_path == "metadata.name"
    assert env["ESSP_STAGE_MODE"] == "kubernetes"
    assert not any("SECRET" in name or "PASSWORD" in name for name in env)
    assert pod.spec.restart_policy == "Never"
    # no XCom sidecar (reading it takes pods/exec): one container
    assert [c.name for c in pod.spec.containers] == ["base"] and op.do_xcom_push


def test_gpu_stage_requests_a_gpu_on_the_gpu_image(monkeypatch):
    monkeypatch.setenv("ESSP_IMAGE_WORKER_GPU", "registry.example/essp-worker-gpu:1.2.3")
    op = EsspStageOperator(task_id="smoke_kafka", gpus=1, cpu="4", memory="16Gi",
                           node_selector={"nvidia.com/gpu.present": "true"},
                           env_vars={"NCCL_DEBUG": "INFO", "ESSP_K8S_NAMESPACE": "gpu-jobs"})
    pod, _ = _render(op)
    main = pod.spec.containers[0]
    env = {e.name: e.value for e in main.env}
    assert env["NCCL_DEBUG"] == "INFO" and env["ESSP_K8S_NAMESPACE"] == "gpu-jobs"  # the user's win
    assert env["ESSP_STAGE_MODE"] == "kubernetes"
    assert main.image == "registry.example/essp-worker-gpu:1.2.3"
    assert main.resources.limits["nvidia.com/gpu"] == "1"
    assert pod.spec.node_selector == {"nvidia.com/gpu.present": "true"}
    assert any(t.key == "nvidia.com/gpu" for t in pod.spec.tolerations)


def test_local_mode_runs_the_same_command_with_settings_from_the_connections(settings, monkeypatch):
    for name, value in connection_env_vars(settings).items():
        monkeypatch.setenv(name, value)
    # The connection, not the process environment, decides where the stage goes.
    monkeypatch.setenv("ESSP_REDIS_PREFIX", "not-this-one")
    op = EsspStageOperator(task_id="smoke_redis", stage_params={"token": "op"}, mode="local")
    result = op.execute({})
    assert result["key"] == f"{settings.redis_prefix}:smoke:op"
    assert result["service"] == "redis" and result["bytes"] > 0


def test_local_mode_failure_raises_with_the_stage_output(settings, monkeypatch, closed_port):
    broken = settings.model_copy(update={"redis_port": closed_port})
    monkeypatch.setenv(f"AIRFLOW_CONN_{REDIS_CONN_ID.upper()}", connection_env_vars(broken)[
        f"AIRFLOW_CONN_{REDIS_CONN_ID.upper()}"])
    op = EsspStageOperator(task_id="smoke_redis", mode="local")
    with pytest.raises(AirflowException, match=f"Redis at 127.0.0.1:{closed_port} is not reachable"):
        op.execute({})


def test_a_pods_result_comes_back_through_s3_without_exec(settings, monkeypatch):
    """What a stage pod does (run_stage with ESSP_RESULT_FILE=s3://...<pod>.json) and what the operator does
    once the pod is done (extract_xcom reads and removes it), on the real S3; a failed pod's missing result
    is None, a succeeded one's is an error."""
    from essp.clients.s3 import ObjectNotFound, ObjectStore
    from essp.orchestration.stages import kubernetes_result_uri, run_stage

    for name, value in connection_env_vars(settings).items():
        monkeypatch.setenv(name, value)
    ObjectStore(settings).ensure_bucket(settings.bucket_runs)
    pod_name = "essp-smoke-redis-abc123"
    monkeypatch.setenv("ESSP_RESULT_FILE", kubernetes_result_uri(settings, pod_name))
    written = run_stage("smoke-redis", settings, {"token": "pod"})
    op = EsspStageOperator(task_id="smoke_redis")

    def pod(phase: str, exit_code: int) -> k8s.V1Pod:
        state = k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=exit_code))
        return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=pod_name), status=k8s.V1PodStatus(
            phase=phase, container_statuses=[k8s.V1ContainerStatus(
                name="base", state=state, image="i", image_id="i", ready=False, restart_count=0)]))

    assert op.extract_xcom(pod("Succeeded", 0)) == written and written["service"] == "redis"
    with pytest.raises(ObjectNotFound):  # read once, then removed
        ObjectStore(settings).get_json(settings.bucket_runs, f"stage-results/{pod_name}.json")
    assert op.extract_xcom(pod("Failed", 1)) is None
    with pytest.raises(AirflowException, match="exited 0 but wrote no result"):
        op.extract_xcom(pod("Succeeded", 0))


def test_mode_comes_from_the_setting_and_bad_values_are_refused(monkeypatch):
    op = EsspStageOperator(task_id="smoke_redis")
    monkeypatch.setenv("ESSP_STAGE_MODE", "kubernetes")
    assert op.resolved_mode() == "kubernetes"
    monkeypatch.setenv("ESSP_STAGE_MODE", "local")
    assert op.resolved_mode() == "local"
    with pytest.raises(AirflowException, match="ESSP_STAGE_MODE='docker'"):
        EsspStageOperator(task_id="smoke_redis", mode="docker").resolved_mode()


# Small resolved params for each stage, standing in for the XComs and templates of a real DAG run.
SAMPLE_PARAMS = {"run": "r1", "split": "test", "registry": "reg", "manifest": "s3://b/m.json", "prefix": "incoming/",
                 "command": "pause", "token": "t", "replicas": {"decode": 1}, "streams": ["rgb", "flow"]}


def _dags():
    """Every DAG of dags/, by id."""
    import importlib.util
    from pathlib import Path

    from airflow.sdk import DAG

    dags = []
    for path in sorted((Path(__file__).resolve().parents[1] / "dags").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"essp_dag_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        dags += [v for v in vars(module).values() if isinstance(v, DAG)]
        # @dag functions are called at import; their DAGs are kept by the module's dag function
        dags += [fn() for name, fn in vars(module).items() if name == path.stem and callable(fn)]
    return {d.dag_id: d for d in dags}


def _dag_stage_tasks():
    return [(d.dag_id, t) for d in _dags().values() for t in d.tasks if isinstance(t, EsspStageOperator)]


def test_every_dag_has_a_description_and_docs_that_render():
    # the DAG list shows the description; the docs are Markdown, where a bare <placeholder> is dropped as HTML
    import re

    from essp.operators.params import dag_docs

    dags = _dags()
    assert {"essp_train", "essp_nightly_retrain", "essp_predict", "essp_control", "essp_smoke"} <= set(dags)
    for dag_id, dag in dags.items():
        assert dag.description and 10 < len(dag.description) <= 300 and "\n" not in dag.description, dag_id
        assert dag.description[0].isupper(), dag.description
        assert dag.doc_md and dag.doc_md.lower().startswith(f"{dag_id}: {dag.description[:20].lower()}"), dag_id
        assert not re.findall(r"<[^>\s][^>]*>", re.sub(r"`[^`]*`", "", dag.doc_md)), dag_id
    assert "`s3://<runs bucket>/predictions/<registry>/<DAG run>/`" in dags["essp_predict"].doc_md
    with pytest.raises(ValueError, match=r"<registry> outside a code span"):
        dag_docs("essp_x: does things.\n\nWrites to s3://bucket/<registry>/.")
    with pytest.raises(ValueError, match="starts with 'dag_id: what it does'"):
        dag_docs("Does things.")


def test_every_stage_of_every_dag_renders_a_valid_pod_in_kubernetes_mode(monkeypatch):
    from essp.orchestration.stages import stage_names

    monkeypatch.setenv("ESSP_STAGE_MODE", "kubernetes")
    tasks = _dag_stage_tasks()
    dag_ids = {dag_id for dag_id, _ in tasks}
    assert {"essp_train", "essp_nightly_retrain", "essp_predict", "essp_control", "essp_smoke"} <= dag_ids
    assert len(tasks) >= 20
    known = set(stage_names())
    for dag_id, task in tasks:
        assert task.resolved_mode() == "kubernetes"
        task.stage_params = SAMPLE_PARAMS  # what rendering the templates and XComs gives at run time
        pod, body = _render(task)
        main = pod.spec.containers[0]
        where = f"{dag_id}.{task.task_id}"
        assert main.command == ["essp"] and main.args[:2] == ["stage", task.stage], where
        assert task.stage in known, where
        assert json.loads(main.args[3]) == SAMPLE_PARAMS, where
        assert main.resources.requests["cpu"] and main.resources.limits["memory"], where
        if task.gpus:
            assert main.image.startswith("ghcr.io/essp-project/essp-worker-gpu:"), where
            assert main.resources.limits["nvidia.com/gpu"] == str(task.gpus), where
            assert pod.spec.node_selector == {"nvidia.com/gpu.present": "true"}, where
        else:
            assert main.image.startswith("ghcr.io/essp-project/essp-worker-cpu:"), where
            assert "nvidia.com/gpu" not in main.resources.limits, where
        assert [e.secret_ref.name for e in main.env_from if e.secret_ref] == ["essp-credentials"], where
        assert pod.spec.service_account_name == "essp-airflow", where
        env = {e.name: e.value for e in main.env}
        assert not any("SECRET" in name or "PASSWORD" in name for name in env), where
        assert pod.metadata.labels["essp/stage"] == task.stage, where
        # hardened as the worker pods; the API token only for the stages that scale workers through the API
        problems = hardening_problems(body["spec"], api_token=task.stage in KUBE_API_STAGES)
        assert not problems, (where, problems)
        assert env["HOME"] == "/tmp" and [m.mount_path for m in main.volume_mounts if m.name == "tmp"] == ["/tmp"]
    # the stages that use the fleet (essp.deploy.fleet: Deployments through the Kubernetes API) are those
    for name in known:
        uses_fleet = "fleet." in inspect.getsource(STAGES.get(name))
        assert uses_fleet == (name in KUBE_API_STAGES), name
    # the scoring stages ask for a GPU in Kubernetes; none of the others do
    assert {t.task_id for _, t in tasks if t.gpus} == {"score_test", "score_val"}


def test_a_task_its_stage_and_its_function_share_one_name():
    """One hop from a DAG to the code: task verify_manifest runs stage verify-manifest, which is the function
    verify_manifest of the stage module of its DAG; docs/orchestration.md names that module."""
    import inspect
    from pathlib import Path

    from essp.orchestration.stages import STAGES, load_stages

    load_stages()
    doc = (Path(__file__).resolve().parents[1] / "docs" / "orchestration.md").read_text()
    for dag_id, task in _dag_stage_tasks():
        fn = STAGES.get(task.stage)
        assert task.stage == task.task_id.replace("_", "-") and fn.__name__ == task.task_id, (dag_id, task.task_id)
        assert inspect.getdoc(fn), f"{fn.__module__}.{fn.__name__} says what it does"
        assert f"`{task.task_id}`" in doc and fn.__module__ in doc, f"docs/orchestration.md: {dag_id}.{task.task_id}"


def test_stage_params_are_checked_against_the_stage_signature(settings):
    from essp.orchestration.stages import StageParamsError, run_stage

    with pytest.raises(StageParamsError, match="stage score-test: run: Field required"):
        run_stage("score-test", settings, {})
    with pytest.raises(StageParamsError, match="splt: Extra inputs are not permitted"):
        run_stage("score-test", settings, {"run": "r1", "splt": "test"})
    with pytest.raises(StageParamsError, match="epoch: Input should be a valid integer"):
        run_stage("train-epoch", settings, {"run": "r1", "epoch": "one"})


def test_a_small_cluster_caps_the_requests_and_host_network_pods_reach_the_api_server(monkeypatch):
    monkeypatch.setenv("ESSP_K8S_STAGE_MAX_CPU", "250m")
    monkeypatch.setenv("ESSP_K8S_STAGE_MAX_MEMORY", "1Gi")
    monkeypatch.setenv("ESSP_K8S_HOST_NETWORK", "true")
    monkeypatch.setenv("ESSP_K8S_API_SERVER", "127.0.0.1:16443")
    score, _ = _render(EsspStageOperator(task_id="score_test", cpu="4", memory="8Gi"))
    main = score.spec.containers[0]
    assert main.resources.requests == {"cpu": "250m", "memory": "1Gi"}  # capped
    assert main.resources.limits == {"cpu": "4", "memory": "8Gi"}     # the stage's own
    assert score.spec.host_network is True
    env = {e.name: e.value for e in main.env}
    assert "KUBERNETES_SERVICE_HOST" not in env  # this stage does not call the API
    small, _ = _render(EsspStageOperator(task_id="ensure_workers", cpu="100m", memory="128Mi"))
    main = small.spec.containers[0]
    assert main.resources.requests == {"cpu": "100m", "memory": "128Mi"}  # under the cap: unchanged
    env = {e.name: e.value for e in main.env}
    assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == ("127.0.0.1", "16443")


def test_pod_lifecycle_settings_users_of_the_provider_rely_on():
    from essp.operators.stage import LOGGING_INTERVAL_S, TERMINATION_GRACE_S

    op = EsspStageOperator(task_id="smoke_s3")
    pod, _ = _render(op)
    assert op.deferrable and op.logging_interval == LOGGING_INTERVAL_S
    assert op.on_kill_action.value == "delete_pod" and op.on_finish_action.value == "delete_pod"
    assert op.termination_grace_period == TERMINATION_GRACE_S
    assert pod.spec.termination_grace_period_seconds == TERMINATION_GRACE_S
    assert pod.spec.host_network in (None, False)  # production: the pod network
