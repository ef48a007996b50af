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
from typing import Any

from essp.dataplane.plan import decode_quarantine
from essp.datasets.manifest import ManifestStore
from essp.errors import EsspError
from essp.evaluation.fusion import StreamScores, compare_fusions, make_fuser
from essp.evaluation.scoring import manifest_videos
from essp.evaluation.scoring import score_split as score_videos
from essp.settings import Settings
from essp.training.artifacts import RunStore, VideoScores
from essp.training.epochs import (  # noqa: F401 - re-exported
    epoch_line,
    load_run,
    plan_epoch_once,
    prepare_run,
    request_epoch,
    start_epoch,
    trained_epochs,
    trainer_state,
)
from essp.training.models import build_model
from essp.training.params import RunSpec, RunSpecError, StreamSpec, parse_spec  # noqa: F401 - re-exported
from essp.training.resident import TrainSpec

Log = Callable[[str], None]


# -- 1. prepare ---------------------------------------------------------------------------------------
def train_spec(settings: Settings, run: str, stream: str) -> TrainSpec:
    """What the resident trainer of ``stream`` needs, read from the run's ``spec.json`` in S3."""
    spec, facts = load_run(settings, run)
    if stream not in spec.streams:
        raise RunSpecError(f"run {run} has no stream {stream!r} (streams: {', '.join(spec.streams)})")
    return TrainSpec(run=run, stream=stream, num_classes=len(facts["classes"]), length=spec.length,
                     params=spec.train_params(stream))


# -- 2. one epoch -------------------------------------------------------------------------------------
def train_epoch(settings: Settings, spec: RunSpec, epoch: int, *, log: Log = print,
                alive: Callable[[], None] | None = None) -> dict[str, Any]:
    """Plan, publish and train one epoch on every stream; returns each stream's figures."""
    start_epoch(settings, spec, epoch)
    return wait_epoch_done(settings, spec.run, list(spec.streams), epoch, timeout_s=spec.epoch_timeout_s, log=log,
                           alive=alive)


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
    from essp.training.trainer import resolve_device

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
    from essp.evaluation.metrics import video_metrics
    from essp.evaluation.report import build_report, summary_lines, write_report

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
    from essp.lifecycle.model_registry import ModelRegistry

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
    from essp.deploy.local import start_workers

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
