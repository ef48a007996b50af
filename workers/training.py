"""A two-stream training run, step by step: what the `essp_train` DAG's stages call, and what
`essp train` and `essp demo` run end to end on the embedded default.

Steps (each a plain function over the settings and the run's :class:`RunSpec`, small JSON out):

1. :func:`prepare_run` validates the spec against the manifest and writes ``spec.json`` to the run's
   folder in S3 (the trainers read it from there, as pods would).
2. :func:`train_epoch` plans one epoch (the paper's §3.2, skipping videos decode quarantined),
   publishes it, asks the resident trainers for it and waits for every stream's ``epoch_done``.
3. :func:`score_split` scores the test videos (and the training videos, for the learned fusions)
   with each stream's final checkpoint, 25 evenly spaced snippets per video, through the workers.
4. :func:`fuse_and_report` scores every fusion strategy side by side (the learned ones fitted on
   training videos only), keeps the requested one, writes the report (JSON + plots) to S3.
5. :func:`register_run` records the model in the registry and promotes it if it beats production.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from essp.contract import check_run_id
from essp.errors import EsspError
from essp.evaluate import DEFAULT_SNIPPETS, manifest_videos
from essp.evaluate import score_split as score_videos
from essp.extractors import create_extractor, extractor_kinds
from essp.fusion import StreamScores, compare_fusions, make_fuser
from essp.manifest import ManifestStore
from essp.models import ARCHITECTURES, build_model
from essp.plan import decode_quarantine, plan_epoch, publish_plan
from essp.runstore import RunStore, VideoScores
from essp.settings import Settings
from essp.train_worker import TrainSpec, request_epoch, trainer_state
from essp.trainer import TrainParams

Log = Callable[[str], None]


class RunSpecError(EsspError, ValueError):
    """A training run's parameters are not valid; the message names the parameter."""


class StreamSpec(BaseModel):
    """One stream of a run: its architecture and its extractor's options (e.g. the flow method)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = "tiny"
    options: dict[str, Any] = Field(default_factory=dict)
    pretrained: str | None = None
    dropout: float | None = Field(None, ge=0, lt=1)


class RunSpec(BaseModel):
    """Every knob of a training run (the `essp_train` DAG's params)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str
    manifest: str = Field(description="Dataset manifest: a name (latest version), name@N, or an s3:// URI.")
    streams: dict[str, StreamSpec] = Field(
        default_factory=lambda: {"rgb": StreamSpec(), "flow": StreamSpec(options={"method": "dis_fast"})})
    epochs: int = Field(6, ge=1, le=10_000)
    samples_per_epoch: int | None = Field(None, ge=1, description="Default: the number of training videos.")
    length: int = Field(10, ge=1, le=64, description="Stack length L.")
    size: int = Field(112, ge=16, le=1024, description="Samples are size x size pixels.")
    batch_size: int = Field(16, ge=2, le=4096)
    lr: float = Field(0.01, gt=0, le=10)
    lr_steps: list[int] = Field(default_factory=list)
    lr_gamma: float = Field(0.1, gt=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    seed: int = Field(0, ge=0)
    device: str = "auto"
    snippets: int = Field(DEFAULT_SNIPPETS, ge=1, le=250, description="Snippets scored per test video.")
    fusion: Literal["average", "weighted", "max", "product", "learned", "sequence"] = "average"
    fusion_weights: dict[str, float] | None = None
    registry: str | None = Field(None, description="Model registry name; default: the dataset's name.")
    promote_metric: Literal["top1", "top5", "mean_class_accuracy", "mAP"] = "top1"
    trainer_procs: int = Field(1, ge=1, le=64, description="DDP processes per stream trainer (one per GPU).")
    max_inflight: int = Field(64, ge=1)
    epoch_timeout_s: float = Field(1800, gt=0, description="How long to wait for one epoch of every stream.")

    @field_validator("run")
    @classmethod
    def _run_id(cls, run: str) -> str:
        return check_run_id(run)

    @model_validator(mode="after")
    def _checks(self) -> RunSpec:
        if not self.streams:
            raise ValueError("streams: name at least one stream (rgb, flow, framediff)")
        for name, stream in self.streams.items():
            if name not in extractor_kinds():
                raise ValueError(f"streams: {name!r} is not a registered extractor ({', '.join(extractor_kinds())})")
            if stream.arch not in ARCHITECTURES:
                raise ValueError(f"streams.{name}.arch: {stream.arch!r} is not one of {', '.join(ARCHITECTURES)}")
            try:
                create_extractor(name, stream.options)
            except (ValueError, EsspError) as exc:
                raise ValueError(f"streams.{name}.options: {exc}") from None
        if self.fusion == "weighted" and not self.fusion_weights:
            raise ValueError("fusion_weights: the weighted fusion needs a weight per stream")
        if self.fusion_weights is not None:
            unknown = sorted(set(self.fusion_weights) - set(self.streams))
            missing = sorted(set(self.streams) - set(self.fusion_weights))
            if unknown or missing:
                raise ValueError(f"fusion_weights: must name each stream exactly once (unknown: {unknown or 'none'}, "
                                 f"missing: {missing or 'none'})")
            if any(w < 0 for w in self.fusion_weights.values()) or sum(self.fusion_weights.values()) <= 0:
                raise ValueError("fusion_weights: weights must be >= 0 and not all zero")
        if self.lr_steps != sorted(set(self.lr_steps)) or any(s <= 0 for s in self.lr_steps):
            raise ValueError(f"lr_steps: must be strictly increasing positive iterations, got {self.lr_steps}")
        return self

    def train_params(self, stream: str) -> TrainParams:
        spec = self.streams[stream]
        return TrainParams(arch=spec.arch, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           lr_steps=self.lr_steps, lr_gamma=self.lr_gamma, momentum=self.momentum,
                           weight_decay=self.weight_decay, dropout=spec.dropout, pretrained=spec.pretrained,
                           seed=self.seed, device=self.device)

    def features(self) -> dict[str, dict[str, Any]]:
        return {name: dict(stream.options) for name, stream in self.streams.items()}


def parse_spec(values: dict[str, Any]) -> RunSpec:
    """A RunSpec from user values, with errors that name each bad parameter."""
    from pydantic import ValidationError

    try:
        return RunSpec.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}"
                             for err in exc.errors())
        raise RunSpecError(f"bad training parameters: {problems}") from None


