"""A run in progress as its report tab shows it (essp.orchestration.webui's status page): the phase it is in,
in words; each stream's trainer; the training curves so far, drawn as inline SVG (the pages allow no
script, and no image but their own); samples/s and data wait per stream; and scoring progress.

Everything comes from small reads: the trainers' states in Redis, each stream's checkpoint pointer
(its per-epoch figures, :mod:`essp.lifecycle.progress`), the run's control state and the scoring hash.
"""

from __future__ import annotations

import time
from typing import Any

from markupsafe import Markup, escape

from essp.contract import epoch_progress
from essp.dataplane.resident import RunControl
from essp.errors import EsspError
from essp.lifecycle.epochs import trainer_states
from essp.lifecycle.params import RunParams
from essp.lifecycle.progress import scoring_progress, stream_histories
from essp.settings import Settings

SPLIT_WORDS = {"test": "the test videos", "val": "the validation videos", "train": "the training videos"}
COLOURS = ["#0b6bcb", "#d9480f", "#2b8a3e", "#7048e8", "#c2255c", "#1098ad"]
# (training figure, its validation figure drawn dashed beside it, title, percent)
CURVES = (("loss", "val_loss", "loss: training, validation (dashed)", False),
          ("accuracy", "val_top1", "accuracy: training, validation top-1 (dashed)", True))


def figure(value: Any, digits: int = 3) -> str:
    """A figure as the pages write it: ``n/a`` for none, a float to ``digits`` places (tiny ones in g format)."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    return str(value)


def age(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return ""
    seconds = max(0.0, time.time() - ts)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def trainer_rows(settings: Settings, run: str, spec: RunParams) -> tuple[list[dict[str, Any]], str, int]:
    """Each stream's trainer state as the status page shows it (stream and either error (the states could
    not be read), or started (False: no state yet) and status, epochs, worker, updated, figures, detail),
    a line saying where the run's current epoch stands (:func:`essp.contract.epoch_progress`), and the
    number of epochs every stream has finished."""
    try:
        states = trainer_states(settings, run, spec.streams)
        run_state = RunControl(settings).get(run, fresh=True)
    except EsspError as exc:
        return [{"stream": stream, "error": str(exc)} for stream in spec.streams], "", 0
    rows: list[dict[str, Any]] = []
    for stream, state in states.items():
        if state is None:
            rows.append({"stream": stream, "error": None, "started": False})
            continue
        figures = ", ".join(f"{k} {figure(state.stats[k])}" for k in ("loss", "accuracy", "samples_per_s")
                            if k in state.stats)
        rows.append({"stream": stream, "error": None, "started": True, "status": state.status,
                     "epochs": f"{state.epoch_done + 1} / {spec.epochs}", "worker": state.worker,
                     "updated": age(state.updated_at), "figures": figures, "detail": state.detail or ""})
    epoch = min((s.epoch_done + 1 if s else 0) for s in states.values())
    if epoch >= spec.epochs:
        return rows, f"all {spec.epochs} epochs trained", epoch
    progress = epoch_progress(run, epoch, states, run_state=run_state)
    line = {"done": f"epoch {epoch + 1} of {spec.epochs} done",
            "waiting": f"training epoch {epoch + 1} of {spec.epochs}"}.get(
        progress.status, f"epoch {epoch + 1} of {spec.epochs}: {progress.status} - {progress.detail}")
    return rows, line, epoch


def stream_figures(spec: RunParams, histories: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per stream: epochs finished, the last epoch's loss, accuracy, samples/s, data wait, validation loss and
    top-1, and the mean samples/s over the finished epochs."""
    rows = []
    for stream in spec.streams:
        history = histories.get(stream) or []
        last = history[-1] if history else {}
        speeds = [float(h["samples_per_s"]) for h in history if isinstance(h.get("samples_per_s"), int | float)]
        wait = last.get("data_wait")
        rows.append({"stream": stream, "epochs": len(history), "loss": figure(last.get("loss")),
                     "accuracy": "n/a" if last.get("accuracy") is None else f"{100 * float(last['accuracy']):.1f}%",
                     "samples_per_s": figure(last.get("samples_per_s"), 1) if last else "n/a",
                     "mean_samples_per_s": f"{sum(speeds) / len(speeds):.1f}" if speeds else "n/a",
                     "data_wait": "n/a" if wait is None else f"{100 * float(wait):.1f}%",
                     "val_loss": figure(last.get("val_loss")),
                     "val_top1": "n/a" if last.get("val_top1") is None else f"{100 * float(last['val_top1']):.1f}%"})
    return rows


