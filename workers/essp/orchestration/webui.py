"""The ESSP pages of the Airflow UI: run reports, the report of a DAG run, and its workers' logs.

A FastAPI app that the ``essp`` Airflow plugin (``plugins/essp_plugin.py``) mounts at ``/essp`` of the
api-server; it reads what the runs wrote to S3 (:mod:`essp.evaluation.report`, :mod:`essp.orchestration.links`) and, for
the workers page, the local process table. Routes, relative to the mount:

=====================================================  ==============================================
``GET /``                                              runs that have a report, newest first
``GET /runs/{run}``                                    the report as a page (metrics, history, plots)
``GET /runs/{run}/report.json``                        the report as JSON
``GET /runs/{run}/files/{name}``                       a plot (``loss.png`` ...) or ``summary.md``
``GET /dag-runs/{dag_id}/{dag_run_id}``                the report of the ESSP run a DAG run drives,
                                                       or its trainers' state while it runs
``GET /dag-runs/{dag_id}/{dag_run_id}/workers``        that run's workers and the tail of their logs
=====================================================  ==============================================

The HTML is in the Jinja templates of ``essp/orchestration/templates/`` (``base.html``, the frame of every
page, and one template per page); this module gathers the values they show and passes them as plain data.
Templates are autoescaped: every value from a report, a link or a log is HTML-escaped. Every link and
image path in the pages is relative, so the app works under any prefix (the plugin's ``/essp``, a
reverse proxy's path). Settings are built per request with ``settings_factory`` (the api-server's
environment carries the ``ESSP_*`` settings). Every route sits behind the ``access`` dependencies the
plugin gives (Airflow's own authentication and DAG permissions). The endpoints are plain ``def``: FastAPI
runs their S3 and Redis calls in its threadpool.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from essp.clients.s3 import ObjectNotFound, ObjectStore
from essp.contract import check_run_id
from essp.deploy.fleet import worker_mode
from essp.deploy.kube import LABEL_RUN, label_value, pod_records
from essp.deploy.kube import trainer_name as kube_trainer_name
from essp.deploy.local import is_worker_name, trainer_name
from essp.errors import EsspError, ServiceUnavailable
from essp.evaluation.metrics import SUMMARY_METRICS
from essp.evaluation.report import (
    PLOTS,
    REPORT_FILE,
    REPORT_PREFIX,
    SUMMARY_FILE,
    ReportNotFound,
    read_report,
    summary_lines,
)
from essp.lifecycle.epochs import load_run
from essp.lifecycle.params import RunParams
from essp.lifecycle.progress import registration
from essp.orchestration.links import dag_run_of, load_link
from essp.orchestration.progress import figure as _number
from essp.orchestration.progress import live_view
from essp.orchestration.records import record_view
from essp.settings import Settings
from essp.stack.procs import ProcessTable, pid_alive
from essp.training.artifacts import RunArtifactMissing

SettingsFactory = Callable[[], Settings]
Access = Callable[[str], list[Any]]  # what a route shows ("runs", "dag_run", "logs") -> its FastAPI dependencies

FILE_TYPES = {**{name: "image/png" for name in PLOTS}, SUMMARY_FILE: "text/markdown; charset=utf-8"}
PLOT_TITLES = {"loss.png": "training and validation loss", "accuracy.png": "training accuracy and validation top-1",
               "confusion.png": "confusion matrix (selected)", "per_class.png": "per-class accuracy",
               "fusion.png": "top-1 per strategy"}
METRIC_KEYS = SUMMARY_METRICS  # the metrics table's figures, in its columns
INDEX_DETAILS = 25  # the newest runs whose report the index reads for its figures
LOG_TAIL_LINES = 200
LOG_TAIL_BYTES = 256 * 1024  # a log's tail is read from at most its last this many bytes
STATUS_REFRESH_S = 10  # a run's status page reloads itself this often
SECURITY_HEADERS = {
    # Pages are self-contained: one script of this app's (static/essp.js), styles inline, images from this app.
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; script-src 'self'; style-src 'unsafe-inline'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


SCRIPT = resources.files("essp.orchestration").joinpath("static/essp.js").read_bytes()


class BadRequest(EsspError):
    """A malformed run id or file name in the URL."""


def q(segment: str) -> str:
    """A path segment for a relative link: every reserved character quoted (``:`` included, so an id
    never reads as a URL scheme)."""
    return quote(segment, safe="")


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _when(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return _text(value)


def _checked_run(run: str) -> str:
    try:
        return check_run_id(run)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# rendering


def _output(value: Any) -> Any:
    """What ``{{ value }}`` writes: markup (a macro's output) as it is, None as nothing, anything else as
    escaped text, with :func:`html.escape`'s entities (``&quot;``, ``&#x27;``) rather than markupsafe's."""
    if hasattr(value, "__html__"):
        return value
    return Markup(html.escape(_text(value), quote=True))


@cache
def templates() -> Environment:
    """The pages' templates (the package's ``templates/`` folder), autoescaped."""
    env = Environment(loader=PackageLoader("essp.orchestration", "templates"), autoescape=select_autoescape(["html"]),
                      undefined=StrictUndefined, finalize=_output, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=pct, number=_number, when=_when)
    return env


def render(template: str, *, status_code: int = 200, refresh_s: int | None = None, **values: Any) -> HTMLResponse:
    """The page ``template`` (a child of ``base.html``) with ``values``; ``refresh_s``: reload it that often."""
    document = templates().get_template(template).render(refresh_s=refresh_s, **values)
    return HTMLResponse(document, status_code=status_code, headers=SECURITY_HEADERS)


def message_page(status_code: int, title: str, message: str, root: str, *, detail: str = "") -> HTMLResponse:
    """An error or notice page: ``message`` and ``detail`` are plain text."""
    kind = "msg error" if status_code >= 500 else "msg"
    return render("message.html", status_code=status_code, title=title, message=message, detail=detail, kind=kind,
                  root=root)


def _root(request: Request) -> str:
    """The relative path from the requested page to the app's root ("./", "../", ...)."""
    path = request.scope.get("path", "/")
    root_path = request.scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        path = path[len(root_path):]
    depth = max(path.count("/") - 1, 0)
    return "../" * depth or "./"