# -- 1. prepare ---------------------------------------------------------------------------------------
def prepare_run(settings: Settings, spec: RunSpec) -> dict[str, Any]:
    """Check the spec against the manifest and write ``spec.json``; returns the run's facts."""
    store = ManifestStore(settings)
    manifest_uri = store.resolve(spec.manifest)
    manifest = store.load(manifest_uri)
    train = manifest.split("train") if "train" in manifest.splits else []
    test = manifest.split("test") if "test" in manifest.splits else []
    if not train or not test:
        raise RunSpecError(f"manifest {manifest_uri}: a training run needs a train and a test split "
                           f"(train {len(train)}, test {len(test)} videos)")
    if len(manifest.classes) < 2:
        raise RunSpecError(f"manifest {manifest_uri}: {len(manifest.classes)} class; at least 2 are needed")
    facts = {"spec": spec.model_dump(mode="json"), "manifest_uri": manifest_uri, "dataset": manifest.name,
             "classes": manifest.classes,
             "train_videos": len(train), "test_videos": len(test),
             "samples_per_epoch": spec.samples_per_epoch or len(train)}
    RunStore(settings, spec.run).save_json("spec.json", facts)
    return facts


def load_run(settings: Settings, run: str) -> tuple[RunSpec, dict[str, Any]]:
    facts = RunStore(settings, run).load_json("spec.json")
    return RunSpec.model_validate(facts["spec"]), facts


def train_spec(settings: Settings, run: str, stream: str) -> TrainSpec:
    """What the resident trainer of ``stream`` needs, read from the run's ``spec.json`` in S3."""
    spec, facts = load_run(settings, run)
    if stream not in spec.streams:
        raise RunSpecError(f"run {run} has no stream {stream!r} (streams: {', '.join(spec.streams)})")
    return TrainSpec(run=run, stream=stream, num_classes=len(facts["classes"]), length=spec.length,
                     params=spec.train_params(stream))


# -- 2. one epoch -------------------------------------------------------------------------------------
def trained_epochs(settings: Settings, spec: RunSpec) -> int:
    """Epochs every stream has finished (from the trainers' state, else their checkpoints)."""
    done = []
    runs = RunStore(settings, spec.run)
    for stream in spec.streams:
        state = trainer_state(settings, spec.run, stream)
        if state:
            done.append(int(state.get("epoch_done", -1)) + 1)
            continue
        pointer = runs.latest_pointer(stream)  # its "epoch" is the next one to train, as in the checkpoint
        done.append(0 if pointer is None else int(pointer["epoch"]))
    return min(done)


