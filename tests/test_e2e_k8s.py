"""The production path on a real single-node Kubernetes (`make e2e-k8s`; k8s/e2e/ and k8s/overlays/e2e):
Airflow on this machine, every stage a pod (KubernetesPodOperator, deferrable), the resident data workers
the Deployments of k8s/ scaled by ensure_workers and back by release_workers, the trainers Deployments
cloned from the trainer template, all on the image built from images/worker-cpu.

The module's Airflow talks to the cluster as the service account essp-airflow (the Role of k8s/), not as an
admin: what the Role does not grant, the real API server refuses. Needs the cluster up; deselected from
`make test` (marker k8s)."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import kubekit
import pytest
from conftest import airflow_test_settings, remove_airflow_test

from essp.deploy.kube import deployment_name, worker_kinds
from essp.settings import Settings
from essp.stack.airflow import AirflowClient, AirflowStack
from essp.stack.services import LocalStack

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(1800)]

IMAGE = os.environ.get("ESSP_E2E_IMAGE", "essp-worker-cpu:e2e")
FIGURES = Path(os.environ.get("ESSP_E2E_FIGURES") or kubekit.STATE / "e2e-figures.json")
TRAIN_CONF = {"dataset": "tiny", "epochs": 3, "length": 4, "size": 32, "batch_size": 8, "lr": 0.05, "snippets": 2,
              "fusion": "product", "replicas": {"decode": 1, "flow": 1, "rgb": 1}, "stop_data_workers": True,
              "registry": "k8s", "run": "k8s-run", "device": "cpu"}


def _figure(key: str, value: Any) -> None:
    figures = json.loads(FIGURES.read_text()) if FIGURES.is_file() else {}
    figures[key] = value
    FIGURES.write_text(json.dumps(figures, indent=2, sort_keys=True))


class Ui:
    """The REST API and the plugin's pages of the module's Airflow."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = AirflowClient(settings)

    def get(self, path: str, *, accept: str = "application/json") -> tuple[int, str]:
        request = urllib.request.Request(self.settings.airflow_url + path, headers={
            "Authorization": f"Bearer {self.client.token()}", "Accept": accept})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        status, body = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}"
                                f"/logs/{try_number}?full_content=true")
        assert status == 200, body[:1000]
        content = json.loads(body).get("content")
        if isinstance(content, list):
            return "\n".join(str(e.get("event", e)) if isinstance(e, dict) else str(e) for e in content)
        return str(content)

    def states(self, dag_id: str, run_id: str) -> dict[tuple[str, int], str]:
        return {(t["task_id"], t.get("map_index", -1)): t["state"] for t in self.client.tasks(dag_id, run_id)}


@pytest.fixture(scope="module")
def cluster(base_settings, tmp_path_factory) -> Iterator[tuple[Settings, Ui]]:
    kubekit.cluster_ready()
    kubekit.wait_until(f"the image {IMAGE} on the node (k8s/e2e/images.sh imports it)", lambda: any(
        IMAGE in " ".join(image.get("names") or []) for node in kubekit.kubectl_json("get", "nodes")["items"]
        for image in node["status"].get("images") or []), timeout_s=30)
    kubekit.apply_overlay()
    # Stage pods an earlier, interrupted session left (a finished run deletes its own: checked below).
    kubekit.kubectl("-n", kubekit.NAMESPACE, "delete", "pods", "-l", "essp/stage", "--wait=true", check=False)
    state = tmp_path_factory.mktemp("k8s")
    settings = airflow_test_settings(
        base_settings, state, "k", stage_mode="kubernetes", worker_mode="kubernetes", k8s_trainer_gpus=False,
        k8s_host_network=True, k8s_api_server=kubekit.api_server(), k8s_stage_max_cpu="250m",
        k8s_stage_max_memory="1Gi", image_worker_cpu=IMAGE, image_worker_gpu=IMAGE, heartbeat_s=1.0)
    kubekit.write_pod_settings(settings)
    airflow_kubeconfig = kubekit.service_account_kubeconfig("essp-airflow", state / "airflow.kubeconfig")
    LocalStack(settings).up(["postgres"])
    saved = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(airflow_kubeconfig)  # what every Airflow process (and the plugin) talks with
    stack = AirflowStack(settings)
    started = time.monotonic()
    try:
        stack.up()
        ui = Ui(settings)
        ui.client.wait_for_dag("essp_train", timeout_s=180)
        _figure("airflow_up_s", round(time.monotonic() - started, 1))
        yield settings, ui
    finally:
        stack.down()
        if saved is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = saved
        kubekit.kubectl("-n", kubekit.NAMESPACE, "delete", "deployments", "-l", "essp/run", "--cascade=foreground",
                        "--wait=true", check=False)
        remove_airflow_test(settings)


