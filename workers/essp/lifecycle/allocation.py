"""Trainer slots moved between a run's streams by validation loss (the paper's §3.4).

"As different training has different rates of convergence, computing resource between them should be
allocated dynamically ... adjusted according to the validation loss ... after each training iteration."
A run has ``trainer_procs x streams`` **slots** (DDP processes: GPUs in Kubernetes, gloo processes on CPUs
locally). With ``allocation`` ``static`` each stream keeps ``trainer_procs``. With ``validation_loss`` the
master decides between epochs (:func:`decide`): each stream's recent rate of improvement is the relative fall
of its validation loss per epoch over the last ``RATE_WINDOW`` epochs (0 when it rose); a stream whose rate is
below ``CONVERGED_RATE`` has converged and its share is ``allocation_min`` slots; the slots above everyone's minimum
are shared by the streams still improving, in proportion to their rates (largest remainders, ties to the stream
listed first). Each decision moves one slot towards those shares, from the stream furthest above its share to the
one furthest below, and at most once every ``COOLDOWN`` epochs. Nothing moves while a stream has fewer than two
validated epochs, or when no stream improves.

:func:`apply_allocation` runs the decision for the epoch about to be planned (once: the planner calls it under
its lease, essp.lifecycle.epochs.plan_epoch_once's ``before``), records it in the run's ``allocation.json``
with its reason, and restarts each trainer whose slots changed with its new world size: it resumes from its
checkpoint of the epoch just finished (essp.training.trainer: every rank loads the same state; a step of W
ranks then reads ``batch_size x W`` samples). The report lists every decision.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from essp.errors import EsspError
from essp.lifecycle.params import ALLOCATIONS, RunParams
from essp.settings import Settings
from essp.training.artifacts import RunArtifactMissing, RunStore

ALLOCATION_FILE = "allocation.json"
RATE_WINDOW = 2  # epochs over which a stream's rate of improvement is measured
CONVERGED_RATE = 0.01  # a validation loss falling less than 1% an epoch has converged
# Slots move at most once every COOLDOWN epochs, one slot at a time: the rates measured across a restart (a new
# world size, so another batch) are noisy, and a restart costs a trainer's start-up (~15 s on 2 CPU cores).
COOLDOWN = 2
READY_TIMEOUT_S = 300.0

Log = Callable[[str], None]


def improvement_rate(history: list[dict[str, Any]], window: int = RATE_WINDOW) -> float | None:
    """The relative fall of the validation loss per epoch over the last ``window`` epochs (>= 0; None: fewer
    than two validated epochs)."""
    losses = [float(h["val_loss"]) for h in sorted(history, key=lambda h: int(h["epoch"]))
              if h.get("val_loss") is not None]
    if len(losses) < 2:
        return None
    span = min(window, len(losses) - 1)
    before, now = losses[-1 - span], losses[-1]
    if before <= 0:
        return 0.0
    return max(0.0, (before - now) / before / span)


def decide(histories: dict[str, list[dict[str, Any]]], current: dict[str, int], *, total: int, minimum: int = 1,
           policy: str = "validation_loss", since_move: int | None = None,
           ) -> tuple[dict[str, int], str, dict[str, float | None]]:
    """The slots of each stream for the next epoch, the reason, and each stream's rate (see the module's doc).
    ``since_move``: epochs since slots last moved (None: never)."""
    streams = list(current)
    if policy not in ALLOCATIONS:
        raise EsspError(f"allocation {policy!r}: one of {', '.join(ALLOCATIONS)}")
    if minimum * len(streams) > total:
        raise EsspError(f"allocation: {len(streams)} streams x allocation_min {minimum} slots exceed the run's "
                        f"{total} slots")
    rates = {s: improvement_rate(histories.get(s, [])) for s in streams}
    if policy == "static":
        return dict(current), "static policy: slots stay as they are", rates
    if any(r is None for r in rates.values()):
        return dict(current), "not every stream has two validated epochs yet: slots stay", rates
    improving = {s: float(r) for s, r in rates.items() if r is not None and r >= CONVERGED_RATE}
    words = ", ".join(f"{s} {100 * float(rates[s] or 0):.1f}%/epoch" for s in streams)
    if not improving:
        return dict(current), f"no stream's validation loss falls by {100 * CONVERGED_RATE:g}%/epoch ({words}): " \
                              "slots stay", rates
    if since_move is not None and since_move < COOLDOWN:
        return dict(current), f"slots moved {since_move} epoch(s) ago, at most once every {COOLDOWN} ({words}): " \
                              "they stay", rates
    spare = total - minimum * len(streams)
    weight = sum(improving.values())
    shares = {s: spare * improving.get(s, 0.0) / weight for s in streams}
    target = {s: minimum + int(shares[s]) for s in streams}
    left = total - sum(target.values())
    for s in sorted(streams, key=lambda s: (-(shares[s] - int(shares[s])), streams.index(s)))[:left]:
        target[s] += 1
    slots = dict(current)
    if sum(current.values()) != total:
        slots = dict(target)
    else:  # one slot a decision, from the stream furthest above its share to the one furthest below
        giver = max(streams, key=lambda s: (slots[s] - target[s], -streams.index(s)))
        taker = max(streams, key=lambda s: (target[s] - slots[s], -streams.index(s)))
        if slots[giver] > target[giver] and slots[taker] < target[taker]:
            slots[giver] -= 1
            slots[taker] += 1
    converged = [s for s in streams if s not in improving]
    reason = f"validation loss falling {words}"
    if converged:
        reason += f"; converged: {', '.join(converged)}"
    moved = slots != current
    reason += f" -> {', '.join(f'{s} {n}' for s, n in slots.items())} slot(s)" + ("" if moved else " (as before)")
    if moved and slots != target:
        reason += f", towards {', '.join(f'{s} {n}' for s, n in target.items())}"
    return slots, reason, rates


def allocation_record(settings: Settings, run: str) -> dict[str, Any] | None:
    try:
        return RunStore(settings, run).load_json(ALLOCATION_FILE)
    except RunArtifactMissing:
        return None


def current_slots(settings: Settings, spec: RunParams) -> dict[str, int]:
    """Each stream's slots now: the last decision's, else ``trainer_procs``."""
    record = allocation_record(settings, spec.run_id())
    if record and record.get("decisions"):
        return {s: int(n) for s, n in record["decisions"][-1]["slots"].items()}
    return {s: spec.trainer_procs for s in spec.streams}


def apply_allocation(settings: Settings, spec: RunParams, epoch: int, *, log: Log = print,
                     resize: Callable[[str, int], None] | None = None) -> dict[str, Any] | None:
    """Before planning ``epoch`` (>= 1): decide the slots from the streams' histories, record the decision, and
    restart every trainer whose slots changed (``resize(stream, slots)``; default: the fleet's). Idempotent per
    epoch: a decision already recorded for ``epoch`` is applied again, not made again. None: static policy."""
    if spec.allocation == "static" or epoch < 1:
        return None
    from essp.lifecycle.progress import stream_histories

    runs = RunStore(settings, spec.run_id())
    record = allocation_record(settings, spec.run_id()) or {
        "policy": spec.allocation, "total": spec.trainer_procs * len(spec.streams), "minimum": spec.allocation_min,
        "initial": {s: spec.trainer_procs for s in spec.streams}, "decisions": []}
    decided = next((d for d in record["decisions"] if int(d["epoch"]) == epoch), None)
    before = current_slots(settings, spec) if decided is None else {
        s: int(n) for s, n in (record["decisions"][record["decisions"].index(decided) - 1]["slots"]
                               if record["decisions"].index(decided) else record["initial"]).items()}
    if decided is None:
        histories = {s: [h for h in hs if int(h["epoch"]) < epoch]
                     for s, hs in stream_histories(settings, spec.run_id(), spec.streams).items()}
        moves = [int(d["epoch"]) for d in record["decisions"] if d.get("moved")]
        slots, reason, rates = decide(histories, before, total=record["total"], minimum=record["minimum"],
                                      policy=spec.allocation, since_move=epoch - moves[-1] if moves else None)
        decided = {"epoch": epoch, "after_epoch": epoch - 1, "slots": slots, "before": before, "reason": reason,
                   "rates": rates, "moved": slots != before, "at": time.time()}
        record["decisions"].append(decided)
        runs.save_json(ALLOCATION_FILE, record)
    log(f"  allocation before epoch {epoch}: {decided['reason']}")
    resize = resize or (lambda stream, n: resize_trainer(settings, spec, stream, n))
    moves = [(s, int(decided["slots"][s]), int(before[s])) for s in spec.streams if decided["slots"][s] != before[s]]
    for stream, slots, was in sorted(moves, key=lambda m: m[1] - m[2]):  # shrink first: their GPUs free the others'
        log(f"  {stream} trainer: {was} -> {slots} process(es), resuming from its checkpoint")
        resize(stream, slots)
    return decided


def resize_trainer(settings: Settings, spec: RunParams, stream: str, slots: int) -> None:
    """Restart the run's trainer of ``stream`` with ``slots`` processes and wait until it serves (it resumes from
    its latest checkpoint): locally a new process, in Kubernetes its Deployment patched (one GPU a process)."""
    from essp.deploy import fleet
    from essp.lifecycle.epochs import trainer_states

    run = spec.run_id()
    old = trainer_states(settings, run, [stream])[stream]
    asked = time.time()
    if fleet.worker_mode(settings) == "kubernetes":
        from essp.deploy.kube import KubeWorkers

        KubeWorkers(settings.k8s_namespace).ensure_trainer(run, stream, nproc=slots,
                                                           gpus=settings.k8s_trainer_gpus and spec.device != "cpu")
    else:
        local = fleet.LocalFleet(settings)
        local.release_trainer(run, stream)
        local.ensure_trainer(run, stream, nproc=slots)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        state = trainer_states(settings, run, [stream])[stream]
        if (state is not None and state.status == "ready" and (state.updated_at or 0) >= asked
                and (old is None or state.worker != old.worker or state.resumed_from)):
            return
        time.sleep(0.5)
    raise EsspError(f"run {run}: the {stream} trainer restarted with {slots} process(es) did not report ready within "
                    f"{READY_TIMEOUT_S:.0f}s; see its log (essp logs)")
