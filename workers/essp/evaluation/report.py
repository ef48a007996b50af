"""The run report: training curves, per-stream and fused evaluation, and the fusion comparison of one
run, as JSON, PNG plots and a short markdown summary in S3.

Layout in the runs bucket::

    <run>/report/report.json      the report (:func:`build_report`)
    <run>/report/loss.png         training and validation loss per epoch, two lines per stream
    <run>/report/accuracy.png     training accuracy and validation top-1 per epoch, two lines per stream
    <run>/report/confusion.png    the selected strategy's confusion matrix
    <run>/report/per_class.png    per-class accuracy of each stream and of the selected strategy
    <run>/report/fusion.png       top-1 of every fusion strategy and stream
    <run>/report/summary.md       the fusion comparison as a markdown table

Inputs are plain dicts and lists (what stages pass each other as JSON). Metric values are fractions
(0..1); a value that is not a finite number is stored as ``null``.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
from typing import Any

from essp.clients.s3 import ObjectNotFound, ObjectStore, S3Uri
from essp.contract import check_run_id
from essp.errors import EsspError
from essp.evaluation.metrics import SUMMARY_METRICS
from essp.settings import Settings
from essp.training.validation import best_epoch

REPORT_PREFIX = "report"
REPORT_FILE = "report.json"
SUMMARY_FILE = "summary.md"
PLOTS = ("loss.png", "accuracy.png", "confusion.png", "per_class.png", "fusion.png")
PLOT_DPI = 100
BASE_SIZE = (6.0, 4.0)  # inches: 600 x 400 px at PLOT_DPI for small runs
MAX_ANNOTATED_CLASSES = 30  # counts are written into confusion cells up to this many classes
STREAM_PREFIX = "stream:"  # fusion-table rows that are a single stream, not a fusion strategy
_SCALARS = SUMMARY_METRICS
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ReportNotFound(ObjectNotFound):
    """The run has no report in S3."""


# ---------------------------------------------------------------------------------------------
# building


def _number(value: Any, where: str, *, required: bool = False) -> float | None:
    """A finite float, None for a missing or non-finite value; an error for a non-number."""
    if value is None:
        if required:
            raise EsspError(f"{where} is missing: it must be a number")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EsspError(f"{where} is {value!r}: it must be a number")
    value = float(value)
    if not math.isfinite(value):
        if required:
            raise EsspError(f"{where} is {value}: it must be a finite number")
        return None
    return value


def _metrics(metrics: Any, where: str, num_classes: int) -> dict[str, Any]:
    """Validated metrics: top1 required, other scalars optional, shapes checked against the classes."""
    if not isinstance(metrics, dict):
        raise EsspError(f"{where} is {type(metrics).__name__}: it must be a dict of metrics")
    out: dict[str, Any] = dict(metrics)
    out["top1"] = _number(metrics.get("top1"), f"{where}['top1']", required=True)
    for key in _SCALARS[1:]:
        out[key] = _number(metrics.get(key), f"{where}[{key!r}]")
    videos = metrics.get("videos")
    if videos is not None and (isinstance(videos, bool) or not isinstance(videos, int) or videos < 0):
        raise EsspError(f"{where}['videos'] is {videos!r}: it must be a count")
    out["videos"] = videos
    per_class = metrics.get("per_class_accuracy")
    if per_class is not None:
        if not isinstance(per_class, list) or len(per_class) != num_classes:
            raise EsspError(f"{where}['per_class_accuracy'] must be a list of {num_classes} values (one per "
                            f"class), got {per_class!r:.80}")
        per_class = [_number(v, f"{where}['per_class_accuracy'][{i}]") for i, v in enumerate(per_class)]
    out["per_class_accuracy"] = per_class
    confusion = metrics.get("confusion")
    if confusion is not None:
        if (not isinstance(confusion, list) or len(confusion) != num_classes
                or any(not isinstance(row, list) or len(row) != num_classes for row in confusion)):
            raise EsspError(f"{where}['confusion'] must be a {num_classes} x {num_classes} list of counts")
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                    raise EsspError(f"{where}['confusion'][{i}][{j}] is {count!r}: it must be a count")
    out["confusion"] = confusion
    return out


def _history(history: Any) -> dict[str, list[dict[str, Any]]]:
    if not isinstance(history, dict):
        raise EsspError(f"history is {type(history).__name__}: it must map stream -> list of epochs")
    out: dict[str, list[dict[str, Any]]] = {}
    for stream, epochs in history.items():
        if not isinstance(epochs, list) or any(not isinstance(e, dict) for e in epochs):
            raise EsspError(f"history[{stream!r}] must be a list of per-epoch dicts")
        rows = []
        for i, epoch in enumerate(epochs):
            where = f"history[{stream!r}][{i}]"
            number = epoch.get("epoch")
            if isinstance(number, bool) or not isinstance(number, int):
                raise EsspError(f"{where}['epoch'] is {number!r}: it must be an integer")
            row = dict(epoch)
            for key in ("loss", "accuracy", "samples_per_s", "data_wait", "lr"):
                row[key] = _number(epoch.get(key), f"{where}[{key!r}]")
            rows.append(row)
        out[stream] = sorted(rows, key=lambda r: r["epoch"])
    return out


def _final(epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """The last epoch's training figures of one stream."""
    if not epochs:
        return {"epochs": 0}
    last = epochs[-1]
    samples = [e.get("samples") for e in epochs]
    best = best_epoch(epochs)
    return {
        "final_val_loss": last.get("val_loss"),
        "final_val_top1": last.get("val_top1"),
        "best_epoch": None if best is None else best["epoch"],
        "best_val_loss": None if best is None else best["val_loss"],
        "best_val_top1": None if best is None else best.get("val_top1"),
        "epochs": len(epochs),
        "last_epoch": last["epoch"],
        "final_loss": last.get("loss"),
        "final_accuracy": last.get("accuracy"),
        "final_samples_per_s": last.get("samples_per_s"),
        "final_data_wait": last.get("data_wait"),
        "final_lr": last.get("lr"),
        "total_samples": sum(samples) if all(isinstance(s, int) for s in samples) else None,
    }


