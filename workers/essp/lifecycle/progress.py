"""What a run has done so far, for whoever watches it (the UI's report tab): each stream's per-epoch
figures, as its trainer's checkpoint pointer carries them (``checkpoints/<stream>/latest.json``, written
with every checkpoint), how far the scoring of each split has come (a Redis hash the scoring stage
updates as videos are scored), and what the registry did with the run's model (``report/registration.json``).
Small reads only: no checkpoint is loaded, and nothing here imports torch.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from essp.clients.redis import redis_client
from essp.contract import RedisKeys
from essp.settings import Settings
from essp.training.artifacts import RunArtifactMissing, RunStore

REGISTRATION_FILE = "report/registration.json"  # what register_model did, under the run's folder
SCORING_TTL_S = 7 * 24 * 3600  # the scoring progress outlives the run's report by far; it is small
SCORING_EVERY_S = 1.0  # the scoring stage writes its progress at most this often (and at the start and end)


def stream_histories(settings: Settings, run: str, streams: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Each stream's finished epochs (loss, accuracy, samples_per_s, data_wait, ...), oldest first, from its
    latest checkpoint pointer; a stream without a checkpoint yet has none."""
    runs = RunStore(settings, run)

    def one(stream: str) -> list[dict[str, Any]]:
        pointer = runs.latest_pointer(stream) or {}
        history = pointer.get("history")
        return [{"epoch": i, **entry} for i, entry in enumerate(history) if isinstance(entry, dict)] \
            if isinstance(history, list) else []

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(streams)))) as pool:
        return dict(zip(streams, pool.map(one, streams), strict=True))


class ScoringRecorder:
    """``progress(scored, total)`` of :func:`essp.evaluation.scoring.score_split` for one split of a run:
    written to the run's scoring hash at most every :data:`SCORING_EVERY_S` (always at 0 and at the end)."""

    def __init__(self, settings: Settings, run: str, split: str) -> None:
        self.settings, self.run, self.split = settings, run, split
        self.started = time.time()
        self._last = 0.0

    def __call__(self, scored: int, total: int, *, finished: bool = False) -> None:
        now = time.monotonic()
        if not finished and 0 < scored < total and now - self._last < SCORING_EVERY_S:
            return
        self._last = now
        value = {"scored": int(scored), "total": int(total), "finished": finished, "started_at": self.started,
                 "updated_at": time.time()}
        key = RedisKeys(self.settings.redis_prefix).scoring(self.run)
        client = redis_client(self.settings)
        client.hset(key, self.split, json.dumps(value))
        client.expire(key, SCORING_TTL_S)


def scoring_progress(settings: Settings, run: str) -> dict[str, dict[str, Any]]:
    """split -> {scored, total, finished, started_at, updated_at} of the run's scoring so far."""
    raw = redis_client(settings).hgetall(RedisKeys(settings.redis_prefix).scoring(run))
    out = {}
    for split, value in raw.items():
        split = split.decode() if isinstance(split, bytes) else str(split)
        try:
            entry = json.loads(value)
        except (TypeError, ValueError):
            continue
        if isinstance(entry, dict):
            out[split] = entry
    return out


def registration(settings: Settings, run: str) -> dict[str, Any] | None:
    """What register_model recorded for the run (registry, version, promoted, reason, metric), or None when
    the run has not been registered (yet)."""
    try:
        value = RunStore(settings, run).load_json(REGISTRATION_FILE)
    except RunArtifactMissing:
        return None
    return value if isinstance(value, dict) else None