# ---------------------------------------------------------------------------------------------
# the index


def list_reports(settings: Settings) -> list[dict[str, Any]]:
    """Runs of the runs bucket that have a report: run, written (datetime), newest first; the newest
    :data:`INDEX_DETAILS` also carry their report's ``summary`` and ``created_at``."""
    store = ObjectStore(settings)
    bucket = settings.bucket_runs
    try:
        top = store.list_prefixes(bucket)
    except ObjectNotFound:
        return []  # no bucket: no run yet
    runs = []
    for folder in top:
        name = folder.rstrip("/")
        if not name.startswith("_"):
            try:
                runs.append(check_run_id(name))
            except ValueError:
                continue

    def stat(run: str) -> dict[str, Any] | None:
        key = f"{run}/{REPORT_PREFIX}/{REPORT_FILE}"
        try:
            info = store.stat(bucket, key)
        except ObjectNotFound:
            return None
        return {"run": run, "written": info.last_modified}

    def details(entry: dict[str, Any]) -> dict[str, Any]:
        try:
            report = read_report(settings, entry["run"])
        except EsspError as exc:
            return {**entry, "error": str(exc)}
        return {**entry, "summary": report.get("summary") or {}, "created_at": report.get("created_at"),
                "dag_run": dag_run_of(settings, entry["run"]), "registration": registration(settings, entry["run"])}

    with ThreadPoolExecutor(max_workers=8) as pool:
        found = [e for e in pool.map(stat, runs) if e is not None]
        epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
        found.sort(key=lambda e: (e["written"] or epoch, e["run"]), reverse=True)
        detailed = list(pool.map(details, found[:INDEX_DETAILS]))
    return detailed + found[INDEX_DETAILS:]