@pytest.fixture(scope="module")
def dataset(cluster, tmp_path_factory) -> str:
    from essp.datasets.ingest import ingest_directory
    from essp.datasets.synth import synthesize

    settings, _ = cluster
    videos = tmp_path_factory.mktemp("k8s-videos")
    synthesize(videos, classes=3, videos_per_class=6, frames=24, height=48, width=48, keyint=6, seed=11)
    ingest_directory(settings, videos, "tiny")
    return "tiny"


def _watch_the_run(settings: Settings, run: str, out: dict[str, Any], stop: threading.Event) -> None:
    """Record each stream's figures of each epoch as its trainer finishes it (samples, dead letters), and
    the fault: once both streams finished epoch 0, delete the decode pod (the next epoch is being decoded);
    its Deployment makes another, which must take the rest over."""
    from essp.lifecycle.epochs import trainer_states

    epochs = out.setdefault("epochs", {})
    while not stop.is_set():
        states = trainer_states(settings, run, ["rgb", "flow"])
        for stream, state in states.items():
            if state is not None and state.stats and "epoch" in state.stats:
                epochs.setdefault(stream, {})[int(state.stats["epoch"])] = state.stats
        if "deleted" not in out and all(s is not None and s.epoch_done >= 0 for s in states.values()):
            decode = [p for p in kubekit.pods("app.kubernetes.io/name=essp-decode")
                      if not p["metadata"].get("deletionTimestamp")]
            if decode:
                name = decode[0]["metadata"]["name"]
                out["deleted"] = name
                out["at"] = {s: {"epoch_done": st.epoch_done, "training": st.epoch} for s, st in states.items() if st}
                kubekit.kubectl("-n", kubekit.NAMESPACE, "delete", "pod", name, "--wait=false")
        time.sleep(0.3)


def _look_at_the_workers_page(ui: Ui, run_id: dict[str, str], out: dict[str, Any], stop: threading.Event) -> None:
    """While a trainer pod runs and has logged, the DAG run's "Worker logs" page (what the task's extra link
    opens) and that pod's log as kubectl reads it."""
    import html

    while not stop.is_set():
        running = [p["metadata"]["name"] for p in kubekit.pods("essp/run=k8s-run,essp/stream=rgb")
                   if (p.get("status") or {}).get("phase") == "Running"]
        if running and run_id.get("id"):
            logs = kubekit.kubectl("-n", kubekit.NAMESPACE, "logs", running[0], "--tail=200", check=False).stdout
            if logs.strip():
                status, page = ui.get(f"/essp/dag-runs/essp_train/{quote(run_id['id'], safe='')}/workers",
                                      accept="text/html")
                after = kubekit.kubectl("-n", kubekit.NAMESPACE, "logs", running[0], "--tail=400", check=False).stdout
                out.update(pod=running[0], status=status, page=html.unescape(page), logs=after)
                return
        time.sleep(1)


@pytest.fixture(scope="module")
def trained(cluster, dataset) -> dict[str, Any]:
    settings, ui = cluster
    fault: dict[str, Any] = {}
    stop = threading.Event()
    killer = threading.Thread(target=_watch_the_run,
                              args=(settings, TRAIN_CONF["run"], fault, stop), daemon=True)
    page: dict[str, Any] = {}
    run_id: dict[str, str] = {}
    looker = threading.Thread(target=_look_at_the_workers_page, args=(ui, run_id, page, stop), daemon=True)
    started = time.monotonic()
    with kubekit.PodWatch() as watch:
        killer.start()
        looker.start()
        run = ui.client.trigger("essp_train", TRAIN_CONF)
        run_id["id"] = run["dag_run_id"]
        final = ui.client.wait("essp_train", run["dag_run_id"], timeout_s=1500, poll_s=3)
        stop.set()
        elapsed = time.monotonic() - started
        time.sleep(2)
    states = ui.states("essp_train", run["dag_run_id"])
    result = {"run": run, "final": final, "states": states, "watch": watch.seen, "fault": fault,
              "elapsed_s": round(elapsed, 1), "page": page}
    _figure("essp_train", {"elapsed_s": result["elapsed_s"], "state": final["state"],
                           "pods": len(watch.seen), "stage_pods": len(watch.by_label("essp/stage")),
                           "decode_pod_deleted": {k: v for k, v in fault.items() if k != "epochs"}})
    return result