def train_epoch(settings: Settings, spec: RunSpec, epoch: int, *, log: Log = print,
                alive: Callable[[], None] | None = None) -> dict[str, Any]:
    """Plan, publish and train one epoch on every stream; returns each stream's figures."""
    start_epoch(settings, spec, epoch)
    return wait_epoch_done(settings, spec.run, list(spec.streams), epoch, timeout_s=spec.epoch_timeout_s, log=log,
                           alive=alive)


def start_epoch(settings: Settings, spec: RunSpec, epoch: int) -> int:
    """Plan and publish one epoch and ask the trainers for it (the DAG then waits on a deferrable
    trigger, :func:`wait_epoch_done` blocks); returns the number of samples planned."""
    _, facts = load_run(settings, spec.run)
    manifest = ManifestStore(settings).load(facts["manifest_uri"])
    plan = plan_epoch(manifest, run=spec.run, epoch=epoch, features=spec.features(), length=spec.length,
                      height=spec.size, width=spec.size, samples=facts["samples_per_epoch"], seed=spec.seed,
                      max_inflight=spec.max_inflight, exclude=set(decode_quarantine(settings, spec.run)))
    from essp.payloads import SampleStore

    # A retried epoch (a trainer restarted) must be delivered again: forget its samples' progress.
    SampleStore(settings, spec.run).reset(plan.sample_ids())
    publish_plan(settings, plan)
    request_epoch(settings, spec.run, epoch, len(plan.jobs))
    return len(plan.jobs)


def plan_epoch_once(settings: Settings, spec: RunSpec, epoch: int, token: str) -> bool:
    """:func:`start_epoch`, by the first caller that gives ``token`` (the DAG run): each stream's task of
    a DAG run tries it, exactly one plans. A new DAG run (another token) plans an unfinished epoch again,
    as a restarted :func:`run_training` does. True if this call planned."""
    import hashlib

    from essp.clients.redis import redis_client
    from essp.contract import RedisKeys

    digest = hashlib.sha1(token.encode()).hexdigest()[:16]
    key = f"{RedisKeys(settings.redis_prefix).prefix}:{spec.run}:planned:{epoch}:{digest}"
    if not redis_client(settings).set(key, token, nx=True, ex=int(spec.epoch_timeout_s * 2) + 3600):
        return False
    start_epoch(settings, spec, epoch)
    return True


def epoch_line(epoch: int, stream: str, figures: dict[str, Any]) -> str:
    return (f"  epoch {epoch} {stream:<5} loss {figures['loss']:.3f}  train acc {figures['accuracy']:.3f}  "
            f"{figures['samples_per_s']:.1f} samples/s  data wait {100 * figures['data_wait']:.1f}%")


def wait_epoch_done(settings: Settings, run: str, streams: list[str], epoch: int, *, timeout_s: float = 1800,
                    poll_s: float = 0.5, log: Log = print, alive: Callable[[], None] | None = None) -> dict[str, Any]:
    """Block until every stream's trainer recorded ``epoch`` done (the Airflow trigger polls the same state).
    ``alive`` raises when a process the run depends on has died (local runs check their workers)."""
    deadline = time.monotonic() + timeout_s
    results: dict[str, Any] = {}
    while True:
        for stream in streams:
            if stream in results:
                continue
            state = trainer_state(settings, run, stream)
            if state.get("status") == "failed":
                raise EsspError(f"run {run}: the {stream} trainer failed in epoch {epoch}: {state.get('detail')}")
            if int(state.get("epoch_done", -1)) >= epoch:
                results[stream] = state.get("stats", {})
                figures = results[stream]
                if figures:
                    log(epoch_line(epoch, stream, figures))
        if len(results) == len(streams):
            return results
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            missing = sorted(set(streams) - set(results))
            raise EsspError(f"run {run}: epoch {epoch} not done by stream(s) {', '.join(missing)} after "
                            f"{timeout_s:.0f}s; is a trainer running (`essp worker status`)?")
        time.sleep(poll_s)


# -- 3. scoring ---------------------------------------------------------------------------------------
def load_stream_models(settings: Settings, spec: RunSpec, num_classes: int, device: str = "cpu") -> dict[str, Any]:
    """Each stream's model with the weights of its latest checkpoint, in eval mode."""
    import torch

    runs = RunStore(settings, spec.run)
    models = {}
    for stream, stream_spec in spec.streams.items():
        state = runs.load_checkpoint(stream=stream)
        model = build_model(stream_spec.arch, stream, num_classes=num_classes, length=spec.length,
                            dropout=stream_spec.dropout)
        model.load_state_dict(state["model"])
        models[stream] = model.to(torch.device(device)).eval()
    return models


