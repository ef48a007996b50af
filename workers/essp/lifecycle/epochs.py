"""The master's side of a run's epochs, light (no torch): the run's params and facts in S3, checking them
against the manifest (:func:`verify_manifest`), the trainers' state in Redis, asking the trainers for
an epoch, planning it once per DAG run, and waiting for it. The DAGs' tasks and the epoch trigger call
these; so do `essp train` and the UI. Whether an epoch is done is :func:`essp.contract.epoch_progress`."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from essp.clients.kafka import MessageProducer
from essp.clients.redis import redis_client
from essp.contract import (
    TRAINER_FAMILY,
    TRAINER_STATE_TTL_S,
    ControlCommand,
    EpochProgress,
    RedisKeys,
    Topics,
    TrainerState,
    epoch_progress,
)
from essp.dataplane.payloads import SampleStore
from essp.dataplane.plan import decode_quarantine, plan_epoch, publish_plan
from essp.dataplane.resident import RunControl
from essp.datasets.manifest import Manifest, ManifestStore
from essp.datasets.validation import DEFAULT_VAL_FRACTION, VAL_SPLIT, carve_validation, needs_carving
from essp.errors import EsspError
from essp.lifecycle.liveness import observe_pause, silent_trainers_now
from essp.lifecycle.params import RunParams, RunParamsError, parse_params
from essp.settings import Settings
from essp.training.artifacts import PretrainedRefused, RunArtifactMissing, RunStore, check_pretrained
from essp.training.validation import best_epoch, epochs_without_improvement

Log = Callable[[str], None]


def load_run(settings: Settings, run: str) -> tuple[RunParams, dict[str, Any]]:
    """The run's params and facts, as :func:`verify_manifest` wrote them to ``spec.json``."""
    facts = RunStore(settings, run).load_json("spec.json")
    return parse_params(facts["spec"]), facts


def verify_manifest(settings: Settings, spec: RunParams) -> dict[str, Any]:
    """Check the params against the dataset's manifest and write ``spec.json`` to the run's folder in S3
    (the trainers read it there, as pods would); returns the run's facts."""
    for stream, source in spec.pretrained.items():
        try:
            check_pretrained(source, settings)
        except PretrainedRefused as exc:
            raise RunParamsError(f"pretrained.{stream}: {exc}") from None
    store = ManifestStore(settings)
    manifest_uri = store.resolve(spec.dataset)
    manifest = store.load(manifest_uri)
    view = spec.split is not None
    if view:  # one of the dataset's UCF splits: the run keeps its view of the manifest as its own copy
        try:
            manifest = manifest.for_split(spec.split)
        except EsspError as exc:
            raise RunParamsError(f"split: {exc}") from None
    if view or ("train" in manifest.splits and needs_carving(manifest, spec.val_fraction)):
        manifest, manifest_uri = _with_validation(settings, spec, manifest, own_copy=view)
    train = manifest.split("train") if "train" in manifest.splits else []
    test = manifest.split("test") if "test" in manifest.splits else []
    val = manifest.split(VAL_SPLIT) if VAL_SPLIT in manifest.splits else []
    if not train or not test:
        raise RunParamsError(f"dataset: manifest {manifest_uri}: a training run needs a train and a test split "
                             f"(train {len(train)}, test {len(test)} videos)")
    if len(manifest.classes) < 2:
        raise RunParamsError(f"dataset: manifest {manifest_uri}: {len(manifest.classes)} class; at least 2 are "
                             "needed")
    if not val:
        raise RunParamsError(f"dataset: manifest {manifest_uri}: no validation video (val_fraction "
                             f"{manifest.val_fraction} of each class's training groups; a class needs two training "
                             "groups, or two clips, to give one): add videos")
    facts = {"spec": spec.model_dump(mode="json"), "manifest_uri": manifest_uri, "dataset": manifest.name,
             "classes": manifest.classes, "train_videos": len(train), "val_videos": len(val),
             "test_videos": len(test), "val_fraction": manifest.val_fraction, "split": spec.split,
             "samples_per_epoch": spec.samples_per_epoch or len(train)}
    RunStore(settings, spec.run_id()).save_json("spec.json", facts)
    return facts