def render_index(settings: Settings, root: str) -> HTMLResponse:
    entries = [{"href": f"{root}runs/{q(e['run'])}", "summary": None, "error": None, "dag_run": None,
                "registration": None, **e} for e in list_reports(settings)]
    for e in entries:
        e["airflow"] = airflow_href(root, e["dag_run"]["dag_id"], e["dag_run"]["dag_run_id"]) if e["dag_run"] else None
    return render("index.html", entries=entries, bucket=settings.bucket_runs, root=root)


# ---------------------------------------------------------------------------------------------
# the report


def metric_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of the metrics table, each stream and each fusion strategy as the report orders them:
    name, label, kind, CSS classes, note, selected, skipped, figures (:data:`METRIC_KEYS`), videos."""
    fusion = (report.get("evaluation") or {}).get("fusion") or {}
    rows = []
    for row in report.get("fusion_table") or []:
        name = str(row["name"])
        is_stream = row.get("kind") == "stream"
        classes = [c for c, on in (("stream", is_stream), ("fusion", not is_stream), ("selected", row.get("selected")),
                                   ("skipped", row.get("skipped") is not None)) if on]
        entry = fusion.get(name)
        rows.append({"name": name, "label": f"stream {name.split(':', 1)[1]}" if is_stream and ":" in name else name,
                     "kind": "stream" if is_stream else "fusion", "classes": " ".join(classes),
                     "note": entry.get("note") if isinstance(entry, dict) else None,
                     "selected": bool(row.get("selected")), "skipped": row.get("skipped"),
                     "figures": [row.get(key) for key in METRIC_KEYS], "videos": row.get("videos") or ""})
    return rows


def registration_card(registration: dict[str, Any] | None) -> tuple[str, str, str, str]:
    """The report's first card: key, value, CSS class and note (the registry's reason) of what the registry
    did with the run's model (:func:`essp.lifecycle.progress.registration`)."""
    if registration is None:
        return ("model registry", "not registered (yet)", "",
                "register_model records the run's model after its report (a run of the CLI's `essp train` is "
                "not registered)")
    name, version = registration.get("registry"), registration.get("version")
    if registration.get("promoted"):
        return ("model registry", f"v{version} of {name}: promoted", "good",
                f"now production; {registration.get('reason') or ''}".rstrip("; "))
    return ("model registry", f"v{version} of {name}: not promoted", "warn",
            f"production stays: {registration.get('reason') or 'no reason recorded'}")


def verdict_cards(report: dict[str, Any], registration: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """The result's cards: key, value (text), CSS class (``good`` / ``warn`` for a verdict) and note; the first
    says what the registry did with the run's model."""
    s = report.get("summary") or {}
    cards = [("selected fusion", s.get("selected"), ""), ("selected top-1", pct(s.get("selected_top1")), ""),
             ("best stream", f'{_text(s.get("best_stream"))} {pct(s.get("best_stream_top1"))}', ""),
             ("chance", pct(s.get("chance")), "")]
    verdict = s.get("fused_ge_best_stream")
    if verdict is not None:
        gain = s.get("fused_gain")
        gain_text = "" if gain is None else f" ({'+' if gain >= 0 else ''}{100 * gain:.1f} pts)"
        cards.append(("fused ≥ best stream", ("yes" if verdict else "no") + gain_text, "good" if verdict else "warn"))
    selected = report.get("selected_metrics") or {}
    cards += [("selected top-5", pct(selected.get("top5")), ""), ("selected mAP", pct(selected.get("mAP")), "")]
    first = registration_card(registration)
    return [{"key": first[0], "value": first[1], "cls": first[2], "note": first[3]},
            *({"key": k, "value": v, "cls": cls, "note": ""} for k, v, cls in cards)]


def param_rows(params: dict[str, Any]) -> list[tuple[str, str]]:
    """The run's params as (key, text): a string as it is, anything else as JSON."""
    return [(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True))
            for key, value in params.items()]


def no_report_message(run: str, exc: ReportNotFound) -> str:
    """"run X has no report yet: <where it was looked for>"."""
    cause = str(exc)
    prefix = f"run {run!r} has no report: "
    return f"run {run} has no report yet: {cause[len(prefix):] if cause.startswith(prefix) else cause}"


