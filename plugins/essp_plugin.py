"""The ESSP plugin: run reports and worker logs inside the Airflow UI (the pages are essp.orchestration.webui)."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from essp.operators.links import WorkerLogsLink
from essp.orchestration.webui import create_app

URL_PREFIX = "/essp"


class EsspPlugin(AirflowPlugin):
    name = "essp"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "ESSP reports"}]
    # Shown in an iframe of the UI (url_route: the UI's path plugin/<url_route>). hrefs are relative to the
    # UI's <base href> (no leading slash), so Airflow behind a path prefix works; {DAG_ID} and {RUN_ID} are
    # filled in (URL-encoded) by the UI on a DAG run's page.
    external_views = [
        {"name": "ESSP reports", "href": "essp/", "destination": "nav", "url_route": "essp-reports",
         "nav_top_level": True},
        {"name": "ESSP report", "href": "essp/dag-runs/{DAG_ID}/{RUN_ID}", "destination": "dag_run",
         "url_route": "essp-report"},
    ]
    operator_extra_links = [WorkerLogsLink()]
