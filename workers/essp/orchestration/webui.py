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

Every link and image path in the pages is relative, so the app works under any prefix (the plugin's
``/essp``, a reverse proxy's path). Every value from a report, a link or a log is HTML-escaped.
Settings are built per request with ``settings_factory`` (the api-server's environment carries the
``ESSP_*`` settings). The endpoints are plain ``def``: FastAPI runs their S3 and Redis calls in its
threadpool.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from essp.clients.s3 import ObjectNotFound, ObjectStore
from essp.contract import check_run_id
from essp.errors import EsspError, ServiceUnavailable
from essp.stack.procs import ProcessTable, pid_alive
from essp.evaluation.report import PLOTS, REPORT_FILE, REPORT_PREFIX, SUMMARY_FILE, ReportNotFound, read_report, summary_lines
from essp.settings import Settings

SettingsFactory = Callable[[], Settings]

FILE_TYPES = {**{name: "image/png" for name in PLOTS}, SUMMARY_FILE: "text/markdown; charset=utf-8"}
PLOT_TITLES = {"loss.png": "training loss", "accuracy.png": "training accuracy",
               "confusion.png": "confusion matrix (selected)", "per_class.png": "per-class accuracy",
               "fusion.png": "top-1 per strategy"}
INDEX_DETAILS = 25  # the newest runs whose report the index reads for its figures
LOG_TAIL_LINES = 200
LOG_TAIL_BYTES = 256 * 1024  # a log's tail is read from at most its last this many bytes
STATUS_REFRESH_S = 30
DECODE_WORKER = re.compile(r"^worker-decode-\d+$")
EXTRACT_WORKER = re.compile(r"^worker-extract-[a-z0-9_]+-\d+$")
SECURITY_HEADERS = {
    # Pages are self-contained: no scripts at all, styles inline, images from this app only.
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class BadRequest(EsspError):
    """A malformed run id or file name in the URL."""


def esc(value: Any) -> str:
    """``value`` as HTML text (attributes included)."""
    return html.escape("" if value is None else str(value), quote=True)


def q(segment: str) -> str:
    """A path segment for a relative link: every reserved character quoted (``:`` included, so an id
    never reads as a URL scheme)."""
    return quote(segment, safe="")


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    return str(value)


def _checked_run(run: str) -> str:
    try:
        return check_run_id(run)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# page frame

CSS = """
:root { --fg: #1f2933; --muted: #616e7c; --line: #d3d9e0; --head: #eef2f6; --accent: #0b6bcb;
        --good: #1e7e34; --goodbg: #e6f4ea; --warn: #8a5300; --warnbg: #fff4e0; --bad: #a61b1b; --badbg: #fdecea; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; color: var(--fg);
       background: #f7f9fb; }
header { background: #17324d; color: #fff; padding: 14px 24px; }
header h1 { margin: 0; font-size: 20px; font-weight: 600; }
header h1 code { font-size: 20px; background: none; color: #fff; padding: 0; }
header .sub code { background: rgba(255, 255, 255, 0.14); color: #fff; }
header .sub { color: #c5d3e0; margin-top: 4px; font-size: 13px; }
header a { color: #9fd0ff; }
nav.crumbs { margin-top: 6px; font-size: 13px; }
main { padding: 16px 24px 32px; max-width: 1500px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 12px 16px; margin: 0 0 16px; }
h2 { font-size: 16px; margin: 0 0 10px; }
h3 { font-size: 14px; margin: 12px 0 6px; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
code, pre { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px; }
code { background: #f0f3f6; padding: 1px 4px; border-radius: 3px; }
pre { background: #f6f8fa; border: 1px solid var(--line); border-radius: 4px; padding: 8px 10px; overflow-x: auto;
      margin: 0; white-space: pre-wrap; word-break: break-word; }
pre.log { max-height: 420px; overflow-y: auto; white-space: pre; word-break: normal; }
table { border-collapse: collapse; margin: 4px 0; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: var(--head); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.selected td { background: #fff7d6; font-weight: 600; }
tr.stream td:first-child { color: var(--muted); }
tr.skipped td { color: var(--muted); font-style: italic; }
.badge { display: inline-block; padding: 1px 7px; border-radius: 10px; font-size: 12px; font-weight: 600; }
.badge.sel { background: #f5c400; color: #3a2f00; }
.badge.ok { background: var(--goodbg); color: var(--good); }
.badge.no { background: var(--warnbg); color: var(--warn); }
.badge.dead { background: var(--badbg); color: var(--bad); }
.verdict { display: flex; flex-wrap: wrap; gap: 12px; margin-bottom: 6px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 170px; background: #fbfcfd; }
.card .k { color: var(--muted); font-size: 12px; }
.card .v { font-size: 20px; font-weight: 600; }
.card.good { border-color: #9fd3ad; background: var(--goodbg); }
.card.warn { border-color: #f0c36d; background: var(--warnbg); }
.note { color: var(--muted); font-size: 12.5px; }
.msg { border-left: 4px solid var(--warn); background: var(--warnbg); padding: 10px 14px; border-radius: 4px; }
.msg.error { border-color: var(--bad); background: var(--badbg); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 14px; }
.two { display: grid; grid-template-columns: repeat(auto-fit, minmax(380px, 1fr)); gap: 16px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 8px; background: #fff; }
figure img { width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 12.5px; margin-top: 4px; }
"""


def page(title: str, heading: str, body: str, *, sub: str = "", crumbs: str = "", status_code: int = 200,
         refresh_s: int | None = None) -> HTMLResponse:
    """A complete page. ``title`` is plain text; ``heading``, ``sub``, ``crumbs`` and ``body`` are HTML."""
    refresh = f'<meta http-equiv="refresh" content="{int(refresh_s)}">' if refresh_s else ""
    document = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">{refresh}'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{heading}</h1>"
        + (f'<div class="sub">{sub}</div>' if sub else "")
        + (f'<nav class="crumbs">{crumbs}</nav>' if crumbs else "")
        + f"</header><main>{body}</main></body></html>"
    )
    return HTMLResponse(document, status_code=status_code, headers=SECURITY_HEADERS)


def message_page(status_code: int, title: str, message: str, root: str, *, detail: str = "") -> HTMLResponse:
    """An error or notice page: ``message`` and ``detail`` are plain text."""
    kind = "msg error" if status_code >= 500 else "msg"
    body = f'<section><div class="{kind}"><strong>{esc(message)}</strong>'
    if detail:
        body += f"<pre>{esc(detail)}</pre>"
    body += "</div></section>"
    return page(title, esc(title), body, crumbs=f'<a href="{root}">all ESSP runs</a>', status_code=status_code)


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
    try:  # ObjectStore._call: the store's own mapping of S3 errors (ObjectNotFound, ServiceUnavailable)
        top = store._call(f"s3://{bucket}", lambda: list(store.client.list_objects(bucket, recursive=False)))
    except ObjectNotFound:
        return []  # no bucket: no run yet
    runs = []
    for obj in top:
        name = (obj.object_name or "").rstrip("/")
        if obj.is_dir and not name.startswith("_"):
            try:
                runs.append(check_run_id(name))
            except ValueError:
                continue

    def stat(run: str) -> dict[str, Any] | None:
        key = f"{run}/{REPORT_PREFIX}/{REPORT_FILE}"
        try:
            info = store._call(f"s3://{bucket}/{key}", store.client.stat_object, bucket, key)
        except ObjectNotFound:
            return None
        return {"run": run, "written": info.last_modified}

    def details(entry: dict[str, Any]) -> dict[str, Any]:
        try:
            report = read_report(settings, entry["run"])
        except EsspError as exc:
            return {**entry, "error": str(exc)}
        return {**entry, "summary": report.get("summary") or {}, "created_at": report.get("created_at")}

    with ThreadPoolExecutor(max_workers=8) as pool:
        found = [e for e in pool.map(stat, runs) if e is not None]
        epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
        found.sort(key=lambda e: (e["written"] or epoch, e["run"]), reverse=True)
        detailed = list(pool.map(details, found[:INDEX_DETAILS]))
    return detailed + found[INDEX_DETAILS:]


def _when(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return "" if value is None else str(value)


def render_index(settings: Settings, root: str) -> HTMLResponse:
    entries = list_reports(settings)
    if not entries:
        body = (f'<section><div class="msg">No run in <code>s3://{esc(settings.bucket_runs)}</code> has a report '
                "yet. A run writes its report when its fuse-and-report step finishes.</div></section>")
    else:
        rows = []
        for e in entries:
            link = f'<a href="{root}runs/{q(e["run"])}"><code>{esc(e["run"])}</code></a>'
            s = e.get("summary")
            if s is None:
                extra = (f'<td colspan="5" class="note">{esc(e["error"])}</td>' if "error" in e
                         else '<td colspan="5" class="note">open the report for its figures</td>')
            else:
                verdict = s.get("fused_ge_best_stream")
                badge = ("" if verdict is None else '<span class="badge ok">yes</span>' if verdict
                         else '<span class="badge no">no</span>')
                extra = (f'<td class="num">{esc(s.get("num_classes"))}</td><td>{esc(s.get("selected"))}</td>'
                         f'<td class="num">{esc(pct(s.get("selected_top1")))}</td>'
                         f'<td>{esc(s.get("best_stream"))} {esc(pct(s.get("best_stream_top1")))}</td>'
                         f"<td>{badge}</td>")
            rows.append(f"<tr><td>{link}</td><td>{esc(_when(e['written']))}</td>{extra}</tr>")
        body = ('<section><h2>Runs with a report</h2><table><thead><tr><th>run</th><th>report written</th>'
                '<th class="num">classes</th><th>selected</th><th class="num">selected top-1</th>'
                "<th>best stream top-1</th><th>fused &ge; best stream</th></tr></thead><tbody>"
                + "".join(rows) + "</tbody></table>"
                f'<p class="note">{len(entries)} run(s) in <code>s3://{esc(settings.bucket_runs)}</code>, newest '
                "first.</p></section>")
    return page("ESSP reports", "ESSP reports", body,
                sub=f"training runs of <code>s3://{esc(settings.bucket_runs)}</code>")


# ---------------------------------------------------------------------------------------------
# the report


def _metric_cells(row: dict[str, Any]) -> str:
    if row.get("skipped") is not None:
        return f'<td colspan="5">skipped: {esc(row["skipped"])}</td>'
    return "".join(f'<td class="num">{esc(pct(row.get(key)))}</td>'
                   for key in ("top1", "top5", "mean_class_accuracy", "mAP")) + \
        f'<td class="num">{esc(row.get("videos") or "")}</td>'


def metrics_table(report: dict[str, Any]) -> str:
    """Each stream and each fusion strategy: top-1, top-5, mean class accuracy, mAP, videos."""
    fusion = (report.get("evaluation") or {}).get("fusion") or {}
    rows = []
    for row in report.get("fusion_table") or []:
        name = str(row["name"])
        is_stream = row.get("kind") == "stream"
        classes = [c for c, on in (("stream", is_stream), ("fusion", not is_stream), ("selected", row.get("selected")),
                                   ("skipped", row.get("skipped") is not None)) if on]
        label = f"stream {name.split(':', 1)[1]}" if is_stream and ":" in name else name
        note = (fusion.get(name) or {}).get("note") if isinstance(fusion.get(name), dict) else None
        badge = ' <span class="badge sel">selected</span>' if row.get("selected") else ""
        rows.append(f'<tr class="{" ".join(classes)}" data-name="{esc(name)}"><td>{esc(label)}{badge}'
                    + (f'<div class="note">{esc(note)}</div>' if note else "")
                    + f"</td><td>{'stream' if is_stream else 'fusion'}</td>{_metric_cells(row)}</tr>")
    return ('<table class="metrics"><thead><tr><th>strategy / stream</th><th>kind</th><th class="num">top-1</th>'
            '<th class="num">top-5</th><th class="num">mean class acc.</th><th class="num">mAP</th>'
            '<th class="num">videos</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def verdict_cards(report: dict[str, Any]) -> str:
    s = report.get("summary") or {}
    cards = [("selected fusion", esc(s.get("selected")), ""),
             ("selected top-1", esc(pct(s.get("selected_top1"))), ""),
             ("best stream", f'{esc(s.get("best_stream"))} {esc(pct(s.get("best_stream_top1")))}', ""),
             ("chance", esc(pct(s.get("chance"))), "")]
    verdict = s.get("fused_ge_best_stream")
    if verdict is not None:
        gain = s.get("fused_gain")
        gain_text = "" if gain is None else f" ({'+' if gain >= 0 else ''}{100 * gain:.1f} pts)"
        cards.append(("fused ≥ best stream", ("yes" if verdict else "no") + esc(gain_text),
                      "good" if verdict else "warn"))
    selected = report.get("selected_metrics") or {}
    cards += [("selected top-5", esc(pct(selected.get("top5"))), ""),
              ("selected mAP", esc(pct(selected.get("mAP"))), "")]
    return '<div class="verdict">' + "".join(
        f'<div class="card {cls}"><div class="k">{esc(k)}</div><div class="v">{v}</div></div>'
        for k, v, cls in cards) + "</div>"


def history_tables(report: dict[str, Any]) -> str:
    """Per stream: the final training figures and the per-epoch loss / accuracy."""
    streams = report.get("streams") or {}
    history = report.get("history") or {}
    if not streams and not history:
        return '<p class="note">no training history recorded</p>'
    final = ['<table><thead><tr><th>stream</th><th class="num">epochs</th><th class="num">final loss</th>'
             '<th class="num">final train acc.</th><th class="num">samples/s</th><th class="num">data wait</th>'
             '<th class="num">samples</th></tr></thead><tbody>']
    for stream, f in streams.items():
        final.append(f"<tr><td>{esc(stream)}</td><td class=\"num\">{esc(f.get('epochs'))}</td>"
                     f"<td class=\"num\">{esc(_number(f.get('final_loss')))}</td>"
                     f"<td class=\"num\">{esc(pct(f.get('final_accuracy')))}</td>"
                     f"<td class=\"num\">{esc(_number(f.get('final_samples_per_s'), 1))}</td>"
                     f"<td class=\"num\">{esc(pct(f.get('final_data_wait')))}</td>"
                     f"<td class=\"num\">{esc(f.get('total_samples') or '')}</td></tr>")
    final.append("</tbody></table>")
    per_stream = []
    for stream, epochs in history.items():
        rows = "".join(
            f"<tr><td class=\"num\">{esc(e.get('epoch'))}</td><td class=\"num\">{esc(_number(e.get('loss')))}</td>"
            f"<td class=\"num\">{esc(pct(e.get('accuracy')))}</td>"
            f"<td class=\"num\">{esc(_number(e.get('samples_per_s'), 1))}</td>"
            f"<td class=\"num\">{esc(pct(e.get('data_wait')))}</td>"
            f"<td class=\"num\">{esc(_number(e.get('lr'), 4))}</td></tr>" for e in epochs)
        per_stream.append(f'<div><h3>{esc(stream)}</h3><table class="history" data-stream="{esc(stream)}"><thead><tr>'
                          '<th class="num">epoch</th><th class="num">loss</th><th class="num">train acc.</th>'
                          '<th class="num">samples/s</th><th class="num">data wait</th><th class="num">lr</th></tr>'
                          f"</thead><tbody>{rows}</tbody></table></div>")
    return "".join(final) + '<div class="two">' + "".join(per_stream) + "</div>"


def params_table(params: dict[str, Any]) -> str:
    if not params:
        return '<p class="note">no parameters recorded</p>'
    rows = []
    for key, value in params.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        rows.append(f"<tr><th>{esc(key)}</th><td><code>{esc(text)}</code></td></tr>")
    return '<table class="params"><tbody>' + "".join(rows) + "</tbody></table>"


def report_body(report: dict[str, Any], root: str) -> str:
    """The sections of a report page; links relative to the app's root ``root``."""
    run = str(report["run"])
    files = f"{root}runs/{q(run)}/files/"
    plots = "".join(
        f'<figure><a href="{files}{name}"><img src="{files}{name}" alt="{esc(PLOT_TITLES[name])} of run {esc(run)}" '
        f'loading="eager"></a><figcaption>{esc(PLOT_TITLES[name])}</figcaption></figure>' for name in PLOTS)
    lines = "\n".join(summary_lines(report))
    return (
        f"<section><h2>Result</h2>{verdict_cards(report)}</section>"
        f"<section><h2>Streams and fusion strategies</h2>{metrics_table(report)}"
        '<p class="note">Sorted by top-1; the highlighted row is the strategy this run registers '
        "(the <code>fusion</code> parameter). Learned fusions are fitted on the training videos only.</p></section>"
        f'<section><h2>Plots</h2><div class="grid">{plots}</div></section>'
        f"<section><h2>Training</h2>{history_tables(report)}</section>"
        f"<section><h2>Summary</h2><pre class=\"summary\">{esc(lines)}</pre></section>"
        f"<section><h2>Parameters</h2>{params_table(report.get('params') or {})}</section>"
    )


def no_report_message(run: str, exc: ReportNotFound) -> str:
    """"run X has no report yet: <where it was looked for>"."""
    cause = str(exc)
    prefix = f"run {run!r} has no report: "
    return f"run {run} has no report yet: {cause[len(prefix):] if cause.startswith(prefix) else cause}"


def report_links(run: str, root: str) -> str:
    base = f"{root}runs/{q(run)}"
    return (f'<a href="{root}">all runs</a> · <a href="{base}">report</a> · '
            f'<a href="{base}/report.json">report.json</a> · <a href="{base}/files/{SUMMARY_FILE}">{SUMMARY_FILE}</a>')


def render_report(report: dict[str, Any], root: str, *, context: str = "") -> HTMLResponse:
    run = str(report["run"])
    s = report.get("summary") or {}
    sub = (f"report written {esc(report.get('created_at'))} · {esc(s.get('num_classes'))} classes · selected "
           f"<strong>{esc(s.get('selected'))}</strong> {esc(pct(s.get('selected_top1')))} top-1")
    if context:
        sub = f"{context}<br>{sub}"
    return page(f"ESSP run {run}", f"ESSP run <code>{esc(run)}</code>", report_body(report, root), sub=sub,
                crumbs=report_links(run, root))


# ---------------------------------------------------------------------------------------------
# DAG runs


def _run_spec(settings: Settings, run: str) -> Any:
    """The run's RunSpec, or None while ``spec.json`` is not written."""
    from essp.training.artifacts import RunArtifactMissing
    from essp.lifecycle.pipeline import load_run

    try:
        return load_run(settings, run)[0]
    except RunArtifactMissing:
        return None


def _age(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return ""
    seconds = max(0.0, time.time() - ts)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def status_body(settings: Settings, run: str, dag_id: str, dag_run_id: str, cause: str, root: str) -> str:
    """What a started run that has no report yet shows: each stream's trainer state."""
    from essp.training.resident import trainer_state

    spec = _run_spec(settings, run)
    body = (f'<section><div class="msg"><strong>Run <code>{esc(run)}</code> has no report yet.</strong> This page '
            f"shows the report when the run finishes (it reloads every {STATUS_REFRESH_S} s).<br>"
            f'<span class="note">{esc(cause)}</span></div></section>')
    if spec is None:
        return body + ('<section><h2>Trainers</h2><p class="note">The run\'s <code>spec.json</code> is not written '
                       "yet: the run is being prepared.</p></section>")
    rows = []
    for stream in spec.streams:
        try:
            state = trainer_state(settings, run, stream)
        except EsspError as exc:
            rows.append(f'<tr><td>{esc(stream)}</td><td colspan="6" class="note">{esc(exc)}</td></tr>')
            continue
        if not state:
            rows.append(f'<tr data-stream="{esc(stream)}"><td>{esc(stream)}</td><td>not started</td>'
                        '<td colspan="5" class="note">no trainer has recorded a state for this stream yet</td></tr>')
            continue
        done = state.get("epoch_done")
        epochs = f"{int(done) + 1} / {spec.epochs}" if isinstance(done, int) else f"? / {spec.epochs}"
        stats = state.get("stats") or {}
        figures = ", ".join(f"{k} {_number(stats[k])}" for k in ("loss", "accuracy", "samples_per_s") if k in stats)
        rows.append(f'<tr data-stream="{esc(stream)}"><td>{esc(stream)}</td><td>{esc(state.get("status"))}</td>'
                    f'<td class="num">{esc(epochs)}</td><td>{esc(state.get("worker"))}</td>'
                    f'<td>{esc(_age(state.get("updated_at")))}</td><td>{esc(figures)}</td>'
                    f'<td>{esc(state.get("detail") or "")}</td></tr>')
    workers = f"{root}dag-runs/{q(dag_id)}/{q(dag_run_id)}/workers"
    return body + ('<section><h2>Trainers</h2><table><thead><tr><th>stream</th><th>status</th>'
                   '<th class="num">epochs done</th><th>worker</th><th>updated</th><th>last epoch</th><th>detail</th>'
                   "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
                   f'<p class="note">Logs: <a href="{workers}">the workers of this run</a>.</p></section>')


def dag_run_context(dag_id: str, dag_run_id: str, run: str, root: str, *, workers_link: bool = True) -> str:
    workers = f"{root}dag-runs/{q(dag_id)}/{q(dag_run_id)}/workers"
    return (f"DAG run <code>{esc(dag_run_id)}</code> of <code>{esc(dag_id)}</code> drives ESSP run "
            f"<code>{esc(run)}</code>" + (f' · <a href="{workers}">worker logs</a>' if workers_link else ""))


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
    trainer_prefix = f"trainer-{run}-"
    if streams is not None:
        trainers = [f"{trainer_prefix}{s}" for s in streams]
    else:  # no spec: the names on disk, a stream being one name without a dash
        trainers = _names(table, lambda n: n.startswith(trainer_prefix)
                          and re.fullmatch(r"[a-z0-9_]+", n[len(trainer_prefix):]) is not None)
    shared = _names(table, lambda n: bool(DECODE_WORKER.match(n) or EXTRACT_WORKER.match(n)))
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


def _state_badge(alive: bool) -> str:
    return '<span class="badge ok">running</span>' if alive else '<span class="badge dead">not running</span>'


def workers_body(settings: Settings, run: str, streams: list[str] | None) -> str:
    if settings.stage_mode == "kubernetes":
        ns = settings.k8s_namespace
        selector = f"essp/run={run}"
        commands = "\n".join([f"kubectl -n {ns} get deployments,pods -l {selector}",
                              f"kubectl -n {ns} logs -l {selector} --all-containers --tail={LOG_TAIL_LINES}"])
        names = "".join(f"<li><code>essp-trainer-{esc(run)}-{esc(s)}</code></li>" for s in streams or [])
        return ("<section><h2>Workers in Kubernetes</h2><p>The run's trainers are Deployments "
                f"(<code>essp-trainer-...</code>) in namespace <code>{esc(ns)}</code> with the label selector "
                f"<code>{esc(selector)}</code>" + (f":</p><ul>{names}</ul>" if names else ".</p>")
                + f"<p>Their logs:</p><pre>{esc(commands)}</pre></section>")
    records = worker_records(settings, run, streams)
    if not records:
        return (f'<section><div class="msg">No local worker of run <code>{esc(run)}</code> is recorded under '
                f"<code>{esc(settings.state_dir)}</code> (trainers <code>trainer-{esc(run)}-&lt;stream&gt;</code>, "
                "data workers <code>worker-decode-N</code>, <code>worker-extract-KIND-N</code>).</div></section>")
    summary = "".join(
        f'<tr data-name="{esc(r["name"])}"><td><a href="#{esc(r["name"])}"><code>{esc(r["name"])}</code></a></td>'
        f"<td>{esc(r['role'])}</td><td class=\"num\">{esc(r['pid'] or '')}</td>"
        f"<td>{_state_badge(r['alive'])}</td><td><code>{esc(r['log'])}</code></td></tr>" for r in records)
    logs = "".join(
        f'<section id="{esc(r["name"])}"><h2><code>{esc(r["name"])}</code> '
        f"{_state_badge(r['alive'])}</h2>"
        f'<p class="note">{esc(r["role"])} · pid {esc(r["pid"] or "none")} · last {LOG_TAIL_LINES} lines of '
        f'<code>{esc(r["log"])}</code></p><pre class="log">{esc(r["tail"])}</pre></section>' for r in records)
    return ('<section><h2>Local workers</h2><table><thead><tr><th>name</th><th>role</th><th class="num">pid</th>'
            f"<th>state</th><th>log</th></tr></thead><tbody>{summary}</tbody></table></section>{logs}")


# ---------------------------------------------------------------------------------------------
# the app


def _s3_object(settings: Settings, run: str, name: str) -> tuple[Iterator[bytes], str]:
    store = ObjectStore(settings)
    bucket, key = settings.bucket_runs, f"{run}/{REPORT_PREFIX}/{name}"
    response = store._call(f"s3://{bucket}/{key}", store.client.get_object, bucket, key)

    def chunks() -> Iterator[bytes]:
        try:
            yield from response.stream(64 * 1024)
        finally:
            response.close()
            response.release_conn()

    return chunks(), FILE_TYPES[name]


def create_app(settings_factory: SettingsFactory = Settings) -> FastAPI:
    """The ESSP pages as a FastAPI app (mounted at ``/essp`` by the Airflow plugin)."""
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

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> Response:
        return render_index(settings_factory(), _root(request))

    @app.get("/runs/{run}", response_class=HTMLResponse)
    def run_report(request: Request, run: str) -> Response:
        run = _checked_run(run)
        root = _root(request)
        try:
            report = read_report(settings_factory(), run)
        except ReportNotFound as exc:
            return message_page(404, "No report", no_report_message(run, exc), root)
        return render_report(report, root)

    @app.get("/runs/{run}/report.json")
    def run_report_json(run: str) -> Response:
        run = _checked_run(run)
        try:
            report = read_report(settings_factory(), run)
        except ReportNotFound as exc:
            return JSONResponse({"detail": no_report_message(run, exc)}, status_code=404)
        return JSONResponse(report, headers={"Cache-Control": "no-cache"})

    @app.get("/runs/{run}/files/{name}")
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

    def linked_run(settings: Settings, dag_id: str, dag_run_id: str, root: str, why: str) -> str | Response:
        """The ESSP run a DAG run drives, or the 404 page saying it has none (yet)."""
        from essp.orchestration.links import load_link

        link = load_link(settings, dag_id, dag_run_id)
        if link is None:
            return message_page(404, "No ESSP run", f"DAG run {dag_run_id} of {dag_id} has not started an ESSP run "
                                f"(yet){why}", root)
        return _checked_run(str(link.get("run", "")))

    @app.get("/dag-runs/{dag_id}/{dag_run_id}", response_class=HTMLResponse)
    def dag_run_report(request: Request, dag_id: str, dag_run_id: str) -> Response:
        settings = settings_factory()
        root = _root(request)
        run = linked_run(settings, dag_id, dag_run_id, root, ": its first task records the run it trains.")
        if isinstance(run, Response):
            return run
        context = dag_run_context(dag_id, dag_run_id, run, root)
        try:
            report = read_report(settings, run)
        except ReportNotFound as exc:
            return page(f"ESSP run {run}", f"ESSP run <code>{esc(run)}</code>",
                        status_body(settings, run, dag_id, dag_run_id, str(exc), root), sub=context,
                        crumbs=f'<a href="{root}">all runs</a>', refresh_s=STATUS_REFRESH_S)
        return render_report(report, root, context=context)

    @app.get("/dag-runs/{dag_id}/{dag_run_id}/workers", response_class=HTMLResponse)
    def dag_run_workers(request: Request, dag_id: str, dag_run_id: str) -> Response:
        settings = settings_factory()
        root = _root(request)
        run = linked_run(settings, dag_id, dag_run_id, root, ", so it has no workers.")
        if isinstance(run, Response):
            return run
        spec = _run_spec(settings, run)
        streams = list(spec.streams) if spec is not None else None
        report = f"{root}dag-runs/{q(dag_id)}/{q(dag_run_id)}"
        context = dag_run_context(dag_id, dag_run_id, run, root, workers_link=False)
        return page(f"Workers of ESSP run {run}", f"Workers of ESSP run <code>{esc(run)}</code>",
                    workers_body(settings, run, streams), sub=context,
                    crumbs=f'<a href="{root}">all runs</a> · <a href="{report}">report of this DAG run</a>')

    return app
