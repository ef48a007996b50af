"""The stage of the `essp_control` DAG: pause, resume or stop a run. Every decode and extract worker and
the run's trainers obey; the run's state is kept in Redis for workers that start later.

The stage says what happened, in words, and refuses what cannot take effect: a run that does not exist
(no spec in S3 and no state in Redis: a typo'd id), and a run that has finished (its report is written).
A command that repeats the run's state says so; one that changes it says the state after it, and a stop
waits a little for the run's live trainers to confirm that they checkpointed and ended.
"""

from __future__ import annotations

import difflib
import time
from typing import Any

from essp.clients.redis import redis_client
from essp.clients.s3 import ObjectStore
from essp.contract import RedisKeys
from essp.dataplane.resident import RunControl, publish_control
from essp.errors import EsspError
from essp.evaluation.report import report_uri
from essp.lifecycle.epochs import trainer_states
from essp.lifecycle.liveness import observe_pause
from essp.lifecycle.params import ControlParams, RunParamsError
from essp.orchestration.links import DagRun, save_dag_run_record
from essp.orchestration.stages import stage
from essp.settings import Settings
from essp.training.artifacts import RunArtifactMissing, RunStore

STATE_AFTER = {"pause": "paused", "resume": "running", "stop": "stopped"}
WHAT_FOLLOWS = {
    "paused": "its jobs wait in Kafka and its epoch timeout is held; resume it with essp_control command=resume",
    "running": "its workers take its jobs again",
    "stopped": "its trainers checkpoint where they are and its train tasks end; trigger essp_train with the same "
               "run to go on from there",
}
STOP_CONFIRM_S = 20.0
CLOSE_RUNS = 3


def _close_runs(settings: Settings, run: str) -> list[str]:
    """Run ids in the runs bucket that look like ``run`` (for a typo's message), closest first."""
    try:
        runs = [prefix.rstrip("/") for prefix in ObjectStore(settings).list_prefixes(settings.bucket_runs)]
    except Exception:  # noqa: BLE001 - only a hint in a message
        return []
    return difflib.get_close_matches(run, runs, n=CLOSE_RUNS, cutoff=0.6)


def run_facts(settings: Settings, run: str) -> dict[str, Any]:
    """What is known of ``run``: its spec (or None), its state in Redis (or None), its report's URI (or None)."""
    try:
        spec = RunStore(settings, run).load_json("spec.json")
    except RunArtifactMissing:
        spec = None
    raw = redis_client(settings).get(RedisKeys(settings.redis_prefix).run_state(run))
    uri = report_uri(settings, run)
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return {"spec": spec, "state": raw.decode() if raw else None,
            "report": uri if ObjectStore(settings).exists(bucket, key) else None}


@stage
def control_run(settings: Settings, params: ControlParams, dag_run: DagRun | None = None) -> dict[str, Any]:
    """Send ``params.command`` for ``params.run``, after checking that it can take effect; returns the run's
    state before and after, the trainers' states, and ``message``, which says it in words. With ``dag_run``
    (essp_control's), what happened (or why it was refused) is recorded for the DAG run's report tab."""
    try:
        done = _control_run(settings, params)
    except EsspError as exc:
        if dag_run is not None:
            save_dag_run_record(settings, dag_run.dag_id, dag_run.dag_run_id, error=str(exc),
                                control={"command": params.command, "run": params.run})
        raise
    if dag_run is not None:
        save_dag_run_record(settings, dag_run.dag_id, dag_run.dag_run_id,
                            control={k: done[k] for k in ("run", "command", "before", "state", "trainers", "message")})
    return done


def _control_run(settings: Settings, params: ControlParams) -> dict[str, Any]:
    run, command = params.run, params.command
    facts = run_facts(settings, run)
    if facts["spec"] is None and facts["state"] is None:
        close = _close_runs(settings, run)
        raise RunParamsError(
            f"run: there is no run {run!r} (no {RunStore(settings, run).uri('spec.json')}, which essp_train writes "
            "when it starts a run, and no state in Redis)" + (f"; did you mean {', '.join(close)}?" if close else ""))
    if facts["report"] is not None:
        raise RunParamsError(f"run {run} has finished (its report is {facts['report']}): there is nothing to "
                             f"{command}")
    control = RunControl(settings)
    before = control.get(run, fresh=True)
    after = STATE_AFTER[command]
    streams = list(((facts["spec"] or {}).get("spec") or {}).get("streams") or [])
    if before == "stopped" and command == "pause":
        raise RunParamsError(f"run {run} is stopped: a stopped run cannot be paused (trigger essp_train with the "
                             "same run to go on)")
    message = publish_control(settings, command, run=run)  # sent even when the state is the same: idempotent
    observe_pause(settings, run)  # a pause starts (or ends) in the run's pause ledger now
    states = trainer_states(settings, run, streams) if streams else {}
    if command == "stop" and before != "stopped":
        states = _confirm_stop(settings, run, streams, states)
    now = control.get(run, fresh=True)
    trainers = {stream: (state.status if state else "not started") for stream, state in states.items()}
    if before == after:
        words = f"run {run} was already {after}: nothing changed"
    else:
        words = f"run {run} is now {now} (it was {before}): {WHAT_FOLLOWS[now]}"
    if trainers:
        words += "; trainers: " + ", ".join(f"{stream} {status}" for stream, status in trainers.items())
    print(words[:1].upper() + words[1:])  # the task log's line (the result goes to XCom)
    return {"run": run, "command": command, "before": before, "state": now, "trainers": trainers,
            "message": words, "sent": message.model_dump(mode="json")}


def _confirm_stop(settings: Settings, run: str, streams: list[str], states: dict[str, Any]) -> dict[str, Any]:
    """Wait up to STOP_CONFIRM_S for the streams whose trainer is training to say stopped (or failed)."""
    busy = [s for s, st in states.items() if st is not None and st.status in ("ready", "training", "epoch_done")]
    deadline = time.monotonic() + STOP_CONFIRM_S
    while busy and time.monotonic() < deadline:
        time.sleep(0.5)
        states = trainer_states(settings, run, streams)
        busy = [s for s in busy if states[s] is not None and states[s].status not in ("stopped", "failed")]
    return states
