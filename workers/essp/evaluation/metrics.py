"""Video-level classification metrics for score matrices (N videos x C classes of class probabilities).

Everything returned by :func:`video_metrics` is plain Python (ints, floats, lists, None), so a report
can be written with ``json.dump`` as it stands. Ties between scores are broken stably (the lower
class index, or the earlier video, ranks first), so every metric is deterministic.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from essp.dataplane.snippets import DEFAULT_SNIPPETS  # noqa: F401 - re-exported
from essp.errors import EsspError

# The video-level figures every report, registry version and comparison carries, in this order; a model
# is promoted on one of them (the `promote_metric` param).
SUMMARY_METRICS: tuple[str, ...] = ("top1", "top5", "mean_class_accuracy", "mAP")
PROMOTION_METRICS: list[str] = list(SUMMARY_METRICS)
# The paper's evaluation protocol: each video scored on 25 evenly spaced snippets, the scores averaged
# (essp.dataplane.snippets.DEFAULT_SNIPPETS, re-exported here).


class MetricsError(EsspError, ValueError):
    """Scores, labels or class names that metrics cannot be computed on; the message says which and why."""


def _check_scores(scores: object, name: str = "scores") -> np.ndarray:
    """Return `scores` as a finite float (N, C) array with N, C >= 1, or raise naming the problem."""
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MetricsError(f"{name}: not a numeric array ({exc})") from exc
    if arr.ndim != 2:
        raise MetricsError(f"{name}: must be 2-D (videos, classes), got shape {arr.shape}")
    if arr.shape[0] < 1:
        raise MetricsError(f"{name}: has no videos (shape {arr.shape})")
    if arr.shape[1] < 1:
        raise MetricsError(f"{name}: has no classes (shape {arr.shape})")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise MetricsError(f"{name}: contains {bad} NaN or infinite value(s)")
    return arr


def _check_labels(labels: object, videos: int, classes: int, name: str = "labels") -> np.ndarray:
    """Return `labels` as an int64 (N,) array of class indices in [0, classes), or raise naming the problem."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise MetricsError(f"{name}: must be 1-D (videos,), got shape {arr.shape}")
    if arr.shape[0] != videos:
        raise MetricsError(f"{name}: has {arr.shape[0]} entries but scores have {videos} videos")
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise MetricsError(f"{name}: must be integer class indices, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise MetricsError(f"{name}: must be integer class indices, got non-integer values")
    arr = arr.astype(np.int64)
    out_of_range = (arr < 0) | (arr >= classes)
    if out_of_range.any():
        first = int(np.flatnonzero(out_of_range)[0])
        raise MetricsError(f"{name}: {int(out_of_range.sum())} label(s) outside [0, {classes}), "
                           f"e.g. video {first} has {int(arr[first])}")
    return arr


def _ranked_classes(scores: np.ndarray) -> np.ndarray:
    """Class indices of each row from highest to lowest score, ties to the lower class index."""
    return np.argsort(-scores, axis=1, kind="stable")


def top_k(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of videos whose true class is among their k highest-scored classes (k is capped at C)."""
    arr = _check_scores(scores)
    lab = _check_labels(labels, arr.shape[0], arr.shape[1])
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise MetricsError(f"k: must be a positive integer, got {k!r}")
    k = min(int(k), arr.shape[1])
    top = _ranked_classes(arr)[:, :k]
    return float((top == lab[:, None]).any(axis=1).mean())


def average_precision(scores_col: np.ndarray, positives: np.ndarray) -> float:
    """Average precision of ranking the videos by `scores_col` (highest first) for the `positives` mask.

    AP = (sum over positive videos of the precision at that video's rank) / (number of positives); tied
    scores keep their input order. Without ties this equals sklearn's ``average_precision_score``.
    """
    col = np.asarray(scores_col, dtype=np.float64)
    pos = np.asarray(positives)
    if col.ndim != 1:
        raise MetricsError(f"scores_col: must be 1-D (videos,), got shape {col.shape}")
    if pos.shape != col.shape:
        raise MetricsError(f"positives: shape {pos.shape} does not match scores_col shape {col.shape}")
    if not np.isfinite(col).all():
        raise MetricsError("scores_col: contains NaN or infinite values")
    if pos.dtype != np.bool_:
        if not np.isin(pos, (0, 1)).all():
            raise MetricsError("positives: must be a boolean mask (or 0/1), got other values")
        pos = pos.astype(bool)
    n_pos = int(pos.sum())
    if n_pos == 0:
        raise MetricsError("positives: no positive video, so average precision is undefined")
    order = np.argsort(-col, kind="stable")
    hits = pos[order]
    ranks = np.arange(1, col.shape[0] + 1)
    precision_at_hits = np.cumsum(hits)[hits] / ranks[hits]
    return float(precision_at_hits.sum() / n_pos)


def video_metrics(scores: np.ndarray, labels: np.ndarray, class_names: list[str] | None = None) -> dict[str, Any]:
    """Top-1/top-5 accuracy, mean class accuracy, mAP, per-class accuracy and the confusion matrix, as plain values.

    ``top5`` uses k = min(5, C). ``mean_class_accuracy`` and ``mAP`` average only over the classes that
    have at least one video, and ``per_class_accuracy`` holds None for the others, so a test split that
    lacks a class does not drag the means down with undefined zeros.
    """
    arr = _check_scores(scores)
    n, c = arr.shape
    lab = _check_labels(labels, n, c)
    if class_names is not None:
        names = list(class_names)
        if len(names) != c or not all(isinstance(x, str) for x in names):
            raise MetricsError(f"class_names: must be {c} strings (one per score column), got {len(names)} entries")

    predicted = _ranked_classes(arr)[:, 0]
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (lab, predicted), 1)
    support = confusion.sum(axis=1)
    per_class: list[float | None] = [
        float(confusion[i, i] / support[i]) if support[i] > 0 else None for i in range(c)
    ]
    present = [x for x in per_class if x is not None]
    aps = [average_precision(arr[:, i], lab == i) for i in range(c) if support[i] > 0]

    out: dict[str, Any] = {
        "videos": int(n),
        "top1": float((predicted == lab).mean()),
        "top5": top_k(arr, lab, min(5, c)),
        "mean_class_accuracy": float(np.mean(present)),
        "mAP": float(np.mean(aps)),
        "per_class_accuracy": per_class,
        "confusion": confusion.tolist(),
    }
    if class_names is not None:
        out["class_names"] = names
    return out