def _with_validation(settings: Settings, spec: RunParams, manifest: Manifest, *,
                     own_copy: bool = False) -> tuple[Manifest, str]:
    """``manifest`` with a validation split of the run's ``val_fraction`` (the manifest's own, else the default):
    saved as the dataset's next version when ``manifest`` is its latest, else (a pinned older version, which a
    new latest must not be made from) as the run's own copy, ``manifest.json`` in the run's folder."""
    fraction = spec.val_fraction or manifest.val_fraction or DEFAULT_VAL_FRACTION
    carved = carve_validation(manifest, fraction).model_copy(update={"version": 0, "created_at": time.time()})
    store = ManifestStore(settings)
    if not own_copy and store.latest_version(manifest.name) == manifest.version:
        uri = store.save(carved)
        return store.load(uri), uri
    uri = RunStore(settings, spec.run_id()).save_json("manifest.json", carved.model_copy(
        update={"version": manifest.version}).model_dump(mode="json"))
    return store.load(uri), uri


def trainer_states(settings: Settings, run: str, streams: list[str]) -> dict[str, TrainerState | None]:
    """Each stream's trainer state as last recorded (None: none yet, or unreadable)."""
    keys = RedisKeys(settings.redis_prefix)
    raws = redis_client(settings).mget([keys.trainer(run, s) for s in streams])
    return {stream: TrainerState.parse(raw) for stream, raw in zip(streams, raws, strict=True)}


def epoch_status(settings: Settings, run: str, streams: list[str], epoch: int, *,
                 gone: dict[str, str] | None = None, overdue_s: float | None = None) -> EpochProgress:
    """:func:`essp.contract.epoch_progress` over the trainers' states and the run's state, read now; a trainer
    dead by its heartbeats (:func:`essp.lifecycle.liveness.silent_trainers`) is gone."""
    states = trainer_states(settings, run, streams)
    gone = {**silent_trainers_now(settings, states, epoch), **(gone or {})}
    return epoch_progress(run, epoch, states, run_state=RunControl(settings).get(run, fresh=True), gone=gone,
                          overdue_s=overdue_s)


def request_epoch(settings: Settings, run: str, epoch: int, expected: int) -> None:
    """Ask the run's trainers for ``epoch`` of ``expected`` samples (Redis, then a control wake-up)."""
    keys = RedisKeys(settings.redis_prefix)
    # attempt: a new one for every request, so that the epoch's validation is published once per request
    request = {"epoch": epoch, "expected": expected, "attempt": uuid.uuid4().hex[:12]}
    redis_client(settings).set(keys.epoch_request(run), json.dumps(request), ex=TRAINER_STATE_TTL_S)
    with MessageProducer(settings) as producer:
        producer.publish(Topics(settings.topic_prefix).control,
                         ControlCommand(command="epoch", run=run, epoch=epoch, target=TRAINER_FAMILY))


EARLY_STOP_FILE = "early_stop.json"


def early_stopped(settings: Settings, run: str) -> dict[str, Any] | None:
    """The run's early-stop record (``early_stop.json``: the epoch after which it stopped and why), if any."""
    runs = RunStore(settings, run)
    try:
        return runs.load_json(EARLY_STOP_FILE)
    except RunArtifactMissing:
        return None


