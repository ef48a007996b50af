"""The ESSP plugin: run reports and worker logs inside the Airflow UI (the pages are essp.orchestration.webui).

Airflow does not authenticate a plugin's FastAPI app (it is mounted, and a mount inherits none of the core
API's dependencies): every route here checks the caller with Airflow's own auth manager, from the JWT the
UI keeps in its ``_token`` cookie (what the UI's iframe sends) or an ``Authorization: Bearer`` header (the
REST API's token). No token: 401; a user without the permission: 403.
"""

from __future__ import annotations

from typing import Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends

from essp.operators.links import WorkerLogsLink
from essp.operators.refusal import NOTES
from essp.orchestration.webui import create_app

URL_PREFIX = "/essp"
# What each kind of page shows -> the DAG permission it takes (the DAG is the path's dag_id; pages of a run
# without one, the index and /runs/..., need that permission on every DAG).
ACCESS = {"runs": DagAccessEntity.RUN, "dag_run": DagAccessEntity.RUN, "logs": DagAccessEntity.TASK_LOGS}


def airflow_access(kind: str) -> list[Any]:
    """The dependencies of a route showing ``kind`` (see :func:`essp.orchestration.webui.create_app`)."""
    return [Depends(requires_access_dag("GET", ACCESS[kind]))]


class EsspPlugin(AirflowPlugin):
    name = "essp"
    fastapi_apps = [{"app": create_app(access=airflow_access), "url_prefix": URL_PREFIX, "name": "ESSP reports"}]
    # Shown in an iframe of the UI (url_route: the UI's path plugin/<url_route>). hrefs are relative to the
    # UI's <base href> (no leading slash), so Airflow behind a path prefix works; {DAG_ID} and {RUN_ID} are
    # filled in (URL-encoded) by the UI on a DAG run's and a task instance's page. The UI shows a view of a
    # destination on every DAG's pages: the report tab of a DAG run that trains no ESSP run says what it did
    # (essp.orchestration.records). The nav label is short: the UI's side bar cuts longer ones.
    external_views = [
        {"name": "ESSP", "href": "essp/", "destination": "nav", "url_route": "essp-reports",
         "nav_top_level": True},
        {"name": "ESSP report", "href": "essp/dag-runs/{DAG_ID}/{RUN_ID}", "destination": "dag_run",
         "url_route": "essp-report"},
        {"name": "Worker logs", "href": "essp/dag-runs/{DAG_ID}/{RUN_ID}/workers", "destination": "dag_run",
         "url_route": "essp-worker-logs"},
        {"name": "Worker logs", "href": "essp/dag-runs/{DAG_ID}/{RUN_ID}/workers", "destination": "task_instance",
         "url_route": "essp-task-worker-logs"},
    ]
    operator_extra_links = [WorkerLogsLink()]
    # A run refused before it started (essp.operators.refusal): its one line becomes the DAG run's note when the
    # scheduler marks the run failed (a task cannot set a note itself).
    listeners = [NOTES]