def airflow_href(root: str, dag_id: str, dag_run_id: str) -> str:
    """The Airflow UI's page of a DAG run, relative to a page whose app root is ``root`` (the app is mounted
    one level under the UI's base: ``/essp``)."""
    return f"{root}../dags/{q(dag_id)}/runs/{q(dag_run_id)}"


def render_report(report: dict[str, Any], root: str, *, context: dict[str, Any] | None = None,
                  registration: dict[str, Any] | None = None, dag_run: dict[str, str] | None = None) -> HTMLResponse:
    """The report page; ``context``: the DAG run it is shown for (:func:`dag_run_context`); ``registration``:
    what the registry did; ``dag_run``: the DAG run that drives the run (linked to in the Airflow UI)."""
    run = str(report["run"])
    if dag_run is None and context is not None:
        dag_run = {"dag_id": context["dag_id"], "dag_run_id": context["dag_run_id"]}
    href = f"{root}runs/{q(run)}"
    files = f"{href}/files/"
    return render("report.html", run=run, root=root, href=href, context=context, summary_file=SUMMARY_FILE,
                  created_at=report.get("created_at"), summary=report.get("summary") or {},
                  cards=verdict_cards(report, registration), metrics=metric_rows(report),
                  airflow=airflow_href(root, dag_run["dag_id"], dag_run["dag_run_id"]) if dag_run else None,
                  dag_run_ids=dag_run,
                  plots=[{"href": f"{files}{name}", "title": PLOT_TITLES[name]} for name in PLOTS],
                  streams=report.get("streams") or {}, history=report.get("history") or {},
                  summary_text="\n".join(summary_lines(report)), params=param_rows(report.get("params") or {}))


# ---------------------------------------------------------------------------------------------
# DAG runs


def _run_spec(settings: Settings, run: str) -> RunParams | None:
    """The run's params, or None while ``spec.json`` is not written."""
    try:
        return load_run(settings, run)[0]
    except RunArtifactMissing:
        return None


def dag_run_context(dag_id: str, dag_run_id: str, run: str, root: str, *, workers_link: bool = True) -> dict[str, Any]:
    """The line that heads a DAG run's pages: which ESSP run it drives, a link to the DAG run in the Airflow UI,
    and (``workers_link``) a link to its workers."""
    return {"dag_id": dag_id, "dag_run_id": dag_run_id, "run": run, "airflow": airflow_href(root, dag_id, dag_run_id),
            "workers": f"{root}dag-runs/{q(dag_id)}/{q(dag_run_id)}/workers" if workers_link else None}


def render_status(settings: Settings, run: str, dag_id: str, dag_run_id: str, root: str) -> HTMLResponse:
    """What a started run that has no report yet shows: the phase it is in, its trainers, the training curves
    so far, samples/s and data wait per stream, and scoring progress; the page reloads itself."""
    spec = _run_spec(settings, run)
    return render("status.html", refresh_s=STATUS_REFRESH_S, run=run, root=root, spec=spec,
                  context=dag_run_context(dag_id, dag_run_id, run, root), **live_view(settings, run, spec))


# ---------------------------------------------------------------------------------------------
# workers


def _tail_file(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - LOG_TAIL_BYTES))
            data = handle.read()
    except OSError as exc:
        return f"(no log: {exc.strerror})"
    text = data.decode("utf-8", errors="replace")
    if size > LOG_TAIL_BYTES:
        text = text.split("\n", 1)[-1]  # the first line is likely cut
    return "\n".join(text.splitlines()[-lines:])