def test_essp_train_runs_every_stage_as_a_pod_and_the_workers_as_deployments(cluster, trained):
    from essp.evaluation.report import read_report
    from essp.lifecycle.model_registry import ModelRegistry

    settings, ui = cluster
    tasks = trained["states"]
    assert trained["final"]["state"] == "success", tasks
    assert set(tasks.values()) == {"success"}, tasks
    # every EsspStageOperator task ran as a pod of its stage
    stages = trained["watch"]
    by_stage = kubekit.PodWatch(seen=stages).by_label("essp/stage")
    expected = {"verify-manifest", "ensure-workers", "release-trainers", "score-test", "score-val",
                "fuse-and-report", "register-model", "release-workers"}
    assert expected <= set(by_stage), sorted(by_stage)
    # the data workers were the Deployments' pods, the trainers the clones of the template
    names = set(stages)
    assert any(n.startswith("essp-decode-") for n in names), sorted(names)
    assert any(n.startswith("essp-extract-flow-") for n in names) and any(n.startswith("essp-extract-rgb-")
                                                                          for n in names)
    assert any(n.startswith("essp-trainer-k8s-run-rgb-") for n in names)
    assert any(n.startswith("essp-trainer-k8s-run-flow-") for n in names)
    # the report and the registry entry are in S3
    report = read_report(settings, "k8s-run")
    assert report["selected"] == "product"
    production = ModelRegistry(settings, "k8s").production()
    assert production is not None and production.run == "k8s-run"
    # nothing left: no pod, no ReplicaSet with replicas, no Deployment of the run
    deadline = time.monotonic() + 90
    while any((left := kubekit.leftovers("k8s-run")).values()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not any(left.values()), left
    scaled = {d["metadata"]["name"]: d["spec"]["replicas"] for d in
              kubekit.kubectl_json("-n", kubekit.NAMESPACE, "get", "deployments")["items"]}
    # every data-worker Deployment (one per registered extractor) and the trainer template, all at 0
    assert scaled == {**{deployment_name(kind): 0 for kind in worker_kinds()}, "essp-trainer": 0}, scaled


def test_deleting_the_decode_pod_mid_run_loses_no_sample(cluster, trained):
    from essp.lifecycle.epochs import trainer_states

    settings, _ = cluster
    fault = trained["fault"]
    assert fault.get("deleted"), "the decode pod was never deleted (epoch 0 not seen finished)"
    decoders = kubekit.PodWatch(seen=trained["watch"]).names("essp-decode-")
    assert len(decoders) >= 2 and fault["deleted"] in decoders, decoders  # the Deployment made another
    assert trained["final"]["state"] == "success"
    # every epoch of both streams trained on every sample of the train split, none dead-lettered
    from essp.datasets.manifest import ManifestStore

    planned = len(ManifestStore(settings).load("tiny").split("train"))
    states = trainer_states(settings, "k8s-run", ["rgb", "flow"])
    assert all(s is not None and s.epoch_done == TRAIN_CONF["epochs"] - 1 for s in states.values()), states
    seen = fault["epochs"]
    for stream in ("rgb", "flow"):
        assert sorted(seen.get(stream, {})) == list(range(TRAIN_CONF["epochs"])), seen
        for epoch, figures in seen[stream].items():
            assert figures["samples"] == planned and figures["dead"] == 0, (stream, epoch, figures)


def test_the_service_account_of_airflow_and_the_stage_pods_cannot_read_secrets(cluster):
    settings, _ = cluster
    config = settings.state_dir / "airflow.kubeconfig"
    refused = kubekit.kubectl("-n", kubekit.NAMESPACE, "get", "secrets", kubeconfig=config, check=False)
    assert refused.returncode != 0 and "forbidden" in refused.stderr.lower(), refused.stderr
    other = kubekit.kubectl("-n", "default", "get", "pods", kubeconfig=config, check=False)
    assert other.returncode != 0 and "forbidden" in other.stderr.lower(), other.stderr
    nodes = kubekit.kubectl("get", "nodes", kubeconfig=config, check=False)
    assert nodes.returncode != 0 and "forbidden" in nodes.stderr.lower(), nodes.stderr
    # and what it needs, it may
    def can(verb: str, resource: str) -> str:
        name, _, sub = resource.partition("/")
        args = ["-n", kubekit.NAMESPACE, "auth", "can-i", verb, name] + ([f"--subresource={sub}"] if sub else [])
        return kubekit.kubectl(*args, kubeconfig=config, check=False).stdout.strip()

    for verb, resource in (("create", "pods"), ("delete", "pods"), ("get", "pods/log"), ("patch", "deployments/scale"),
                           ("create", "deployments")):
        assert can(verb, resource) == "yes", (verb, resource)
    for verb, resource in (("create", "pods/exec"), ("get", "secrets"), ("list", "secrets"), ("create", "roles")):
        assert can(verb, resource) == "no", (verb, resource)


def test_a_trainer_pod_that_cannot_run_is_named_with_the_clusters_reason(cluster):
    # what the epoch trigger logs (and a timeout says) and the worker-logs page shows, read as Airflow's
    # service account from the real scheduler and kubelet: a trainer asking for more CPU than the node has,
    # and one whose image is not on the node (imagePullPolicy Never)
    from essp.deploy.kube import trainer_blockers
    from essp.orchestration.webui import dag_run_context, render_workers

    settings, _ = cluster
    run, names = "k8s-blocked", {"rgb": "essp-blocked-rgb", "flow": "essp-blocked-flow"}
    images = {"rgb": (IMAGE, {"cpu": "4"}), "flow": ("essp-worker-cpu:no-such-tag", {"cpu": "10m"})}
    for stream, name in names.items():
        image, requests = images[stream]
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": kubekit.NAMESPACE,
                            "labels": {"essp/run": run, "essp/stream": stream}},
               "spec": {"hostNetwork": True, "automountServiceAccountToken": False,
                        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                        "containers": [{"name": "trainer", "image": image, "imagePullPolicy": "Never",
                                        "args": ["--help"], "resources": {"requests": requests}}]}}
        kubekit.kubectl("apply", "-f", "-", stdin=json.dumps(pod))
    try:
        found = kubekit.wait_until("both trainer pods' reasons", lambda: (
            b if len(b := trainer_blockers(kubekit.NAMESPACE, run, ["rgb", "flow", "framediff"])) == 2 else None),
            timeout_s=60)
        assert found["rgb"] == (f"pod {names['rgb']}: not scheduled (Unschedulable): 0/1 nodes are available: "
                                "1 Insufficient cpu."), found
        assert found["flow"].startswith(f"pod {names['flow']}: container trainer waiting (ErrImageNeverPull): "), found
        assert "essp-worker-cpu:no-such-tag" in found["flow"], found
        context = dag_run_context("essp_train", "manual__blocked", run, "/essp/", workers_link=False)
        page = render_workers(settings, run, ["rgb", "flow"], context=context, root="/essp/", report="").body.decode()
        assert "1 Insufficient cpu." in page and "ErrImageNeverPull" in page, page[:3000]
    finally:
        kubekit.kubectl("-n", kubekit.NAMESPACE, "delete", "pods", "-l", f"essp/run={run}", "--wait=true", check=False)


