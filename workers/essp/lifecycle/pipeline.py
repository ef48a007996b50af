"""A two-stream training run, step by step: what the `essp_train` DAG's stages call (each task's stage
has the same name as the function here that does its work), and what `essp train` runs end to end on
the embedded default.

Steps (each a plain function over the settings and the run's :class:`RunParams`, small JSON out):

1. :func:`essp.lifecycle.epochs.verify_manifest` checks the params against the manifest and writes
   ``spec.json`` to the run's folder in S3 (the trainers read it from there, as pods would).
2. :func:`train_epoch` plans one epoch, publishes it, asks the resident trainers for it and waits for
   every stream's ``epoch_done`` (the DAG defers instead of waiting, see essp.operators.training).
3. :func:`score_split` scores the test videos (and the validation videos, for the learned fusions)
   with each stream's final checkpoint, 25 evenly spaced snippets per video, through the workers.
4. :func:`fuse_and_report` scores every fusion strategy side by side (the learned ones fitted on the
   validation videos only), keeps the requested one, writes the report (JSON + plots) to S3.
5. :func:`register_model` records the model in the registry and promotes it if it beats production.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from essp.dataplane.plan import decode_quarantine
from essp.datasets.manifest import ManifestStore
from essp.datasets.validation import VAL_SPLIT
from essp.deploy.fleet import LocalFleet
from essp.deploy.local import LocalProcess, LocalProcesses, stop_together, trainer_args, trainer_name
from essp.errors import EsspError
from essp.evaluation.fusion import FUSIONS, StreamScores, compare_fusions, make_fuser
from essp.evaluation.metrics import SUMMARY_METRICS
from essp.evaluation.scoring import manifest_videos
from essp.evaluation.scoring import score_split as score_videos
from essp.lifecycle.allocation import allocation_record, apply_allocation, current_slots
from essp.lifecycle.epochs import (
    early_stop_after,
    early_stopped,
    load_run,
    start_epoch,
    trained_epochs,
    verify_manifest,
    wait_epoch_done,
)
from essp.lifecycle.params import RunParams, RunParamsError
from essp.lifecycle.progress import REGISTRATION_FILE, ScoringRecorder
from essp.settings import Settings
from essp.training.artifacts import RunStore, VideoScores
from essp.training.models import build_model
from essp.training.resident import TrainSpec
from essp.training.validation import ValidationSpec, best_epoch

Log = Callable[[str], None]
# What the learned fusions are fitted on: the validation videos (essp.datasets.validation), never a training
# or a test video.
FUSION_FIT_SPLIT = VAL_SPLIT


# -- 1. the trainers' view of a run -------------------------------------------------------------------
def train_spec(settings: Settings, run: str, stream: str) -> TrainSpec:
    """What the resident trainer of ``stream`` needs, read from the run's ``spec.json`` in S3."""
    spec, facts = load_run(settings, run)
    if stream not in spec.streams:
        raise RunParamsError(f"run {run} has no stream {stream!r} (streams: {', '.join(spec.streams)})")
    return TrainSpec(run=run, stream=stream, num_classes=len(facts["classes"]), length=spec.length,
                     params=spec.train_params(stream), validation=validation_spec(settings, spec, facts))


def validation_spec(settings: Settings, spec: RunParams, facts: dict[str, Any]) -> ValidationSpec | None:
    """The snippets the run's trainers score after each epoch: ``val_snippets`` of each video of the manifest's
    validation split (None for a run whose spec.json predates validation splits)."""
    if not facts.get("val_videos"):
        return None
    manifest = ManifestStore(settings).load(facts["manifest_uri"])
    videos = [(v.id, v.uri, v.label, v.frames) for v in sorted(manifest.split(VAL_SPLIT), key=lambda v: v.id)]
    return ValidationSpec(run=spec.run_id(), videos=videos, snippets=spec.val_snippets, features=spec.features(),
                          length=spec.length, height=spec.size, width=spec.size, max_inflight=spec.max_inflight)


# -- 2. one epoch -------------------------------------------------------------------------------------
def train_epoch(settings: Settings, spec: RunParams, epoch: int, *, log: Log = print,
                alive: Callable[[], None] | None = None) -> dict[str, Any]:
    """Plan, publish and train one epoch on every stream; returns each stream's figures."""
    start_epoch(settings, spec, epoch)
    return wait_epoch_done(settings, spec.run_id(), spec.streams, epoch, timeout_s=spec.epoch_timeout_s, log=log,
                           alive=alive)


# -- 3. scoring ---------------------------------------------------------------------------------------
def load_stream_models(settings: Settings, spec: RunParams, num_classes: int, device: str = "cpu") -> dict[str, Any]:
    """Each stream's model with the weights of its latest checkpoint, in eval mode."""
    import torch

    runs = RunStore(settings, spec.run_id())
    models = {}
    for stream in spec.streams:
        state = runs.load_checkpoint(scored_checkpoint(runs, spec, stream), stream=stream)
        model = build_model(spec.stream(stream).arch, stream, num_classes=num_classes, length=spec.length)
        model.load_state_dict(state["model"])
        models[stream] = model.to(torch.device(device)).eval()
    return models