def score_split(settings: Settings, spec: RunSpec, split: str, *, snippets: int | None = None,
                log: Log = print) -> dict[str, str]:
    """Score every video of ``split`` per stream and store the scores; returns their URIs."""
    _, facts = load_run(settings, spec.run)
    manifest = ManifestStore(settings).load(facts["manifest_uri"])
    from essp.trainer import resolve_device

    models = load_stream_models(settings, spec, len(facts["classes"]), device=str(resolve_device(spec.device)))
    videos = manifest_videos(manifest, split)
    started = time.monotonic()
    scores, plan = score_videos(settings, models, videos, run=spec.run, split=split, features=spec.features(),
                                length=spec.length, height=spec.size, width=spec.size,
                                snippets=snippets or spec.snippets, max_inflight=spec.max_inflight,
                                exclude=set(decode_quarantine(settings, spec.run)))
    runs = RunStore(settings, spec.run)
    uris = {stream: runs.save_scores(split, result) for stream, result in scores.items()}
    log(f"  scored {len(plan.videos)} {split} videos x {plan.snippets} snippets x {len(models)} streams in "
        f"{time.monotonic() - started:.1f}s" + (f" (skipped {len(plan.skipped)})" if plan.skipped else ""))
    return uris


# -- 4. fusion and report -------------------------------------------------------------------------------
def stream_scores(scores: dict[str, VideoScores]) -> StreamScores:
    """The fusion module's view of per-stream scores of one split (videos aligned by id)."""
    streams = list(scores)
    common = sorted(set.intersection(*(set(s.video_ids) for s in scores.values())))
    if not common:
        raise EsspError("the streams share no scored video")
    rows = {}
    for stream in streams:
        row_of = {video: i for i, video in enumerate(scores[stream].video_ids)}
        rows[stream] = [row_of[v] for v in common]
    first = scores[streams[0]]
    return StreamScores(video_ids=common, labels=first.labels[rows[streams[0]]],
                        scores={s: scores[s].scores[rows[s]] for s in streams},
                        snippet_features={s: scores[s].features[rows[s]] for s in streams})


def fuse_and_report(settings: Settings, spec: RunSpec, *, history: dict[str, list[dict]] | None = None,
                    log: Log = print) -> dict[str, Any]:
    """Every fusion side by side, the requested one kept; the report written to S3."""
    from essp.metrics import video_metrics
    from essp.report import build_report, summary_lines, write_report

    _, facts = load_run(settings, spec.run)
    classes = facts["classes"]
    runs = RunStore(settings, spec.run)
    test = stream_scores({s: runs.load_scores("test", s) for s in spec.streams})
    train = stream_scores({s: runs.load_scores("train", s) for s in spec.streams})
    comparison = compare_fusions(train, test, weights=spec.fusion_weights, seed=spec.seed, class_names=classes)
    fuser = make_fuser(spec.fusion, weights=spec.fusion_weights, seed=spec.seed, num_classes=len(classes))
    fuser.fit(train)
    fused = fuser.predict(test)
    selected = video_metrics(fused, test.labels, classes)
    fusion_uri = runs.save_json(f"fusion/{spec.fusion}.json", {"strategy": spec.fusion, "state": fuser.state()})
    predictions = {"video_ids": test.video_ids, "labels": [int(x) for x in test.labels],
                   "predicted": [int(x) for x in fused.argmax(1)], "strategy": spec.fusion}
    runs.save_json("predictions/test.json", predictions)
    evaluation = {"class_names": classes,
                  "streams": {s: comparison[f"stream:{s}"] for s in spec.streams},
                  "fusion": {**comparison, spec.fusion: selected}, "selected": spec.fusion}
    if history is None:
        history = {s: runs.load_checkpoint(stream=s).get("history", []) for s in spec.streams}
    report = build_report(spec.run, spec.model_dump(mode="json"), history, evaluation)
    uris = write_report(settings, report)
    for line in summary_lines(report):
        log(f"  {line}")
    return {"report": uris, "fusion_state": fusion_uri, "selected": spec.fusion, "metrics": selected,
            "summary": report["summary"]}


