"""Where the streaming plane's CPU goes, per delivered sample: every process involved (the workers, the
consumer in this process, the local Redis, Tansu and SeaweedFS), split into **work** (decode and feature
extraction: the workers' own ``work_cpu_s`` counters, thread CPU inside ``decode_segment`` and
``extractor.extract``) and **overhead** (everything else: Kafka clients and broker, Redis clients and
server, S3, serialisation, the consumer). The counters come from each worker's last event in Redis
(``RedisKeys.worker``): a worker writes one (detail ``idle``) as soon as it runs out of work, and its
heartbeats after that repeat the same counters (detail ``idle`` too), so between epochs, read once the
workers have had time to find no work (SETTLE_S), the snapshot is exact without a fast heartbeat (the
bench's workers beat at the production rate: their events are part of the broker's cost)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from essp.settings import Settings

WORK_COUNTER = "work_cpu_s"
BROKER_ROLES = ("kafka (tansu)", "s3 (weed)")  # the broker and the object store it keeps its log in


@dataclass(frozen=True)
class Snapshot:
    """The last events of some workers: the raw value of each key (to tell a newer one) and its counters."""

    raw: dict[str, bytes | None]
    counters: dict[str, dict[str, float]]
    details: dict[str, str | None] | None = None


def read_workers(settings: Settings, names: list[str]) -> Snapshot:
    """The last event of each named worker (its id is its name), as kept in Redis."""
    from essp.clients.redis import redis_client
    from essp.contract import RedisKeys, WorkerEvent, decode

    keys = RedisKeys(settings.redis_prefix)
    client = redis_client(settings)
    raw: dict[str, bytes | None] = {}
    counters: dict[str, dict[str, float]] = {}
    details: dict[str, str | None] = {}
    for name in names:
        value = client.get(keys.worker(name))
        raw[name] = value
        event = None if value is None else decode(value, "", (WorkerEvent,))
        counters[name] = {} if event is None else dict(event.counters)
        details[name] = None if event is None else event.detail
    return Snapshot(raw, counters, details)


# A worker polls for half a second before it finds no work and says so: once every sample of an epoch
# is delivered, its key says idle with the epoch's last counters within this long. Read earlier, an idle
# key may be one written while the worker waited for the stage before it, in the middle of the epoch.
SETTLE_S = 1.0


def fresh_snapshot(settings: Settings, names: list[str], *, timeout_s: float, since: Snapshot | None = None,
                   settle_s: float = 0.0) -> Snapshot:
    """A snapshot whose counters are every worker's latest, idle workers assumed: per worker, its event
    written on going idle (newer than ``since``'s, when given: the work of the epoch in between is in it),
    or else two changes of its key after this call began (the first change may be an event whose counters
    were read just before). ``settle_s``: wait that long first (see SETTLE_S)."""
    time.sleep(settle_s)
    seen = read_workers(settings, names)
    changes = dict.fromkeys(names, 0)

    def fresh(snap: Snapshot, name: str) -> bool:
        idle = (snap.details or {}).get(name) == "idle"
        return (idle and (since is None or snap.raw[name] != since.raw.get(name))) or changes[name] >= 2

    deadline = time.monotonic() + timeout_s
    while not all(fresh(seen, n) for n in names):
        if time.monotonic() > deadline:
            stale = ", ".join(n for n in names if not fresh(seen, n))
            raise RuntimeError(f"no fresh heartbeat from {stale} within {timeout_s:.1f}s")
        time.sleep(0.05)
        now = read_workers(settings, names)
        for name in names:
            if now.raw[name] != seen.raw[name]:
                changes[name] += 1
        seen = now
    return seen


def counter_deltas(before: Snapshot, after: Snapshot) -> dict[str, dict[str, float]]:
    """Per worker: how much each numeric counter grew between the two snapshots (uptime left out)."""
    out: dict[str, dict[str, float]] = {}
    for name, counters in after.counters.items():
        old = before.counters.get(name, {})
        out[name] = {k: v - old.get(k, 0.0) for k, v in counters.items() if k != "uptime_s"}
    return out


def cpu_split(cpu_s: dict[str, float | None], work_s: dict[str, float | None], samples: int) -> dict[str, Any]:
    """Per-sample CPU of every role and its split: ``work_s`` is the work CPU of the worker roles (None when
    a worker reports no ``work_cpu_s``); overhead = total - work, so the two add up to the total exactly.
    Milliseconds per sample throughout."""
    if not samples:
        raise ValueError("no sample delivered: nothing to split")
    per = {role: None if cpu is None else 1000 * cpu / samples for role, cpu in cpu_s.items()}
    total = sum(v or 0.0 for v in per.values())
    known = bool(work_s) and all(v is not None for v in work_s.values())
    work = {role: 1000 * v / samples for role, v in work_s.items() if v is not None} if known else None
    work_total = sum(work.values()) if work is not None else None
    by_process = None
    if work is not None:
        by_process = {role: (ms or 0.0) - work.get(role, 0.0) for role, ms in per.items()}
    return {"samples": samples, "cpu_ms_per_sample": per, "total_ms_per_sample": total,
            "work_ms_per_sample": work, "work_total_ms_per_sample": work_total,
            "overhead_ms_per_sample": None if work_total is None else total - work_total,
            "overhead_by_process_ms_per_sample": by_process,
            "broker_ms_per_sample": sum(per.get(role) or 0.0 for role in BROKER_ROLES)}


def work_by_role(deltas: dict[str, dict[str, float]], roles: dict[str, str]) -> dict[str, float | None]:
    """The work CPU seconds of each worker role (``roles``: worker name -> role), None where unreported."""
    out: dict[str, float | None] = {}
    for name, role in roles.items():
        value = deltas.get(name, {}).get(WORK_COUNTER)
        out[role] = None if value is None or out.get(role, 0.0) is None else (out.get(role) or 0.0) + value
    return out


def sum_seconds(parts: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Seconds by role added over several measurements (None stays None)."""
    out: dict[str, float | None] = {}
    for part in parts:
        for role, value in part.items():
            out[role] = None if value is None or (role in out and out[role] is None) else (out.get(role) or 0.0) + value
    return out