def test_a_stage_failing_in_its_pod_fails_its_task_with_the_pods_log(cluster, dataset):
    settings, ui = cluster
    conf = {**TRAIN_CONF, "dataset": "no-such-dataset", "run": "k8s-fail", "epochs": 1}
    run = ui.client.trigger("essp_train", conf)
    final = ui.client.wait("essp_train", run["dag_run_id"], timeout_s=600, poll_s=3)
    states = ui.states("essp_train", run["dag_run_id"])
    assert final["state"] == "failed", states
    assert states[("verify_manifest", -1)] == "failed", states
    log = ui.task_log("essp_train", run["dag_run_id"], "verify_manifest")
    assert "no-such-dataset" in log, log[-3000:]
    assert "essp-verify-manifest" in log, log[-3000:]  # the pod's name: its own output, read back from the pod


def test_the_worker_logs_link_shows_the_pods_logs(cluster, trained):
    from essp.operators.links import worker_logs_url

    seen = trained["page"]
    assert seen, "no trainer pod was seen running with a log"
    assert seen["status"] == 200, seen["page"][:2000]
    assert worker_logs_url("essp_train", trained["run"]["dag_run_id"], base_url="").endswith("/workers")
    page, pod = seen["page"], seen["pod"]
    assert f'data-name="{pod}"' in page and "read through the Kubernetes API" in page, page[:3000]
    # the pod's own log lines, as kubectl read them just after
    section = page.split(f'id="{pod}"', 1)[1].split("</section>", 1)[0]
    lines = [line.strip() for line in seen["logs"].splitlines() if len(line.strip()) > 20]
    assert any(line in section for line in lines), (section[-2000:], lines[-5:])


def test_essp_predict_runs_as_a_pod(cluster, trained):
    from essp.clients.s3 import ObjectStore, S3Uri
    from essp.datasets.manifest import ManifestStore

    settings, ui = cluster
    store = ObjectStore(settings)
    for i, video in enumerate(ManifestStore(settings).load("tiny").split("test")[:2]):
        location = S3Uri.parse(video.uri)
        store.put_bytes(settings.bucket_videos, f"incoming/clip{i}.mp4", store.get_bytes(location.bucket, location.key))
    with kubekit.PodWatch() as watch:
        run = ui.client.trigger("essp_predict", {"prefix": "incoming/", "registry": "k8s"})
        final = ui.client.wait("essp_predict", run["dag_run_id"], timeout_s=600, poll_s=3)
        time.sleep(1)
    assert final["state"] == "success", ui.states("essp_predict", run["dag_run_id"])
    assert "predict-prefix" in watch.by_label("essp/stage"), watch.seen
    log = ui.task_log("essp_predict", run["dag_run_id"], "predict_prefix")
    assert "essp-predict-prefix" in log