# -- 5. registry ----------------------------------------------------------------------------------------
def register_run(settings: Settings, spec: RunSpec, metrics: dict[str, Any], *, fusion_state: str,
                 log: Log = print) -> dict[str, Any]:
    from essp.registry import ModelRegistry

    _, facts = load_run(settings, spec.run)
    runs = RunStore(settings, spec.run)
    name = registry_name(spec, facts)
    registry = ModelRegistry(settings, name)
    production = registry.production()
    version = registry.register(
        run=spec.run, streams={s: runs.latest_checkpoint_uri(s) for s in spec.streams},
        fusion={"strategy": spec.fusion, "weights": spec.fusion_weights, "state": fusion_state},
        metrics={k: metrics[k] for k in ("top1", "top5", "mean_class_accuracy", "mAP", "videos")},
        params=spec.model_dump(mode="json"), manifest=facts["manifest_uri"], class_names=facts["classes"])
    if production is not None and production.class_names != facts["classes"]:
        # Accuracies over other classes do not compare: a person decides (ModelRegistry.promote(force=True)).
        promoted, reason = False, (f"production v{production.version} predicts other classes "
                                   f"({len(production.class_names)}: {', '.join(production.class_names[:4])}...); "
                                   "promote by hand")
    else:
        result = registry.promote(version.version, metric=spec.promote_metric)
        promoted, reason = result.promoted, result.reason
    log(f"  registered {name} v{version.version}; {'promoted to production' if promoted else 'not promoted'}: {reason}")
    return {"registry": name, "version": version.version, "promoted": promoted, "reason": reason}


def registry_name(spec: RunSpec, facts: dict[str, Any]) -> str:
    """The registry a run's model goes to: the param, else the dataset's name."""
    return spec.registry or facts.get("dataset") or "default"


# -- end to end, locally --------------------------------------------------------------------------------
def run_training(settings: Settings, spec: RunSpec, *, log: Log = print, log_dir: Path | None = None,
                 data_workers: bool = True) -> dict[str, Any]:
    """The whole run on the embedded default: local worker processes (decode, one extractor per
    stream, one trainer per stream), every epoch, scoring, fusion, report and registry."""
    from essp.localworkers import start_workers

    started = time.monotonic()
    facts = prepare_run(settings, spec)
    log(f"  run {spec.run}: {facts['train_videos']} train / {facts['test_videos']} test videos, "
        f"{len(facts['classes'])} classes, {facts['samples_per_epoch']} samples/epoch, streams "
        f"{', '.join(f'{s}:{v.arch}' for s, v in spec.streams.items())}")
    log_dir = log_dir or settings.state_dir / "logs" / spec.run
    specs: list[tuple[str, list[str]]] = []
    if data_workers:
        specs.append((f"{spec.run}-decode", ["decode"]))
        specs += [(f"{spec.run}-{s}", ["extract", "--kind", s]) for s in spec.streams]
    specs += [(f"{spec.run}-train-{s}", ["train", "--run", spec.run, "--stream", s, "--nproc", str(spec.trainer_procs)])
              for s in spec.streams]
    workers = start_workers(settings, log_dir, specs)
    timings: dict[str, float] = {}
    try:
        first = trained_epochs(settings, spec)
        if first:
            log(f"  resuming after epoch {first - 1}")
        t0 = time.monotonic()

        def alive() -> None:
            for worker in workers:
                if worker.proc.poll() is not None:
                    raise EsspError(f"run {spec.run}: worker {worker.name} exited with {worker.proc.returncode} "
                                    f"during epoch {epoch}; its log ({worker.log_path}) ends:\n{worker.log(2000)}")

        for epoch in range(first, spec.epochs):
            train_epoch(settings, spec, epoch, log=log, alive=alive)
        timings["train_s"] = time.monotonic() - t0
        for worker in workers:  # the trainers' checkpoints are in S3: free their cores for scoring
            if "-train-" in worker.name:
                worker.stop()
        t0 = time.monotonic()
        score_split(settings, spec, "test", log=log)
        score_split(settings, spec, "train", log=log)
        timings["score_s"] = time.monotonic() - t0
    finally:
        for worker in workers:
            worker.stop()
    outcome = fuse_and_report(settings, spec, log=log)
    outcome["registry"] = register_run(settings, spec, outcome["metrics"], fusion_state=outcome["fusion_state"],
                                       log=log)
    timings["total_s"] = time.monotonic() - started
    outcome["timings"] = {k: round(v, 1) for k, v in timings.items()}
    RunStore(settings, spec.run).save_json("outcome.json", json.loads(json.dumps(outcome, default=str)))
    return outcome