def early_stop_after(settings: Settings, spec: RunParams, epoch: int) -> dict[str, Any] | None:
    """After ``epoch`` (done by every stream): with ``early_stop_patience``, whether no stream's validation loss
    has improved for that many epochs; if so the record is written (every caller computes the same one from
    the streams' histories in their checkpoint pointers) and returned. None: train on."""
    if spec.early_stop_patience < 1 or epoch + 1 >= spec.epochs:
        return None
    runs = RunStore(settings, spec.run_id())
    stale: dict[str, dict[str, Any]] = {}
    for stream in spec.streams:
        pointer = runs.latest_pointer(stream) or {}
        history = [h for h in pointer.get("history", []) if int(h["epoch"]) <= epoch]
        best = best_epoch(history)
        if best is None or epochs_without_improvement(history) < spec.early_stop_patience:
            return None
        stale[stream] = {"best_epoch": int(best["epoch"]), "best_val_loss": best["val_loss"]}
    bests = ", ".join(f"{s} epoch {b['best_epoch']}" for s, b in stale.items())
    record = {"epoch": epoch, "patience": spec.early_stop_patience, "streams": stale,
              "reason": f"no stream's validation loss improved for {spec.early_stop_patience} epoch(s) (best: {bests})"}
    runs.save_json(EARLY_STOP_FILE, record)
    return record


def trained_epochs(settings: Settings, spec: RunParams) -> int:
    """Epochs every stream has finished (from the trainers' state, else their checkpoints)."""
    done = []
    runs = RunStore(settings, spec.run_id())
    for stream, state in trainer_states(settings, spec.run_id(), spec.streams).items():
        if state is not None:
            done.append(state.epoch_done + 1)
            continue
        pointer = runs.latest_pointer(stream)  # its "epoch" is the next one to train, as in the checkpoint
        done.append(0 if pointer is None else int(pointer["epoch"]))
    return min(done)


def start_epoch(settings: Settings, spec: RunParams, epoch: int) -> int:
    """Plan and publish one epoch (the paper's §3.2, skipping videos decode quarantined) and ask the trainers
    for it; returns the number of samples planned. The DAG then waits on a deferrable trigger,
    :func:`wait_epoch_done` blocks."""
    run = spec.run_id()
    _, facts = load_run(settings, run)
    manifest = ManifestStore(settings).load(facts["manifest_uri"])
    plan = plan_epoch(manifest, run=run, epoch=epoch, features=spec.features(), length=spec.length,
                      height=spec.size, width=spec.size, samples=facts["samples_per_epoch"], seed=spec.seed,
                      max_inflight=spec.max_inflight, exclude=set(decode_quarantine(settings, run)))
    # A retried epoch (a trainer restarted) must be delivered again: forget its samples' progress.
    SampleStore(settings, run).reset(plan.sample_ids())
    publish_plan(settings, plan)
    request_epoch(settings, run, epoch, len(plan.jobs))
    return len(plan.jobs)