def _row(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    kind = "stream" if name.startswith(STREAM_PREFIX) else "fusion"
    if "skipped" in metrics:
        return {"name": name, "kind": kind, "skipped": str(metrics["skipped"]),
                **{key: None for key in (*_SCALARS, "videos")}}
    return {"name": name, "kind": kind, "skipped": None, **{key: metrics[key] for key in (*_SCALARS, "videos")}}


def build_report(run: str, params: dict, history: dict, evaluation: dict) -> dict:
    """A JSON-able report of one run: what the training did, how each stream and fusion scored, and
    which strategy was selected, so the run can be judged without the training logs."""
    try:
        check_run_id(run)
    except ValueError as exc:
        raise EsspError(str(exc)) from None
    if not isinstance(evaluation, dict):
        raise EsspError(f"evaluation of run {run!r} is {type(evaluation).__name__}: it must be a dict")
    class_names = evaluation.get("class_names")
    if not isinstance(class_names, list) or not class_names or not all(isinstance(c, str) for c in class_names):
        raise EsspError(f"evaluation['class_names'] of run {run!r} must be a non-empty list of class names")
    num_classes = len(class_names)
    stream_metrics_in = evaluation.get("streams") or {}
    fusion_in = evaluation.get("fusion") or {}
    if not isinstance(stream_metrics_in, dict) or not isinstance(fusion_in, dict):
        raise EsspError(f"evaluation['streams'] and evaluation['fusion'] of run {run!r} must be dicts")
    stream_metrics = {s: _metrics(m, f"evaluation['streams'][{s!r}]", num_classes)
                      for s, m in stream_metrics_in.items()}
    fusion: dict[str, dict[str, Any]] = {}
    for name, metrics in fusion_in.items():
        if isinstance(metrics, dict) and "skipped" in metrics:
            fusion[name] = {"skipped": str(metrics["skipped"])}
        else:
            fusion[name] = _metrics(metrics, f"evaluation['fusion'][{name!r}]", num_classes)
    # Single streams take part in the comparison even when the evaluation did not list them there.
    candidates = dict(fusion)
    for stream, metrics in stream_metrics.items():
        candidates.setdefault(STREAM_PREFIX + stream, metrics)

    selected = evaluation.get("selected")
    known = ", ".join(candidates) or "none"
    if not isinstance(selected, str) or selected not in candidates:
        raise EsspError(f"evaluation['selected'] of run {run!r} is {selected!r}, which is not in the fusion "
                        f"table ({known})")
    if "skipped" in candidates[selected]:
        raise EsspError(f"evaluation['selected'] of run {run!r} is {selected!r}, which was skipped: "
                        f"{candidates[selected]['skipped']}")
    selected_metrics = candidates[selected]

    table = [_row(name, metrics) for name, metrics in candidates.items()]
    table.sort(key=lambda r: (r["skipped"] is not None, -(r["top1"] if r["top1"] is not None else -1.0), r["name"]))
    for row in table:
        row["selected"] = row["name"] == selected

    hist = _history(history)
    streams: dict[str, dict[str, Any]] = {}
    for stream in [*hist, *(s for s in stream_metrics if s not in hist)]:
        figures = _final(hist.get(stream, []))
        if stream in stream_metrics:
            figures.update({key: stream_metrics[stream][key] for key in (*_SCALARS, "videos")})
        streams[stream] = figures

    best_stream = max(stream_metrics, key=lambda s: stream_metrics[s]["top1"], default=None)
    best_top1 = stream_metrics[best_stream]["top1"] if best_stream is not None else None
    summary = {
        "num_classes": num_classes,
        "chance": 1.0 / num_classes,
        "best_stream": best_stream,
        "best_stream_top1": best_top1,
        "selected": selected,
        "selected_top1": selected_metrics["top1"],
        "fused_ge_best_stream": None if best_top1 is None else selected_metrics["top1"] >= best_top1,
        "fused_gain": None if best_top1 is None else selected_metrics["top1"] - best_top1,
    }
    return {
        "v": 1,
        "run": run,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "params": dict(params or {}),
        "class_names": list(class_names),
        "history": hist,
        "streams": streams,
        "evaluation": {"streams": stream_metrics, "fusion": fusion,
                       # the videos the learned fusions were fitted on (the validation split)
                       "fusion_fit": evaluation.get("fusion_fit")},
        "fusion_table": table,
        "selected": selected,
        "selected_metrics": selected_metrics,
        "summary": summary,
    }


# ---------------------------------------------------------------------------------------------
# text


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def summary_lines(report: dict) -> list[str]:
    """Lines for the CLI: how each stream and fusion strategy scored, the selected one marked."""
    summary = report["summary"]
    lines = [f"run {report['run']}: {summary['num_classes']} classes, chance {_pct(summary['chance'])}"]
    for stream, figures in report["streams"].items():
        if "top1" not in figures:
            lines.append(f"  stream {stream}: not evaluated")
            continue
        lines.append(f"  stream {stream}: top1 {_pct(figures['top1'])}  top5 {_pct(figures['top5'])}  "
                     f"mAP {_pct(figures['mAP'])}  ({figures.get('videos') or '?'} videos)")
        if figures.get("best_epoch") is not None:
            lines.append(f"    validation: best epoch {figures['best_epoch']} (loss {figures['best_val_loss']:.3f}, "
                         f"top1 {_pct(figures.get('best_val_top1'))}); last epoch top1 "
                         f"{_pct(figures.get('final_val_top1'))}")
    for decision in (report.get("allocation") or {}).get("decisions", []):
        lines.append(f"  slots before epoch {decision['epoch']}: {decision['reason']}")
    if report.get("early_stop"):
        lines.append(f"  stopped early after epoch {report['early_stop']['epoch']}: {report['early_stop']['reason']}")
    fit = (report.get("evaluation") or {}).get("fusion_fit")
    if fit:
        lines.append(f"  learned fusions ({', '.join(fit['strategies'])}) fitted on {len(fit['videos'])} "
                     f"{fit['split']} videos only")
    width = max(len(row["name"]) for row in report["fusion_table"])
    for row in report["fusion_table"]:
        mark = "*" if row["selected"] else " "
        what = f"skipped: {row['skipped']}" if row["skipped"] is not None else f"top1 {_pct(row['top1'])}"
        lines.append(f"{mark} {row['name']:<{width}}  {what}{'  (selected)' if row['selected'] else ''}")
    if summary["best_stream"] is not None:
        verdict = "yes" if summary["fused_ge_best_stream"] else "no"
        lines.append(f"selected {summary['selected']} {_pct(summary['selected_top1'])} vs best stream "
                     f"{summary['best_stream']} {_pct(summary['best_stream_top1'])}: at least as good: {verdict}")
    return lines


def summary_markdown(report: dict) -> str:
    """The fusion comparison as a markdown table (what summary.md holds)."""
    summary = report["summary"]
    out = [f"# Run {report['run']}", "",
           f"{summary['num_classes']} classes (chance {_pct(summary['chance'])}); selected: "
           f"**{summary['selected']}** (top1 {_pct(summary['selected_top1'])})"]
    if summary["best_stream"] is not None:
        out[-1] += (f"; best stream: {summary['best_stream']} (top1 {_pct(summary['best_stream_top1'])}), "
                    f"fused >= best stream: {'yes' if summary['fused_ge_best_stream'] else 'no'}")
    out += ["", "| | strategy | top1 | top5 | mean class acc. | mAP | videos |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for row in report["fusion_table"]:
        mark = "**selected**" if row["selected"] else ""
        if row["skipped"] is not None:
            reason = row["skipped"].replace("|", "\\|").replace("\n", " ")
            out.append(f"| {mark} | {row['name']} | skipped: {reason} | | | | |")
        else:
            out.append(f"| {mark} | {row['name']} | {_pct(row['top1'])} | {_pct(row['top5'])} | "
                       f"{_pct(row['mean_class_accuracy'])} | {_pct(row['mAP'])} | {row['videos'] or ''} |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# plots


def plot_size(name: str, report: dict) -> tuple[float, float]:
    """Figure size in inches of plot `name`: 6 x 4, larger where many classes or rows need room."""
    classes = len(report["class_names"])
    if name == "confusion.png" and classes > 12:
        side = min(4 + 0.3 * (classes - 12), 14.0)
        return (side + 2, side)
    if name == "per_class.png" and classes > 12:
        return (min(6 + 0.12 * (classes - 12), 20.0), 4.0 if classes <= 30 else 5.0)
    if name == "fusion.png" and len(report["fusion_table"]) > 8:
        return (6.0, min(4 + 0.35 * (len(report["fusion_table"]) - 8), 12.0))
    return BASE_SIZE


def _tick_style(classes: int) -> dict[str, Any]:
    """Class-name tick labels: slanted for a few classes, vertical and small for many."""
    if classes <= 12:
        return {"rotation": 45, "ha": "right", "rotation_mode": "anchor", "fontsize": 8}
    return {"rotation": 90, "ha": "center", "fontsize": 8 if classes <= 30 else 6}


def _per_class(metrics: dict[str, Any]) -> list[float] | None:
    """Per-class accuracy as given, else from the confusion matrix's rows (NaN where unknown)."""
    if metrics.get("per_class_accuracy") is not None:
        return [math.nan if v is None else v for v in metrics["per_class_accuracy"]]
    confusion = metrics.get("confusion")
    if confusion is None:
        return None
    return [row[i] / sum(row) if sum(row) else math.nan for i, row in enumerate(confusion)]


def render_plots(report: dict) -> dict[str, bytes]:
    """PNG bytes of every plot of the report, rendered in memory with Agg (no pyplot, no display)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    def figure(name: str) -> tuple[Figure, Any]:
        fig = Figure(figsize=plot_size(name, report), dpi=PLOT_DPI, layout="constrained")
        FigureCanvasAgg(fig)
        return fig, fig.add_subplot()

    def png(fig: Figure) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=PLOT_DPI)
        return buf.getvalue()

    def empty(ax: Any, text: str) -> None:
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])

    run = report["run"]
    class_names = report["class_names"]
    classes = len(class_names)
    selected = report["selected"]
    out: dict[str, bytes] = {}

    for key, label, val_key in (("loss", "loss", "val_loss"), ("accuracy", "accuracy", "val_top1")):
        fig, ax = figure(f"{key}.png")
        lines = 0
        for n, (stream, epochs) in enumerate(report["history"].items()):
            colour = f"C{n}"
            # training solid, validation (video-level top-1 for accuracy) dashed in the stream's colour
            for which, style, name in ((key, "-", "train"), (val_key, "--", "validation")):
                points = [(e["epoch"], e[which]) for e in epochs if e.get(which) is not None]
                if points:
                    ax.plot(*zip(*points, strict=True), style, marker="o", color=colour, label=f"{stream} {name}")
                    lines += 1
        if lines:
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if key == "accuracy":
                ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.legend()
        else:
            empty(ax, f"no {label} recorded")
        ax.set_title(f"training and validation {label} per epoch: {run}")
        out[f"{key}.png"] = png(fig)

    fig, ax = figure("confusion.png")
    confusion = report["selected_metrics"].get("confusion")
    if confusion is not None:
        matrix = np.asarray(confusion, dtype=np.int64)
        image = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="videos")
        step = max(1, math.ceil(classes / 40))
        ticks = list(range(0, classes, step))
        ax.set_xticks(ticks, [class_names[i] for i in ticks], **_tick_style(classes))
        ax.set_yticks(ticks, [class_names[i] for i in ticks], fontsize=8 if classes <= 30 else 6)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if classes <= MAX_ANNOTATED_CLASSES:
            threshold = matrix.max() / 2 if matrix.size else 0
            for i in range(classes):
                for j in range(classes):
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8 if classes <= 12 else 6,
                            color="white" if matrix[i, j] > threshold else "black")
    else:
        empty(ax, f"{selected}: no confusion matrix")
    ax.set_title(f"confusion: {selected}")
    out["confusion.png"] = png(fig)

    fig, ax = figure("per_class.png")
    series = [(stream, _per_class(m)) for stream, m in report["evaluation"]["streams"].items()]
    series = [(f"stream {s}", v) for s, v in series if v is not None]
    if not selected.startswith(STREAM_PREFIX):
        values = _per_class(report["selected_metrics"])
        if values is not None:
            series.append((f"fusion {selected}", values))
    if series:
        width = 0.8 / len(series)
        x = np.arange(classes)
        for k, (label, values) in enumerate(series):
            ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, label=label)
        step = max(1, math.ceil(classes / 60))
        ax.set_xticks(x[::step], class_names[::step], **_tick_style(classes))
        ax.set_ylim(0, 1)
        ax.set_xlabel("class")
        ax.set_ylabel("accuracy")
        ax.axhline(1 / classes, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.legend(fontsize=8)
    else:
        empty(ax, "no per-class accuracy")
    ax.set_title(f"per-class accuracy: {run}")
    out["per_class.png"] = png(fig)

    fig, ax = figure("fusion.png")
    rows = [r for r in report["fusion_table"] if r["skipped"] is None][::-1]  # best on top
    if rows:
        colors = ["tab:orange" if r["selected"] else "tab:blue" if r["kind"] == "fusion" else "tab:grey"
                  for r in rows]
        bars = ax.barh([r["name"] for r in rows], [r["top1"] for r in rows], color=colors)
        ax.bar_label(bars, labels=[_pct(r["top1"]) for r in rows], padding=2, fontsize=8)
        ax.axvline(report["summary"]["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xlim(0, 1.15)
        ax.set_xlabel("top-1 accuracy")
        ax.set_ylabel("strategy / stream")
        ax.legend(fontsize=8, loc="lower right")
    else:
        empty(ax, "no fusion results")
    skipped = [r["name"] for r in report["fusion_table"] if r["skipped"] is not None]
    ax.set_title(f"top-1 per strategy (selected: {selected})" + (f"; skipped: {', '.join(skipped)}" if skipped
                                                                 else ""), fontsize=9)
    out["fusion.png"] = png(fig)
    return out


# ---------------------------------------------------------------------------------------------
# S3


def _prefix(run: str) -> str:
    try:
        return f"{check_run_id(run)}/{REPORT_PREFIX}"
    except ValueError as exc:
        raise EsspError(str(exc)) from None


def report_uri(settings: Settings, run: str) -> str:
    """Where the report of `run` lives."""
    return str(S3Uri(settings.bucket_runs, f"{_prefix(run)}/{REPORT_FILE}"))


def write_report(settings: Settings, report: dict) -> dict[str, str]:
    """Write the report, its plots and summary.md under ``<run>/report/``; returns name -> URI.

    report.json is written last, so a reader that finds it also finds the plots."""
    prefix = _prefix(report["run"])
    bucket = settings.bucket_runs
    store = ObjectStore(settings)
    store.ensure_bucket(bucket)
    uris: dict[str, str] = {}
    for name, data in render_plots(report).items():
        uris[name] = str(store.put_bytes(bucket, f"{prefix}/{name}", data, content_type="image/png"))
    uris[SUMMARY_FILE] = str(store.put_bytes(bucket, f"{prefix}/{SUMMARY_FILE}", summary_markdown(report).encode(),
                                             content_type="text/markdown; charset=utf-8"))
    uris[REPORT_FILE] = str(store.put_json(bucket, f"{prefix}/{REPORT_FILE}", report))
    return uris


def read_report(settings: Settings, run: str) -> dict:
    """The report of `run` as written by :func:`write_report`."""
    uri = report_uri(settings, run)
    location = S3Uri.parse(uri)
    try:
        raw = ObjectStore(settings).get_bytes(location.bucket, location.key)
    except ObjectNotFound:
        raise ReportNotFound(f"run {run!r} has no report: {uri} not found (is the run finished, and are the "
                             "settings' buckets the run's?)") from None
    try:
        report = json.loads(raw)
    except ValueError as exc:
        raise EsspError(f"report of run {run!r} at {uri} is not JSON: {exc}") from None
    if not isinstance(report, dict) or report.get("run") != run:
        raise EsspError(f"report of run {run!r} at {uri} is not a report of that run")
    return report
