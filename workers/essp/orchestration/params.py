"""The params of the `essp_train` DAG: what the trigger form shows, and how they become a run.

:data:`TRAIN_PARAMS` describes each param (type, default, JSON-schema limits, title and description);
``dags/essp_train.py`` turns them into Airflow ``Param``s, so the trigger form shows them and Airflow
refuses a value outside its schema at trigger time (REST API and UI alike). :func:`spec_from_params`
then checks what one field's schema cannot (fusion weights naming the streams, a manifest name's
syntax, ...) through :func:`essp.lifecycle.pipeline.parse_spec`, so a bad combination fails the first task with a
message naming the param. Airflow-free: the tests and ``essp train`` use it too.
"""

from __future__ import annotations

from typing import Any

from essp.dataplane.extractors import FLOW_METHODS, extractor_kinds
from essp.deploy.fleet import data_kinds
from essp.errors import EsspError
from essp.orchestration.links import run_id_for
from essp.training.params import ARCHITECTURES, RunSpec, RunSpecError, parse_spec

FUSIONS = ["average", "weighted", "max", "product", "learned", "sequence"]
METRICS = ["top1", "top5", "mean_class_accuracy", "mAP"]
STREAM_KINDS = extractor_kinds()
DEFAULT_REPLICAS = {"decode": 2, "flow": 2, "rgb": 1, "framediff": 0}


def _p(default: Any, type_: str | list[str], title: str, description: str, section: str, **schema: Any) -> dict:
    return {"default": default, "type": type_, "title": title, "description": description, "section": section,
            **schema}


