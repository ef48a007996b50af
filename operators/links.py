"""Extra links of ESSP's operators: buttons on a task instance in the Airflow UI."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from airflow.sdk import BaseOperatorLink

PLUGIN_PREFIX = "essp"  # where plugins/essp_plugin.py mounts the ESSP pages (essp.orchestration.webui)


def _api_base_url() -> str:
    """``[api] base_url`` of the Airflow configuration, or "" when it is not set."""
    try:
        from airflow.sdk.configuration import conf
    except ImportError:  # pragma: no cover - older layouts
        from airflow.configuration import conf
    return (conf.get("api", "base_url", fallback="") or "").strip()


def worker_logs_url(dag_id: str, run_id: str, base_url: str | None = None) -> str:
    """The ESSP plugin's page of the workers of a DAG run, absolute under ``base_url`` when given, else
    relative to the UI's base (the Airflow UI resolves links against its ``<base href>``)."""
    path = f"{PLUGIN_PREFIX}/dag-runs/{quote(dag_id, safe='')}/{quote(run_id, safe='')}/workers"
    base = _api_base_url() if base_url is None else base_url
    return f"{base.rstrip('/')}/{path}" if base else path


class WorkerLogsLink(BaseOperatorLink):
    """"Worker logs": the resident workers of the ESSP run this task's DAG run drives, with their logs."""

    name = "Worker logs"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return worker_logs_url(ti_key.dag_id, ti_key.run_id)
