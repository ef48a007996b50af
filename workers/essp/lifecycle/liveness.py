"""What the master reads, besides the trainers' state, to judge an epoch (light: no torch, no Airflow):

* **the pause ledger** (:meth:`essp.contract.RedisKeys.pauses`): how long the run has been paused in all,
  kept in Redis on Redis's own clock by whoever sees the run's state (the control stage when it pauses
  or resumes, every epoch trigger and blocking wait at each poll). An epoch's timeout leaves out the
  paused time between the wait's start and now, so a triggerer restarted during a pause longer than the
  timeout does not time the epoch out: the new trigger reads the same ledger (issue 11, fault 9);
* **silent trainers**: a trainer whose state says it has not finished the epoch, whose live key
  (:meth:`essp.contract.RedisKeys.worker`, refreshed by every heartbeat) has expired and whose state is
  older than :data:`TRAINER_SILENT_S` is dead, wherever it ran (a local process, a pod): the wait ends
  at once with that reason instead of at the epoch's timeout (issue 11, fault 8).

The sync helpers here serve the train operator, the pipeline and the control stage; the epoch trigger
runs :data:`PAUSE_LEDGER` itself on its asyncio client and judges with :func:`silent_trainers`.
"""

from __future__ import annotations

import time

from essp.clients.redis import redis_client
from essp.contract import TRAINER_STATE_TTL_S, RedisKeys, TrainerState
from essp.settings import Settings

# A trainer with no live key whose state is older than this is dead. Its live key lives 3 heartbeats
# (10 s at least) after the last one; the margin covers a trainer that has just written its first state
# and not yet its first live key.
TRAINER_SILENT_S = 30.0

# KEYS[1] the ledger; ARGV[1] the run's state now, ARGV[2] the ledger's lifetime. Opens a pause when the
# run is paused and none is open, closes the open one (adding its length) when it is not, and returns
# the paused seconds in all, the open pause up to now included. Redis's clock: every observer agrees.
PAUSE_LEDGER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local since = redis.call('HGET', KEYS[1], 'since')
if ARGV[1] == 'paused' then
  if not since then redis.call('HSET', KEYS[1], 'since', tostring(now)) since = tostring(now) end
elseif since then
  redis.call('HINCRBYFLOAT', KEYS[1], 'paused_s', now - tonumber(since))
  redis.call('HDEL', KEYS[1], 'since')
  since = false
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
local total = tonumber(redis.call('HGET', KEYS[1], 'paused_s') or '0')
if since then total = total + math.max(0, now - tonumber(since)) end
return tostring(total)
"""


def observe_pause(settings: Settings, run: str, state: str | None = None) -> float:
    """Record the run's state (read now when not given) in its pause ledger; returns its paused seconds
    in all, up to now."""
    keys = RedisKeys(settings.redis_prefix)
    client = redis_client(settings)
    if state is None:
        state = (client.get(keys.run_state(run)) or b"running").decode()
    return float(client.eval(PAUSE_LEDGER, 1, keys.pauses(run), state, TRAINER_STATE_TTL_S))


def silent_trainers(states: dict[str, TrainerState | None], live: dict[str, bool], epoch: int, *,
                    now: float | None = None, silent_s: float = TRAINER_SILENT_S) -> dict[str, str]:
    """The streams whose trainer is dead by its heartbeats: its state (not finished with ``epoch``) names a
    worker whose live key is gone (``live[stream]`` false), and was written over ``silent_s`` ago. Maps
    each to the reason, for :func:`essp.contract.epoch_progress`'s ``gone``."""
    now = time.time() if now is None else now
    dead = {}
    for stream, state in states.items():
        if state is None or state.finished(epoch) or not state.worker or live.get(stream, True):
            continue
        age = now - (state.updated_at or 0.0)
        if age > silent_s:
            dead[stream] = (f"no heartbeat from trainer {state.worker} (its live key expired; its state, "
                            f"'{state.status}', is {age:.0f}s old): the trainer is dead")
    return dead


def live_keys(states: dict[str, TrainerState | None], keys: RedisKeys) -> dict[str, str]:
    """The live key of each stream's trainer that its state names."""
    return {stream: keys.worker(state.worker) for stream, state in states.items() if state and state.worker}


def silent_trainers_now(settings: Settings, states: dict[str, TrainerState | None], epoch: int) -> dict[str, str]:
    """:func:`silent_trainers`, the live keys read now."""
    wanted = live_keys(states, RedisKeys(settings.redis_prefix))
    if not wanted:
        return {}
    found = redis_client(settings).mget(list(wanted.values()))
    live = {stream: value is not None for stream, value in zip(wanted, found, strict=True)}
    return silent_trainers(states, live, epoch)