def curve_svg(histories: dict[str, list[dict[str, Any]]], key: str, title: str, *, percent: bool = False,
              epochs: int | None = None, width: int = 440, height: int = 220, val_key: str | None = None) -> Markup:
    """One figure of every stream's ``key`` by epoch, as an inline SVG (one line and its points per stream,
    ``val_key`` beside it dashed in the same colour, the axes' range written out, a legend); empty streams are
    left out."""
    left, right, top, bottom = 52, 12, 26, 34

    def points_of(hist: list[dict[str, Any]], name: str | None) -> list[tuple[int, float]]:
        return [(int(h.get("epoch", i)), float(h[name])) for i, h in enumerate(hist)
                if name and isinstance(h.get(name), int | float)]

    series = {s: points_of(hist, key) for s, hist in histories.items()}
    series = {s: points for s, points in series.items() if points}
    validation = {s: points_of(histories[s], val_key) for s in series}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" data-curve="{escape(key)}" aria-label="{escape(title)} by epoch">',
             f'<text x="{left}" y="16" font-size="13" font-weight="600" fill="#1f2933">{escape(title)}</text>']
    plot_w, plot_h = width - left - right, height - top - bottom
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fbfcfd" stroke="#d3d9e0"/>')
    if not series:
        parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" font-size="12" fill="#616e7c" '
                     'text-anchor="middle">no epoch finished yet</text></svg>')
        return Markup("".join(parts))
    values = [v for points in (*series.values(), *validation.values()) for _, v in points]
    low, high = min(values), max(values)
    if percent:
        low, high = min(0.0, low), max(1.0, high)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    last_epoch = max(epochs - 1 if epochs else 0, max(e for points in series.values() for e, _ in points), 1)

    def x(epoch: int) -> float:
        return left + plot_w * epoch / last_epoch

    def y(value: float) -> float:
        return top + plot_h * (1 - (value - low) / (high - low))

    def label(value: float) -> str:
        return f"{100 * value:.0f}%" if percent else figure(value)

    for value in (low, (low + high) / 2, high):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                     'stroke="#e4e8ed"/>')
        parts.append(f'<text x="{left - 4}" y="{y(value) + 4:.1f}" font-size="11" fill="#616e7c" '
                     f'text-anchor="end">{label(value)}</text>')
    for epoch in sorted({0, last_epoch, last_epoch // 2}):
        parts.append(f'<text x="{x(epoch):.1f}" y="{top + plot_h + 14}" font-size="11" fill="#616e7c" '
                     f'text-anchor="middle">{epoch + 1}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" font-size="11" fill="#616e7c" '
                 'text-anchor="middle">epoch</text>')
    for i, (stream, points) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{x(e):.1f},{y(v):.1f}" for e, v in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2" '
                     f'data-stream="{escape(stream)}"/>')
        parts += [f'<circle cx="{x(e):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"><title>{escape(stream)} epoch '
                  f'{e + 1}: {label(v)}</title></circle>' for e, v in points]
        held = validation.get(stream) or []
        if held:
            path = " ".join(f"{x(e):.1f},{y(v):.1f}" for e, v in held)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2" '
                         f'stroke-dasharray="5 3" data-stream="{escape(stream)}" data-validation="{escape(val_key)}"/>')
            parts += [f'<circle cx="{x(e):.1f}" cy="{y(v):.1f}" r="2.5" fill="#fff" stroke="{colour}"><title>'
                      f'{escape(stream)} epoch {e + 1}, validation: {label(v)}</title></circle>' for e, v in held]
        lx = left + plot_w - (150 if held else 110)
        parts.append(f'<rect x="{lx}" y="{top + 8 + 16 * i}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{lx + 14}" y="{top + 17 + 16 * i}" font-size="11" fill="#1f2933">'
                     f'{escape(stream)} {label(points[-1][1])}'
                     + (f' / val {label(held[-1][1])}' if held else '') + '</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def scoring_rows(progress: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each split's scoring: what is scored, videos done of N, finished, percent (for a bar)."""
    rows = []
    for split in ("test", "val", *sorted(set(progress) - {"test", "val"})):
        entry = progress.get(split)
        if not entry:
            continue
        total = max(int(entry.get("total", 0)), 0)
        scored = min(max(int(entry.get("scored", 0)), 0), total) if total else 0
        rows.append({"split": split, "what": SPLIT_WORDS.get(split, f"the {split} videos"), "scored": scored,
                     "total": total, "finished": bool(entry.get("finished")),
                     "percent": round(100 * scored / total) if total else 0, "updated": age(entry.get("updated_at"))})
    return rows


def run_phase(spec: RunParams | None, run_state: str | None, epochs_done: int, scoring: list[dict[str, Any]],
              epoch_line: str) -> tuple[str, str]:
    """(phase, sentence): the phase a started run without a report is in (preparing, training, paused,
    stopped, scoring, reporting) and what it is doing, in words."""
    if spec is None:
        return "preparing", "Preparing: checking the dataset's manifest and starting the workers."
    if run_state == "stopped":
        return "stopped", (f"Stopped after {epochs_done} of {spec.epochs} epochs: trigger essp_train again with "
                           "the same run to go on from its checkpoints.")
    if run_state == "paused":
        return "paused", (f"Paused at epoch {min(epochs_done + 1, spec.epochs)} of {spec.epochs}: "
                          "essp_control resume goes on.")
    if epochs_done < spec.epochs:
        return "training", epoch_line[:1].upper() + epoch_line[1:] + "."
    busy = [row for row in scoring if not row["finished"]]
    if busy:
        row = busy[0]
        return "scoring", f"Scoring {row['what']}: {row['scored']} of {row['total']} scored."
    if {row["split"] for row in scoring} >= {"test", "val"}:
        return "reporting", "Fusing the streams and writing the report."
    return "scoring", f"All {spec.epochs} epochs trained: scoring the videos comes next."


def live_view(settings: Settings, run: str, spec: RunParams | None) -> dict[str, Any]:
    """What the status page shows of a run without a report: phase, sentence, trainers, epoch line,
    figures per stream, curves (SVG), scoring rows."""
    if spec is None:
        phase, sentence = run_phase(None, None, 0, [], "")
        return {"phase": phase, "sentence": sentence, "trainers": None, "progress": "", "figures": [],
                "curves": [], "scoring": []}
    trainers, line, done = trainer_rows(settings, run, spec)
    try:
        histories = stream_histories(settings, run, list(spec.streams))
        scoring = scoring_rows(scoring_progress(settings, run))
        run_state = RunControl(settings).get(run, fresh=True)
    except EsspError:  # the trainers' rows say what is not reachable
        histories, scoring, run_state = {}, [], None
    phase, sentence = run_phase(spec, run_state, done, scoring, line)
    curves = [curve_svg(histories, key, title, percent=percent, epochs=spec.epochs, val_key=val_key)
              for key, val_key, title, percent in CURVES]
    return {"phase": phase, "sentence": sentence, "trainers": trainers, "progress": line,
            "figures": stream_figures(spec, histories), "curves": curves, "scoring": scoring}
