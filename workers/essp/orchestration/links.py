"""Which ESSP run an Airflow DAG run drives, and back.

An ``essp_train`` (or ``essp_nightly_retrain``) DAG run trains the ESSP run named by its ``run`` param,
or, when that is empty, a run id derived from the DAG run's id (:func:`run_id_for`). The first task
records the pair in S3 (``s3://<runs bucket>/_airflow/<dag_id>/<dag run id>.json``) so that the UI
plugin can show the report next to the DAG run, whichever way the id was chosen.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any
from urllib.parse import quote

from essp.clients.s3 import ObjectNotFound, ObjectStore
from essp.contract import check_run_id
from essp.settings import Settings

LINK_PREFIX = "_airflow"
MAX_RUN_ID = 64


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
    """Record that the DAG run ``dag_id``/``dag_run_id`` drives the ESSP run ``run``; returns its URI."""
    store = ObjectStore(settings)
    store.ensure_bucket(settings.bucket_runs)
    value = {"dag_id": dag_id, "dag_run_id": dag_run_id, "run": check_run_id(run), **extra}
    return str(store.put_json(settings.bucket_runs, _key(dag_id, dag_run_id), value))


def load_link(settings: Settings, dag_id: str, dag_run_id: str) -> dict[str, Any] | None:
    """The record :func:`save_link` wrote for a DAG run, or None (the run has not started, or is no ESSP run)."""
    try:
        return ObjectStore(settings).get_json(settings.bucket_runs, _key(dag_id, dag_run_id))
    except ObjectNotFound:
        return None
