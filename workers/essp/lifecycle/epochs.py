"""The master's side of a run, light (no torch): the run's spec from S3, the trainers' state in Redis,
asking for an epoch, and planning one. What the DAGs' tasks and triggers call; :mod:`essp.lifecycle.pipeline`
and :mod:`essp.training.resident` re-export it."""

from __future__ import annotations

import json
from typing import Any

from essp.clients.kafka import MessageProducer
from essp.clients.redis import redis_client
from essp.contract import ControlCommand, RedisKeys, Topics
from essp.settings import Settings
from essp.training.params import RunSpec, RunSpecError

TRAINER_FAMILY = "trainer"
STATE_TTL_S = 7 * 24 * 3600


def load_run(settings: Settings, run: str) -> tuple[RunSpec, dict[str, Any]]:
    from essp.training.artifacts import RunStore

    facts = RunStore(settings, run).load_json("spec.json")
    return RunSpec.model_validate(facts["spec"]), facts


def prepare_run(settings: Settings, spec: RunSpec) -> dict[str, Any]:
    """Check the spec against the manifest and write ``spec.json``; returns the run's facts."""
    from essp.datasets.manifest import ManifestStore
    from essp.training.artifacts import RunStore

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


def trainer_state(settings: Settings, run: str, stream: str) -> dict[str, Any]:
    """The trainer's last recorded state: status, epoch_done (-1: none yet), worker, detail, stats."""
    raw = redis_client(settings).get(RedisKeys(settings.redis_prefix).trainer(run, stream))
    return json.loads(raw) if raw else {}


def request_epoch(settings: Settings, run: str, epoch: int, expected: int) -> None:
    """Ask the run's trainers for ``epoch`` of ``expected`` samples (Redis, then a control wake-up)."""
    keys = RedisKeys(settings.redis_prefix)
    redis_client(settings).set(keys.epoch_request(run), json.dumps({"epoch": epoch, "expected": expected}),
                               ex=STATE_TTL_S)
    with MessageProducer(settings) as producer:
        producer.publish(Topics(settings.topic_prefix).control,
                         ControlCommand(command="epoch", run=run, epoch=epoch, target=TRAINER_FAMILY))


def trained_epochs(settings: Settings, spec: RunSpec) -> int:
    """Epochs every stream has finished (from the trainers' state, else their checkpoints)."""
    from essp.training.artifacts import RunStore

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


def start_epoch(settings: Settings, spec: RunSpec, epoch: int) -> int:
    """Plan and publish one epoch and ask the trainers for it (the DAG then waits on a deferrable
    trigger, :func:`essp.lifecycle.pipeline.wait_epoch_done` blocks); returns the number of samples planned."""
    from essp.dataplane.payloads import SampleStore
    from essp.dataplane.plan import decode_quarantine, plan_epoch, publish_plan
    from essp.datasets.manifest import ManifestStore

    _, facts = load_run(settings, spec.run)
    manifest = ManifestStore(settings).load(facts["manifest_uri"])
    plan = plan_epoch(manifest, run=spec.run, epoch=epoch, features=spec.features(), length=spec.length,
                      height=spec.size, width=spec.size, samples=facts["samples_per_epoch"], seed=spec.seed,
                      max_inflight=spec.max_inflight, exclude=set(decode_quarantine(settings, spec.run)))
    # A retried epoch (a trainer restarted) must be delivered again: forget its samples' progress.
    SampleStore(settings, spec.run).reset(plan.sample_ids())
    publish_plan(settings, plan)
    request_epoch(settings, spec.run, epoch, len(plan.jobs))
    return len(plan.jobs)


def plan_epoch_once(settings: Settings, spec: RunSpec, epoch: int, token: str) -> bool:
    """:func:`start_epoch`, by the first caller that gives ``token`` (the DAG run): each stream's task of
    a DAG run tries it, exactly one plans. A new DAG run (another token) plans an unfinished epoch again,
    as a restarted :func:`essp.lifecycle.pipeline.run_training` does. True if this call planned."""
    import hashlib

    digest = hashlib.sha1(token.encode()).hexdigest()[:16]
    key = f"{RedisKeys(settings.redis_prefix).prefix}:{spec.run}:planned:{epoch}:{digest}"
    if not redis_client(settings).set(key, token, nx=True, ex=int(spec.epoch_timeout_s * 2) + 3600):
        return False
    start_epoch(settings, spec, epoch)
    return True


def epoch_line(epoch: int, stream: str, figures: dict[str, Any]) -> str:
    return (f"  epoch {epoch} {stream:<5} loss {figures['loss']:.3f}  train acc {figures['accuracy']:.3f}  "
            f"{figures['samples_per_s']:.1f} samples/s  data wait {100 * figures['data_wait']:.1f}%")
