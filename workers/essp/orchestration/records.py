"""The "ESSP report" tab of a DAG run that trains no ESSP run, in words (the UI shows the tab on every DAG
run): what essp_control did to which run, what essp_predict scored and where the predictions are, why a
nightly run had nothing to train, the one line a run was refused with before it started, or, with no
record yet, what the DAG run will show once its task has run.

:func:`record_view` turns the DAG run's record (:func:`essp.orchestration.links.save_dag_run_record`)
into the values of ``record.html``: a title, a sentence, its CSS kind, facts and links.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from essp.clients.s3 import ObjectNotFound, ObjectStore, S3Uri
from essp.errors import EsspError
from essp.orchestration.links import dag_run_of
from essp.settings import Settings

TRAINING_DAGS = ("essp_train", "essp_nightly_retrain")
PREDICTIONS_SHOWN = 20


def _q(segment: str) -> str:
    return quote(segment, safe="")


def _run_links(settings: Settings, run: str, root: str) -> list[tuple[str, str, bool]]:
    """Links to a run's report tab (inside the app) and its DAG run's page in Airflow: (text, href, top)."""
    links = [(f"the report of run {run}", f"{root}runs/{_q(run)}", False)]
    dag_run = dag_run_of(settings, run)
    if dag_run is not None:
        base = f"dag-runs/{_q(dag_run['dag_id'])}/{_q(dag_run['dag_run_id'])}"
        links = [(f"run {run} as its DAG run shows it", f"{root}{base}", False),
                 (f"{dag_run['dag_id']} DAG run {dag_run['dag_run_id']} in Airflow",
                  f"{root}../dags/{_q(dag_run['dag_id'])}/runs/{_q(dag_run['dag_run_id'])}", True)]
    return links


def _predictions(settings: Settings, uri: str) -> list[dict[str, str]]:
    """The first videos of predictions.json: video, top class and score, or its error."""
    try:
        location = S3Uri.parse(uri)
        found = ObjectStore(settings).get_json(location.bucket, location.key)
    except (ObjectNotFound, ValueError, EsspError):
        return []
    rows = []
    for video in (found.get("videos") or [])[:PREDICTIONS_SHOWN]:
        top = (video.get("top") or [{}])[0]
        rows.append({"video": str(video.get("video", "")), "class": str(top.get("class", "")),
                     "score": f"{float(top['score']):.3f}" if "score" in top else "",
                     "error": str(video.get("error", ""))})
    return rows


def record_view(settings: Settings, dag_id: str, dag_run_id: str, record: dict[str, Any] | None,
                root: str) -> dict[str, Any]:
    """title, sentence, kind ("msg", "msg good", "msg error"), facts [(key, value)], links [(text, href, top)],
    predictions (rows) and refresh (reload the page: the DAG run has not recorded its outcome yet)."""
    view: dict[str, Any] = {"dag_id": dag_id, "dag_run_id": dag_run_id, "facts": [], "links": [],
                            "predictions": [], "refresh": False, "kind": "msg"}
    record = record or {}
    control, predictions, skipped, error = (record.get(k) for k in ("control", "predictions", "skipped", "error"))
    if error:
        what = "essp_control refused the command" if control else "The run was refused before it started"
        view.update(title="Refused", kind="msg error", sentence=f"{what}: {error}")
        if control and control.get("run"):
            view["facts"] = [("command", control.get("command")), ("run", control.get("run"))]
    elif control:
        view.update(title=f"{control.get('command', 'control')} sent to run {control.get('run')}", kind="msg good",
                    sentence=str(control.get("message", "")).capitalize(),
                    facts=[("command", control.get("command")), ("run", control.get("run")),
                           ("state before", control.get("before")), ("state after", control.get("state")),
                           *((f"trainer {s}", st) for s, st in (control.get("trainers") or {}).items())])
        view["links"] = _run_links(settings, str(control.get("run")), root)
    elif predictions:
        failed = predictions.get("failed") or []
        view.update(title="Predictions", kind="msg good" if not failed else "msg",
                    sentence=(f"Scored {predictions.get('videos')} video(s) under {predictions.get('prefix')} with "
                              f"{predictions.get('registry')} v{predictions.get('version')} "
                              f"({predictions.get('fusion')} fusion)" + (f"; {len(failed)} could not be read"
                                                                          if failed else "") + "."),
                    facts=[("registry", f"{predictions.get('registry')} v{predictions.get('version')}"),
                           ("fusion", predictions.get("fusion")), ("predictions.json", predictions.get("json")),
                           ("predictions.csv", predictions.get("csv")),
                           *((("could not be read", ", ".join(failed)),) if failed else ())],
                    predictions=_predictions(settings, str(predictions.get("json", ""))))
    elif skipped:
        view.update(title="Nothing to train tonight",
                    sentence=(f"This nightly run skipped training: {skipped.get('reason')}. Its tasks after "
                              "`changed` are skipped, and production stays as it is."),
                    facts=[("registry", skipped.get("registry"))])
    elif dag_id in TRAINING_DAGS:
        view.update(title="Not started yet", refresh=True,
                    sentence=(f"DAG run {dag_run_id} of {dag_id} has not started an ESSP run yet: its first task "
                              "records the run it trains, and this page shows it from then on."))
    elif dag_id in ("essp_control", "essp_predict"):
        view.update(title="Not done yet", refresh=True,
                    sentence=f"DAG run {dag_run_id} of {dag_id} has not finished its task yet: this page says what it "
                             "did once it has.")
    else:
        view.update(title="No ESSP run",
                    sentence=(f"{dag_id} trains no ESSP run, so this tab has nothing to show for it: it shows the "
                              "runs of essp_train and essp_nightly_retrain, and what essp_control and essp_predict "
                              "did."))
    return view
