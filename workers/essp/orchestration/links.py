"""Which ESSP run an Airflow DAG run drives, and back.

An ``essp_train`` (or ``essp_nightly_retrain``) DAG run trains the ESSP run named by its ``run`` param,
or, when that is empty, a run id derived from the DAG run's id (:func:`run_id_for`). The first task
records the pair in S3 (``s3://<runs bucket>/_airflow/<dag_id>/<dag run id>.json``, and back in
``s3://<runs bucket>/<run>/dag_run.json``) so that the UI plugin can show the report next to the DAG run,
whichever way the id was chosen, and link a report to its DAG run. DAG runs that train no ESSP run
(essp_control, essp_predict, a nightly run with nothing new, a run refused before it started) record what
they did under the same key (:func:`save_dag_run_record`), for their report tab.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel

from essp.clients.s3 import ObjectNotFound, ObjectStore
from essp.contract import check_run_id
from essp.settings import Settings

LINK_PREFIX = "_airflow"
DAG_RUN_FILE = "dag_run.json"  # in a run's folder: the DAG run that drives it
MAX_RUN_ID = 64


class DagRun(BaseModel):
    """An Airflow DAG run, as a stage takes it (recorded so that the UI finds what the DAG run did)."""

    dag_id: str
    dag_run_id: str


def run_id_for(dag_id: str, dag_run_id: str) -> str:
    """A valid ESSP run id (letters, digits, '_' and '-', at most 64) for a DAG run, stable across calls.

    ``manual__2026-11-29T01:02:03.123456+00:00`` of ``essp_train`` gives
    ``essp_train-manual-20261129T010203-123456-0000``; ids that do not fit are cut and end with a hash."""
    kind, _, when = dag_run_id.partition("__")
    body = f"{dag_id}-{kind}-{when}" if when else f"{dag_id}-{dag_run_id}"
    body = body.replace(":", "").replace("+", "-").replace(".", "-")
    body = re.sub(r"[^A-Za-z0-9_-]+", "-", body)
    body = re.sub(r"(?<=\d)-(?=\d\d-\d\dT)", "", body)  # the date's dashes: 2026-11-29 -> 20261129
    body = re.sub(r"(?<=\d{6})-(?=\d\dT)", "", body)
    body = re.sub(r"-{2,}", "-", body).strip("-_") or "run"
    if len(body) > MAX_RUN_ID:
        digest = hashlib.sha1(f"{dag_id}/{dag_run_id}".encode()).hexdigest()[:10]
        body = body[: MAX_RUN_ID - 11].rstrip("-_") + "-" + digest
    return check_run_id(body)


def _key(dag_id: str, dag_run_id: str) -> str:
    return f"{LINK_PREFIX}/{quote(dag_id, safe='')}/{quote(dag_run_id, safe='')}.json"


def save_link(settings: Settings, dag_id: str, dag_run_id: str, run: str, **extra: Any) -> str:
    """Record that the DAG run ``dag_id``/``dag_run_id`` drives the ESSP run ``run`` (and, in the run's folder,
    ``dag_run.json``: the DAG run that drives it, the latest one when several did); returns the record's URI."""
    store = ObjectStore(settings)
    store.ensure_bucket(settings.bucket_runs)
    run = check_run_id(run)
    store.put_json(settings.bucket_runs, f"{run}/{DAG_RUN_FILE}", {"dag_id": dag_id, "dag_run_id": dag_run_id})
    value = {"dag_id": dag_id, "dag_run_id": dag_run_id, "run": run, **extra}
    return str(store.put_json(settings.bucket_runs, _key(dag_id, dag_run_id), value))


def save_dag_run_record(settings: Settings, dag_id: str, dag_run_id: str, **facts: Any) -> str:
    """Record what a DAG run that trains no ESSP run did, for its "ESSP report" tab: ``control`` (essp_control:
    the command, the run it went to, what happened), ``predictions`` (essp_predict: where they went, counts),
    ``skipped`` (a nightly run with nothing to train: why) or ``error`` (the one line a run failed with before
    it started). Merged into the DAG run's record (a link's ``run`` is kept); returns its URI."""
    store = ObjectStore(settings)
    store.ensure_bucket(settings.bucket_runs)
    value = {**(load_link(settings, dag_id, dag_run_id) or {}), "dag_id": dag_id, "dag_run_id": dag_run_id, **facts}
    return str(store.put_json(settings.bucket_runs, _key(dag_id, dag_run_id), value))


def dag_run_of(settings: Settings, run: str) -> dict[str, str] | None:
    """The DAG run that drives the ESSP run ``run`` (``dag_id``, ``dag_run_id``), or None (a run of the CLI)."""
    try:
        value = ObjectStore(settings).get_json(settings.bucket_runs, f"{check_run_id(run)}/{DAG_RUN_FILE}")
    except ObjectNotFound:
        return None
    if not isinstance(value, dict) or not value.get("dag_id") or not value.get("dag_run_id"):
        return None
    return {"dag_id": str(value["dag_id"]), "dag_run_id": str(value["dag_run_id"])}


def load_link(settings: Settings, dag_id: str, dag_run_id: str) -> dict[str, Any] | None:
    """The record :func:`save_link` wrote for a DAG run, or None (the run has not started, or is no ESSP run)."""
    try:
        return ObjectStore(settings).get_json(settings.bucket_runs, _key(dag_id, dag_run_id))
    except ObjectNotFound:
        return None