# name -> default, JSON-schema type and limits, title, description, form section.
TRAIN_PARAMS: dict[str, dict[str, Any]] = {
    "dataset": _p("synth-demo", "string", "Dataset",
                  "The manifest to train on: a dataset name (its latest version), name@N, or an s3:// URI of a "
                  "manifest (`essp dataset ingest` writes them).", "Data", minLength=1),
    "streams": _p(["rgb", "flow"], "array", "Streams",
                  f"The streams to train, each a registered extractor ({', '.join(STREAM_KINDS)}).", "Data",
                  items={"type": "string", "enum": STREAM_KINDS}, minItems=1, uniqueItems=True),
    "length": _p(10, "integer", "Stack length L",
                 "Frames per sample: a flow stream sees L flow fields (2L channels), rgb the middle frame.",
                 "Data", minimum=1, maximum=64),
    "size": _p(112, "integer", "Sample size", "Samples are size x size pixels.", "Data", minimum=16,
               maximum=1024),
    "flow_method": _p("dis_fast", "string", "Optical flow method", "OpenCV algorithm of the flow stream.",
                      "Data", enum=list(FLOW_METHODS)),
    "rgb_arch": _p("resnet18", "string", "RGB architecture", "Network of the rgb (spatial) stream.", "Model",
                   enum=list(ARCHITECTURES)),
    "flow_arch": _p("resnet18", "string", "Flow architecture", "Network of the flow (temporal) stream.", "Model",
                    enum=list(ARCHITECTURES)),
    "framediff_arch": _p("resnet18", "string", "Frame-difference architecture",
                         "Network of the framediff stream (when it is among the streams).", "Model",
                         enum=list(ARCHITECTURES)),
    "pretrained": _p({}, "object", "Pretrained weights",
                     "Per stream, a file or s3:// URI of weights to start from (torchvision state_dict or an ESSP "
                     "checkpoint), e.g. {\"rgb\": \"s3://essp-models/resnet18-imagenet.pt\"}.", "Model",
                     additionalProperties={"type": "string", "minLength": 1}),
    "epochs": _p(6, "integer", "Epochs", "Epochs to train (a run resumes from its checkpoints).", "Training",
                 minimum=1, maximum=10000),
    "samples_per_epoch": _p(0, "integer", "Samples per epoch",
                            "Samples drawn per epoch (class, then video, then offset); 0: the number of training "
                            "videos.", "Training", minimum=0),
    "batch_size": _p(16, "integer", "Batch size", "Per trainer process.", "Training", minimum=2, maximum=4096),
    "lr": _p(0.01, "number", "Learning rate", "Initial SGD learning rate.", "Training", exclusiveMinimum=0,
             maximum=10),
    "lr_steps": _p([], "array", "LR decay steps",
                   "Iterations at which the learning rate is multiplied by lr_gamma (strictly increasing).",
                   "Training", items={"type": "integer", "minimum": 1}),
    "lr_gamma": _p(0.1, "number", "LR decay factor", "Multiplier at each LR step.", "Training",
                   exclusiveMinimum=0, maximum=1),
    "momentum": _p(0.9, "number", "Momentum", "SGD momentum.", "Training", minimum=0, exclusiveMaximum=1),
    "weight_decay": _p(5e-4, "number", "Weight decay", "SGD weight decay.", "Training", minimum=0),
    "seed": _p(0, "integer", "Seed", "Seeds the epoch plans and the initial weights.", "Training", minimum=0),
    "device": _p("auto", "string", "Device", "auto (CUDA when there is one), cpu, cuda or cuda:N.", "Training",
                 pattern=r"^(auto|cpu|cuda(:\d+)?)$"),
    "trainer_procs": _p(1, "integer", "Processes per trainer",
                        "DistributedDataParallel processes of each stream's trainer (one per GPU).", "Workers",
                        minimum=1, maximum=64),
    "replicas": _p(dict(DEFAULT_REPLICAS), "object", "Worker replicas",
                   f"Resident data workers to run, per kind ({', '.join(data_kinds())}); the ensure step scales "
                   "each kind to its count (processes locally, Deployments in Kubernetes).", "Workers",
                   additionalProperties={"type": "integer", "minimum": 0, "maximum": 256}),
    "stop_data_workers": _p(False, "boolean", "Stop data workers at the end",
                            "Scale the shared decode/extract workers to 0 when the run ends (they are shared by "
                            "runs: leave off when other runs train).", "Workers"),
    "max_inflight": _p(64, "integer", "Samples in flight", "Back-pressure bound of the run in Redis.", "Workers",
                       minimum=1),
    "epoch_timeout_s": _p(1800, "number", "Epoch timeout (s)",
                          "How long to wait for one epoch of every stream (not counted while paused).", "Workers",
                          exclusiveMinimum=0),
    "snippets": _p(25, "integer", "Snippets per test video", "Evenly spaced snippets scored per video.",
                   "Evaluation", minimum=1, maximum=250),
    "fusion": _p("average", "string", "Fusion",
                 "The fusion registered with the model; every strategy is scored side by side in the report.",
                 "Evaluation", enum=FUSIONS),
    "fusion_weights": _p(None, ["object", "null"], "Fusion weights",
                         "Per-stream weights of the weighted fusion, e.g. {\"rgb\": 1, \"flow\": 1.5}.", "Evaluation",
                         additionalProperties={"type": "number", "minimum": 0}),
    "registry": _p("", "string", "Model registry", "Registry name; empty: the dataset's name.", "Evaluation",
                   pattern=r"^[A-Za-z0-9_.-]{0,64}$"),
    "promote_metric": _p("top1", "string", "Promotion metric",
                         "The model is promoted to production only if it beats production on this metric.",
                         "Evaluation", enum=METRICS),
    "run": _p("", "string", "Run id", "ESSP run id; empty: derived from the DAG run. Reusing an id resumes that run.",
              "Run", pattern=r"^([A-Za-z0-9][A-Za-z0-9_-]{0,63})?$"),
}


class DagParamError(RunSpecError):
    """A DAG param that cannot make a run; the message names it."""