def scored_checkpoint(runs: RunStore, spec: RunParams, stream: str) -> str | None:
    """The checkpoint of ``stream`` that scores the videos: with ``score_checkpoint`` "best", the one of the epoch of
    lowest validation loss (every epoch's is kept), else the latest (None)."""
    if spec.score_checkpoint != "best":
        return None
    best = best_epoch((runs.latest_pointer(stream) or {}).get("history", []))
    return None if best is None else runs.epoch_checkpoint_uri(stream, int(best["epoch"]))


def score_split(settings: Settings, spec: RunParams, split: str, *, snippets: int | None = None,
                log: Log = print) -> dict[str, str]:
    """Score every video of ``split`` per stream and store the scores; returns their URIs."""
    _, facts = load_run(settings, spec.run_id())
    manifest = ManifestStore(settings).load(facts["manifest_uri"])
    from essp.training.trainer import resolve_device

    models = load_stream_models(settings, spec, len(facts["classes"]), device=str(resolve_device(spec.device)))
    videos = manifest_videos(manifest, split)
    started = time.monotonic()
    recorder = ScoringRecorder(settings, spec.run_id(), split)
    scores, plan = score_videos(settings, models, videos, run=spec.run_id(), split=split, features=spec.features(),
                                length=spec.length, height=spec.size, width=spec.size,
                                snippets=snippets or spec.snippets, max_inflight=spec.max_inflight,
                                exclude=set(decode_quarantine(settings, spec.run_id())), progress=recorder)
    runs = RunStore(settings, spec.run_id())
    uris = {stream: runs.save_scores(split, result) for stream, result in scores.items()}
    recorder(len(plan.videos), len(plan.videos), finished=True)
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


def fuse_and_report(settings: Settings, spec: RunParams, *, history: dict[str, list[dict]] | None = None,
                    log: Log = print) -> dict[str, Any]:
    """Every fusion side by side, the requested one kept; the report written to S3."""
    from essp.evaluation.metrics import video_metrics
    from essp.evaluation.report import build_report, summary_lines, write_report

    _, facts = load_run(settings, spec.run_id())
    classes = facts["classes"]
    runs = RunStore(settings, spec.run_id())
    test = stream_scores({s: runs.load_scores("test", s) for s in spec.streams})
    # the learned fusions are fitted on held-out videos: on the training videos every stream looks perfect
    held_out = stream_scores({s: runs.load_scores(FUSION_FIT_SPLIT, s) for s in spec.streams})
    comparison = compare_fusions(held_out, test, weights=spec.fusion_weights, seed=spec.seed, class_names=classes)
    fuser = make_fuser(spec.fusion, weights=spec.fusion_weights, seed=spec.seed, num_classes=len(classes))
    fuser.fit(held_out)
    fused = fuser.predict(test)
    selected = video_metrics(fused, test.labels, classes)
    fusion_uri = runs.save_json(f"fusion/{spec.fusion}.json", {"strategy": spec.fusion, "state": fuser.state()})
    predictions = {"video_ids": test.video_ids, "labels": [int(x) for x in test.labels],
                   "predicted": [int(x) for x in fused.argmax(1)], "strategy": spec.fusion}
    runs.save_json("predictions/test.json", predictions)
    evaluation = {"class_names": classes,
                  "streams": {s: comparison[f"stream:{s}"] for s in spec.streams},
                  "fusion": {**comparison, spec.fusion: selected}, "selected": spec.fusion,
                  # which videos each fusion saw: the fixed rules none, the learned ones the held-out videos
                  "fusion_fit": {"split": FUSION_FIT_SPLIT, "videos": list(held_out.video_ids),
                                 "strategies": [s for s in FUSIONS.names() if FUSIONS.get(s).learned]}}
    if history is None:
        history = {s: runs.load_checkpoint(stream=s).get("history", []) for s in spec.streams}
    report = build_report(spec.run_id(), spec.model_dump(mode="json"), history, evaluation)
    # every slot decision with its reason (essp.lifecycle.allocation), and whether the run stopped early
    report["allocation"] = allocation_record(settings, spec.run_id()) or {"policy": spec.allocation, "decisions": []}
    report["early_stop"] = early_stopped(settings, spec.run_id())
    uris = write_report(settings, report)
    for line in summary_lines(report):
        log(f"  {line}")
    return {"report": uris, "fusion_state": fusion_uri, "selected": spec.fusion, "metrics": selected,
            "summary": report["summary"]}


