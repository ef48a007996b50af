"""Who trains an ESSP run: one DAG run at a time (issue 11, fault 14).

Two ``essp_train`` DAG runs given the same ``run`` id used to both plan its epochs, and the first to finish
stopped the other's trainers. The first task of a DAG run now claims the run: ``s3://<runs
bucket>/<run>/owner.json`` names the DAG run that owns it, created only if there is none (a conditional
PUT, :mod:`essp.lifecycle.cas`: of two DAG runs claiming at once exactly one wins). A retry of the owning
DAG run's task finds its own claim and goes on; another DAG run is refused, naming the owner, unless
the owner has finished (its DAG run succeeded or failed: then the new one takes the claim over, again
compare-and-set, and resumes the run from its checkpoints, as reusing a ``run`` id is meant to).
``release_workers``, the teardown of every training DAG run, gives the claim back.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable
from typing import Any

from essp.clients.s3 import ObjectStore
from essp.errors import EsspError, UserError
from essp.settings import Settings

CLAIM = "owner.json"
# What the owner's DAG run may be in for its claim to be taken over (Airflow's final DAG run states, or
# gone from Airflow's database).
FINISHED = ("success", "failed", "deleted")


class RunClaimed(UserError):
    """The run is being trained by another DAG run."""


def claim_key(run: str) -> str:
    return f"{run}/{CLAIM}"


def claim_run(settings: Settings, run: str, owner: str, *,
              owner_state: Callable[[str], str | None] | None = None) -> dict[str, Any]:
    """Claim ``run`` for ``owner`` (a DAG run, ``"<dag_id>/<dag_run_id>"``); returns what happened.

    ``owner_state`` tells the state of another owner's DAG run (None: unknown); a claim whose owner is
    :data:`FINISHED` is taken over. Raises :class:`RunClaimed` naming the owner otherwise."""
    store = ObjectStore(settings)
    bucket, key = settings.bucket_runs, claim_key(run)
    store.ensure_bucket(bucket)
    body = json.dumps({"owner": owner, "claimed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                       "claim": uuid.uuid4().hex}).encode()
    for _ in range(10):
        current = store.get_versioned(bucket, key)
        if current is None:
            if store.put_if(bucket, key, body, etag=None) is not None:
                return {"run": run, "owner": owner, "claimed": "new"}
            continue  # another DAG run claimed it meanwhile: look at its claim
        held = json.loads(current.data)
        if held.get("owner") == owner:
            return {"run": run, "owner": owner, "claimed": "again"}  # a retry of the owning DAG run
        state = owner_state(held["owner"]) if owner_state is not None else None
        if state in FINISHED:
            if store.put_if(bucket, key, body, etag=current.etag) is not None:
                return {"run": run, "owner": owner, "claimed": "taken over", "previous": held["owner"],
                        "previous_state": state}
            continue
        raise RunClaimed(
            f"run {run} is already being trained by DAG run {held['owner']} (claimed at {held.get('claimed_at')}, "
            f"that DAG run is {state or 'in an unknown state'}): two DAG runs must not train one run at once. "
            f"Wait for it to end (or stop it: essp control stop --run {run}) and trigger again to resume the run, "
            f"or give this DAG run another `run` (the claim: s3://{bucket}/{key})")
    raise EsspError(f"run {run}: its claim s3://{bucket}/{key} kept changing under {owner} (concurrent claims); "
                    "trigger again")


def release_run(settings: Settings, run: str, owner: str) -> bool:
    """Give the claim back if ``owner`` holds it; True if it did."""
    store = ObjectStore(settings)
    current = store.get_versioned(settings.bucket_runs, claim_key(run))
    if current is None or json.loads(current.data).get("owner") != owner:
        return False
    store.delete(settings.bucket_runs, claim_key(run))
    return True


def run_owner(settings: Settings, run: str) -> str | None:
    """The DAG run that holds the run's claim, or None."""
    current = ObjectStore(settings).get_versioned(settings.bucket_runs, claim_key(run))
    return None if current is None else json.loads(current.data).get("owner")