# How long a planner holds an epoch's marker while it plans and publishes (an epoch of the largest size
# plans in well under this); a planner that died meanwhile is replaced when its lease lapses.
PLAN_LEASE_S = 600
_PLANNING = "planning "
# Delete the marker only while it is still this planner's lease (a lapsed lease may be another's now).
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def plan_epoch_once(settings: Settings, spec: RunParams, epoch: int, token: str, *, planner: str = "",
                    lease_s: float = PLAN_LEASE_S, poll_s: float = 0.5,
                    before: Callable[[], None] | None = None) -> bool:
    """:func:`start_epoch`, by the first caller that gives ``token`` (the DAG run): each stream's task of
    a DAG run tries it, exactly one plans. A new DAG run (another token) plans an unfinished epoch again,
    as a restarted :func:`essp.lifecycle.pipeline.run_training` does. True if this call planned.

    The marker says "planned" only once the epoch is published: while a caller plans it holds a lease
    (``planner`` names it, e.g. the task and its try), which it gives back if planning fails (S3 or Kafka
    away), so the next try plans the epoch again instead of finding it "planned" and waiting for samples
    that were never sent. The others wait while a lease is held; a lease whose holder died lapses after
    ``lease_s``, at once when the holder was an earlier try of the same task (``planner`` "task#try").
    ``before`` runs first, under the lease: only the caller that plans runs it (e.g. restarting a trainer)."""
    digest = hashlib.sha1(token.encode()).hexdigest()[:16]
    key = RedisKeys(settings.redis_prefix).epoch_planned(spec.run_id(), epoch, digest)
    client = redis_client(settings)
    mine = f"{_PLANNING}{planner or '-'} {uuid.uuid4().hex}"
    deadline = time.monotonic() + lease_s + 5
    while not client.set(key, mine, nx=True, ex=max(1, int(lease_s))):
        held = (client.get(key) or b"").decode()
        if not held:
            continue  # given back or lapsed meanwhile: try again
        if not held.startswith(_PLANNING):
            return False  # published by another caller of this DAG run
        holder = held[len(_PLANNING):].rsplit(" ", 1)[0]
        if _earlier_try(holder, planner) and client.eval(_RELEASE, 1, key, held):
            continue  # an earlier try of this very task died while planning: its lease is void
        if time.monotonic() > deadline:
            raise EsspError(f"run {spec.run_id()}: epoch {epoch} is being planned by {holder} for over "
                            f"{lease_s:.0f}s; is that task still running?")
        time.sleep(poll_s)
    try:
        if before is not None:
            before()
        start_epoch(settings, spec, epoch)
    except BaseException:
        client.eval(_RELEASE, 1, key, mine)  # not published: the next try plans it again
        raise
    client.set(key, f"published by {planner or token}", ex=int(spec.epoch_timeout_s * 2) + 3600)
    return True


def _earlier_try(holder: str, planner: str) -> bool:
    """Whether ``holder`` ("task#try") is an earlier try of the task ``planner`` names (then it is dead:
    Airflow runs one try of a task at a time)."""
    task, _, tried = holder.rpartition("#")
    own, _, trying = planner.rpartition("#")
    return bool(task) and task == own and tried.isdigit() and trying.isdigit() and int(tried) < int(trying)


def wait_epoch_done(settings: Settings, run: str, streams: list[str], epoch: int, *, timeout_s: float = 1800,
                    poll_s: float = 0.5, log: Log = print, alive: Callable[[], None] | None = None) -> dict[str, Any]:
    """Block until every stream's trainer finished ``epoch`` (what the epoch trigger waits for without
    blocking); returns each stream's figures. ``alive`` raises when a process the run depends on has died
    (local runs watch their workers). Paused time does not count towards the timeout."""
    started, shown = time.monotonic(), set()
    base = observe_pause(settings, run)
    while True:
        paused_s = observe_pause(settings, run) - base  # the run's pause ledger, as the epoch trigger reads it
        overdue = time.monotonic() - started - paused_s > timeout_s
        progress = epoch_status(settings, run, streams, epoch, overdue_s=timeout_s if overdue else None)
        for stream, figures in progress.done.items():
            if stream not in shown and figures:
                log(epoch_line(epoch, stream, figures))
            shown.add(stream)
        if progress.status == "done":
            return progress.done
        if progress.over:
            raise EsspError(f"run {run}: {progress.detail}")
        if alive is not None:
            alive()
        time.sleep(poll_s)


def epoch_line(epoch: int, stream: str, figures: dict[str, Any]) -> str:
    line = (f"  epoch {epoch} {stream:<5} loss {figures['loss']:.3f}  train acc {figures['accuracy']:.3f}  "
            f"{figures['samples_per_s']:.1f} samples/s  data wait {100 * figures['data_wait']:.1f}%")
    if figures.get("val_loss") is not None:
        line += (f"  | val loss {figures['val_loss']:.3f}  val top-1 {figures['val_top1']:.3f}  "
                 f"val mean class acc {figures['val_mean_class_accuracy']:.3f} ({figures.get('val_videos', 0)} videos)")
    return line