def spec_values(params: dict[str, Any], *, dag_id: str, dag_run_id: str) -> dict[str, Any]:
    """The RunSpec values of the form's params (unknown params refused, defaults filled in)."""
    unknown = sorted(set(params) - set(TRAIN_PARAMS))
    if unknown:
        raise DagParamError(f"unknown param(s) {', '.join(unknown)}; known: {', '.join(sorted(TRAIN_PARAMS))}")
    p = {name: params.get(name, meta["default"]) for name, meta in TRAIN_PARAMS.items()}
    streams = list(p["streams"])
    bad = [s for s in streams if s not in STREAM_KINDS]
    if bad:
        raise DagParamError(f"streams: {', '.join(map(repr, bad))} not a registered extractor "
                            f"({', '.join(STREAM_KINDS)})")
    unknown_pretrained = sorted(set(p["pretrained"] or {}) - set(streams))
    if unknown_pretrained:
        raise DagParamError(f"pretrained: names stream(s) {', '.join(unknown_pretrained)} that the run does not "
                            f"train ({', '.join(streams)})")
    stream_specs = {}
    for stream in streams:
        stream_specs[stream] = {"arch": p.get(f"{stream}_arch", "resnet18"),
                                "options": {"method": p["flow_method"]} if stream == "flow" else {},
                                "pretrained": (p["pretrained"] or {}).get(stream) or None}
    return {"run": p["run"] or run_id_for(dag_id, dag_run_id), "manifest": p["dataset"], "streams": stream_specs,
            "epochs": p["epochs"], "samples_per_epoch": p["samples_per_epoch"] or None, "length": p["length"],
            "size": p["size"], "batch_size": p["batch_size"], "lr": p["lr"], "lr_steps": list(p["lr_steps"]),
            "lr_gamma": p["lr_gamma"], "momentum": p["momentum"], "weight_decay": p["weight_decay"],
            "seed": p["seed"], "device": p["device"], "snippets": p["snippets"], "fusion": p["fusion"],
            "fusion_weights": p["fusion_weights"] or None, "registry": p["registry"] or None,
            "promote_metric": p["promote_metric"], "trainer_procs": p["trainer_procs"],
            "max_inflight": p["max_inflight"], "epoch_timeout_s": p["epoch_timeout_s"]}


def replicas_of(params: dict[str, Any], streams: list[str]) -> dict[str, int]:
    wanted = {**DEFAULT_REPLICAS, **(params.get("replicas") or {})}
    kinds = data_kinds()
    bad = sorted(set(wanted) - set(kinds))
    if bad:
        raise DagParamError(f"replicas: {', '.join(bad)} not a worker kind ({', '.join(kinds)})")
    for kind in ["decode", *streams]:
        if wanted.get(kind, 0) < 1:
            raise DagParamError(f"replicas.{kind}: the run needs at least one {kind} worker (got {wanted.get(kind)})")
    return {k: int(v) for k, v in wanted.items() if k in kinds}


def plan_run(spec: RunSpec, replicas: dict[str, int], *, stop_data_workers: bool = False,
             dag_id: str, dag_run_id: str) -> dict[str, Any]:
    """What the DAG's tasks need of a validated run (small JSON, pushed as the first task's XCom)."""
    values = spec.model_dump(mode="json")
    streams = list(spec.streams)
    return {"run": spec.run, "streams": streams,
            "spec": {**values, "airflow": {"dag_id": dag_id, "dag_run_id": dag_run_id}},
            "ensure": {"run": spec.run, "replicas": replicas},
            "release_trainers": {"run": spec.run, "streams": streams},
            "release": {"run": spec.run, "streams": streams,
                        "data_workers": {k: 0 for k in replicas} if stop_data_workers else None},
            "score_test": {"run": spec.run, "split": "test"},
            "score_train": {"run": spec.run, "split": "train"},
            "fuse": {"run": spec.run}}


def validate_params(params: dict[str, Any], *, dag_id: str, dag_run_id: str) -> dict[str, Any]:
    """Check the DAG params and plan the run's tasks (:func:`plan_run`); errors name the param."""
    try:
        values = spec_values(dict(params), dag_id=dag_id, dag_run_id=dag_run_id)
        spec = parse_spec(values)
        replicas = replicas_of(params, list(spec.streams))
    except RunSpecError:
        raise
    except (TypeError, ValueError, EsspError) as exc:
        raise DagParamError(f"bad params: {exc}") from None
    return plan_run(spec, replicas, stop_data_workers=bool(params.get("stop_data_workers")), dag_id=dag_id,
                    dag_run_id=dag_run_id)