# -- 5. registry ----------------------------------------------------------------------------------------
def register_model(settings: Settings, spec: RunParams, metrics: dict[str, Any], *, fusion_state: str,
                   log: Log = print) -> dict[str, Any]:
    """Record the run's model (checkpoints, fusion, metrics, params, dataset) as a new registry version and
    promote it if it beats production on the promotion metric."""
    from essp.lifecycle.model_registry import ModelRegistry

    _, facts = load_run(settings, spec.run_id())
    runs = RunStore(settings, spec.run_id())
    name = registry_name(spec, facts)
    registry = ModelRegistry(settings, name)
    production = registry.production()
    version = registry.register(
        run=spec.run_id(), streams={s: scored_checkpoint(runs, spec, s) or runs.latest_checkpoint_uri(s)
                                    for s in spec.streams},
        fusion={"strategy": spec.fusion, "weights": spec.fusion_weights, "state": fusion_state},
        metrics={k: metrics[k] for k in (*SUMMARY_METRICS, "videos")},
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
    outcome = {"registry": name, "version": version.version, "promoted": promoted, "reason": reason}
    # next to the report, for its first card (essp.orchestration.webui): the report is written before this
    runs.save_json(REGISTRATION_FILE, {**outcome, "metric": spec.promote_metric, "registered_at": time.time()})
    return outcome


def registry_name(spec: RunParams, facts: dict[str, Any]) -> str:
    """The registry a run's model goes to: the param, else the dataset's name."""
    return spec.registry or facts.get("dataset") or "default"


# -- end to end, locally --------------------------------------------------------------------------------
def run_training(settings: Settings, spec: RunParams, *, log: Log = print, data_workers: bool = True,
                 on_epoch: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """The whole run on the embedded default: resident workers as local processes (at least one decode
    worker and one extractor per stream, started here unless running; one trainer per stream), every epoch
    (with ``allocation`` validation_loss, trainer slots moved between epochs), scoring, fusion, report and
    registry. What it started, it stops. ``on_epoch(epoch, seconds of training so far)`` is called after each
    epoch."""
    run = spec.run_id()
    started = time.monotonic()
    facts = verify_manifest(settings, spec)
    log(f"  run {run}: {facts['train_videos']} train / {facts['test_videos']} test videos, "
        f"{len(facts['classes'])} classes, {facts['samples_per_epoch']} samples/epoch, streams "
        f"{', '.join(f'{s}:{spec.stream(s).arch}' for s in spec.streams)}")
    processes = LocalProcesses(settings)
    workers: list[LocalProcess] = []
    if data_workers:  # at least one of each kind the run needs; shared workers of these settings serve it too
        scaled = LocalFleet(settings).scale({kind: 1 for kind in ["decode", *spec.streams]}, at_least=True)
        new = [name for done in scaled.values() for name in done["started"]]
        workers += [w for w in (processes.find(name) for name in new) if w is not None]
    try:
        slots = current_slots(settings, spec)  # a resumed run whose slots moved starts each trainer with its own
        workers += processes.start([(trainer_name(run, s), trainer_args(run, s, slots[s])) for s in spec.streams])
    except BaseException:
        stop_together(workers)
        raise
    timings: dict[str, float] = {}
    epoch = 0
    try:
        first = trained_epochs(settings, spec)
        if first:
            log(f"  resuming after epoch {first - 1}")
        t0 = time.monotonic()

        def alive() -> None:
            for worker in workers:
                if not worker.alive():
                    raise EsspError(f"run {run}: worker {worker.name} exited with {worker.returncode()} during "
                                    f"epoch {epoch}; its log ({worker.log_path}) ends:\n{worker.tail(30)}")

        for epoch in range(first, spec.epochs if early_stopped(settings, run) is None else first):
            if apply_allocation(settings, spec, epoch, log=log) is not None:  # trainers restarted: follow the new
                workers = [processes.find(w.name) or w for w in workers]
            train_epoch(settings, spec, epoch, log=log, alive=alive)
            if on_epoch is not None:
                on_epoch(epoch, time.monotonic() - t0)
            stop = early_stop_after(settings, spec, epoch)
            if stop is not None:
                log(f"  stopped early after epoch {epoch}: {stop['reason']}")
                break
        timings["train_s"] = time.monotonic() - t0
        stop_together(_trainers(workers, run))  # their checkpoints are in S3: free their cores for scoring
        t0 = time.monotonic()
        score_split(settings, spec, "test", log=log)
        score_split(settings, spec, FUSION_FIT_SPLIT, log=log)
        timings["score_s"] = time.monotonic() - t0
    finally:
        stop_together(workers)
    outcome = fuse_and_report(settings, spec, log=log)
    outcome["registry"] = register_model(settings, spec, outcome["metrics"], fusion_state=outcome["fusion_state"],
                                         log=log)
    timings["total_s"] = time.monotonic() - started
    outcome["timings"] = {k: round(v, 1) for k, v in timings.items()}
    RunStore(settings, run).save_json("outcome.json", json.loads(json.dumps(outcome, default=str)))
    return outcome


def _trainers(workers: list[LocalProcess], run: str) -> list[LocalProcess]:
    return [w for w in workers if w.name.startswith(trainer_name(run, ""))]