def _pidfile(table: ProcessTable, name: str) -> dict[str, Any] | None:
    """The PID file of ``name`` as recorded (without removing a stale one, as ProcessTable.record does)."""
    try:
        data = json.loads(table.pidfile(name).read_text())
        return {"pid": int(data["pid"]), "program": str(data.get("program", "")),
                "start_ticks": data.get("start_ticks")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _names(table: ProcessTable, keep: Callable[[str], bool]) -> list[str]:
    """Names of the table's processes (PID files) and logs that ``keep`` accepts."""
    names: set[str] = set()
    for folder, suffix in ((table.run_dir, ".pid"), (table.log_dir, ".log")):
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        stems = (p.name[: -len(suffix)] for p in entries if p.name.endswith(suffix))
        names.update(stem for stem in stems if keep(stem))
    return sorted(names)


def worker_records(settings: Settings, run: str, streams: list[str] | None) -> list[dict[str, Any]]:
    """The run's trainers and the shared data workers of the local process table, with their log tails.

    Only processes of the table, under the resident-worker names, are shown; a log is read from the
    table's log folder under the process's name, never from a path found in a file."""
    table = ProcessTable(settings.state_dir)
    trainer_prefix = trainer_name(run, "")
    if streams is not None:
        trainers = [trainer_name(run, s) for s in streams]
    else:  # no spec: the names on disk, a stream being one name without a dash
        trainers = _names(table, lambda n: n.startswith(trainer_prefix)
                          and re.fullmatch(r"[a-z0-9_]+", n[len(trainer_prefix):]) is not None)
    shared = _names(table, is_worker_name)
    out = []
    for role, names in (("trainer", trainers), ("data worker", shared)):
        for name in names:
            record = _pidfile(table, name)
            log = table.log(name)
            alive = record is not None and pid_alive(record["pid"], record["start_ticks"])
            has_log = log.is_file() and not log.is_symlink()
            out.append({"name": name, "role": role, "pid": record["pid"] if record else None, "alive": alive,
                        "log": str(log), "has_log": has_log,
                        "tail": _tail_file(log) if has_log else "(no log)"})
    return out


def render_workers(settings: Settings, run: str, streams: list[str] | None, *, context: dict[str, Any],
                   root: str, report: str) -> HTMLResponse:
    """The workers page: in Kubernetes, where to find them; locally, the process table and the logs' tails."""
    values: dict[str, Any] = {"run": run, "root": root, "report": report, "context": context,
                              "tail_lines": LOG_TAIL_LINES, "kubernetes": worker_mode(settings) == "kubernetes"}
    if values["kubernetes"]:
        ns = settings.k8s_namespace
        selector = f"{LABEL_RUN}={label_value(run)}"
        values.update(namespace=ns, selector=selector,
                      deployments=[kube_trainer_name(run, s) for s in streams or []],
                      pods=[], pods_error=None,
                      commands="\n".join([f"kubectl -n {ns} get deployments,pods -l {selector}",
                                          f"kubectl -n {ns} logs -l {selector} --all-containers "
                                          f"--tail={LOG_TAIL_LINES}"]))
        try:
            values["pods"] = pod_records(ns, run, LOG_TAIL_LINES)
        except EsspError as exc:  # the commands above still help; say why the pods are not shown
            values["pods_error"] = str(exc)
    else:
        values.update(records=worker_records(settings, run, streams), state_dir=settings.state_dir)
    return render("workers.html", **values)


# ---------------------------------------------------------------------------------------------
# the app


def _s3_object(settings: Settings, run: str, name: str) -> tuple[Iterator[bytes], str]:
    return ObjectStore(settings).stream(settings.bucket_runs, f"{run}/{REPORT_PREFIX}/{name}"), FILE_TYPES[name]


def create_app(settings_factory: SettingsFactory = Settings, access: Access | None = None) -> FastAPI:
    """The ESSP pages as a FastAPI app (mounted at ``/essp`` by the Airflow plugin).

    ``access(kind)`` gives the FastAPI dependencies that guard each route, by what it shows: ``"runs"``
    (the index and a run's report: any DAG's runs), ``"dag_run"`` (the report of a DAG run: that DAG's
    runs) and ``"logs"`` (a DAG run's workers and their logs). The plugin passes Airflow's auth manager
    checks; unset, the routes are open (tests of the pages alone)."""
    guard = access or (lambda _kind: [])
    app = FastAPI(title="ESSP reports", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(BadRequest)
    def _bad_request(request: Request, exc: BadRequest) -> Response:
        return message_page(400, "Bad request", str(exc), _root(request))

    @app.exception_handler(ServiceUnavailable)
    def _unavailable(request: Request, exc: ServiceUnavailable) -> Response:
        return message_page(503, "A service is not reachable", str(exc), _root(request))

    @app.exception_handler(EsspError)
    def _essp_error(request: Request, exc: EsspError) -> Response:
        return message_page(500, "ESSP error", str(exc), _root(request))

    @app.get("/static/essp.js", dependencies=guard("runs"))
    def script() -> Response:
        return Response(SCRIPT, media_type="text/javascript; charset=utf-8",
                        headers={"Cache-Control": "no-cache", **SECURITY_HEADERS})

    @app.get("/", response_class=HTMLResponse, dependencies=guard("runs"))
    def index(request: Request) -> Response:
        return render_index(settings_factory(), _root(request))

    @app.get("/runs/{run}", response_class=HTMLResponse, dependencies=guard("runs"))
    def run_report(request: Request, run: str) -> Response:
        run = _checked_run(run)
        root = _root(request)
        settings = settings_factory()
        try:
            report = read_report(settings, run)
        except ReportNotFound as exc:
            return message_page(404, "No report", no_report_message(run, exc), root)
        return render_report(report, root, registration=registration(settings, run), dag_run=dag_run_of(settings, run))

    @app.get("/runs/{run}/report.json", dependencies=guard("runs"))
    def run_report_json(run: str) -> Response:
        run = _checked_run(run)
        try:
            report = read_report(settings_factory(), run)
        except ReportNotFound as exc:
            return JSONResponse({"detail": no_report_message(run, exc)}, status_code=404)
        return JSONResponse(report, headers={"Cache-Control": "no-cache"})

    @app.get("/runs/{run}/files/{name}", dependencies=guard("runs"))
    def run_file(request: Request, run: str, name: str) -> Response:
        run = _checked_run(run)
        if name not in FILE_TYPES:
            return message_page(404, "No such file", f"{name!r} is not a file of a report (files: "
                                f"{', '.join(FILE_TYPES)})", _root(request))
        try:
            chunks, content_type = _s3_object(settings_factory(), run, name)
        except ObjectNotFound:
            return message_page(404, "No such file", f"run {run} has no {name} (has the run written its report?)",
                                _root(request))
        return StreamingResponse(chunks, media_type=content_type,
                                 headers={"Cache-Control": "no-cache", **SECURITY_HEADERS})

    def linked_run(settings: Settings, dag_id: str, dag_run_id: str, root: str) -> str | Response:
        """The ESSP run a DAG run drives, or the page saying what the DAG run did instead (or will show)."""
        link = load_link(settings, dag_id, dag_run_id)
        if link is None or not link.get("run"):
            view = record_view(settings, dag_id, dag_run_id, link, root)
            return render("record.html", refresh_s=STATUS_REFRESH_S if view.pop("refresh") else None, root=root,
                          **view)
        return _checked_run(str(link["run"]))

    @app.get("/dag-runs/{dag_id}/{dag_run_id}", response_class=HTMLResponse, dependencies=guard("dag_run"))
    def dag_run_report(request: Request, dag_id: str, dag_run_id: str) -> Response:
        settings = settings_factory()
        root = _root(request)
        run = linked_run(settings, dag_id, dag_run_id, root)
        if isinstance(run, Response):
            return run
        try:
            report = read_report(settings, run)
        except ReportNotFound:
            return render_status(settings, run, dag_id, dag_run_id, root)
        return render_report(report, root, context=dag_run_context(dag_id, dag_run_id, run, root),
                             registration=registration(settings, run))

    @app.get("/dag-runs/{dag_id}/{dag_run_id}/workers", response_class=HTMLResponse, dependencies=guard("logs"))
    def dag_run_workers(request: Request, dag_id: str, dag_run_id: str) -> Response:
        settings = settings_factory()
        root = _root(request)
        run = linked_run(settings, dag_id, dag_run_id, root)
        if isinstance(run, Response):
            return run
        spec = _run_spec(settings, run)
        streams = list(spec.streams) if spec is not None else None
        return render_workers(settings, run, streams, root=root, report=f"{root}dag-runs/{q(dag_id)}/{q(dag_run_id)}",
                              context=dag_run_context(dag_id, dag_run_id, run, root, workers_link=False))

    return app
