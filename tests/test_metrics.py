"""Video-level metrics on hand-made score matrices whose answers are worked out by hand below."""

from __future__ import annotations

import json

import numpy as np
import pytest

from essp.errors import EsspError
from essp.evaluation.metrics import MetricsError, average_precision, top_k, video_metrics

# Six classes, four videos, labels 0, 1, 5, 1. No ties within any column, so AP equals sklearn's.
#   v0 (label 0): predicted 0 -> right;  true class at rank 1
#   v1 (label 1): predicted 0 -> wrong;  true class at rank 2 (inside top 5)
#   v2 (label 5): predicted 0 -> wrong;  true class at rank 6 (outside top 5)
#   v3 (label 1): predicted 1 -> right
MISTAKES = np.array([
    [0.50, 0.10, 0.11, 0.12, 0.07, 0.10],
    [0.40, 0.30, 0.13, 0.09, 0.04, 0.04],
    [0.30, 0.20, 0.19, 0.15, 0.11, 0.05],
    [0.10, 0.60, 0.14, 0.08, 0.05, 0.03],
])
MISTAKE_LABELS = np.array([0, 1, 5, 1])


def test_perfect_scores():
    scores = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.7, 0.2, 0.1]])
    labels = np.array([0, 1, 2, 0])
    m = video_metrics(scores, labels, class_names=["a", "b", "c"])
    assert m["videos"] == 4
    assert m["top1"] == 1.0
    assert m["top5"] == 1.0
    assert m["mean_class_accuracy"] == 1.0
    assert m["mAP"] == 1.0
    assert m["per_class_accuracy"] == [1.0, 1.0, 1.0]
    assert m["confusion"] == [[2, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert m["class_names"] == ["a", "b", "c"]


def test_known_mistakes():
    m = video_metrics(MISTAKES, MISTAKE_LABELS)
    assert m["videos"] == 4
    assert m["top1"] == pytest.approx(2 / 4)
    assert m["top5"] == pytest.approx(3 / 4)  # only v2's class is ranked 6th
    # Classes present: 0 (1/1 right), 1 (1/2 right), 5 (0/1 right); classes 2, 3, 4 have no video.
    assert m["per_class_accuracy"] == [1.0, 0.5, None, None, None, 0.0]
    assert m["mean_class_accuracy"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    expected_confusion = np.zeros((6, 6), dtype=int)
    expected_confusion[0, 0] = 1  # v0
    expected_confusion[1, 0] = 1  # v1
    expected_confusion[5, 0] = 1  # v2
    expected_confusion[1, 1] = 1  # v3
    assert m["confusion"] == expected_confusion.tolist()
    # AP per present class:
    #   class 0: column .50 .40 .30 .10, positive v0 ranked 1st                  -> 1
    #   class 1: column .10 .30 .20 .60, positives v3 (rank 1) and v1 (rank 2)   -> (1/1 + 2/2) / 2 = 1
    #   class 5: column .10 .04 .05 .03, positive v2 ranked 2nd                  -> 1/2
    assert m["mAP"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert "class_names" not in m


def test_result_is_plain_json():
    m = video_metrics(MISTAKES, MISTAKE_LABELS, class_names=[f"c{i}" for i in range(6)])
    assert json.loads(json.dumps(m)) == m
    assert type(m["videos"]) is int
    assert all(type(m[k]) is float for k in ("top1", "top5", "mean_class_accuracy", "mAP"))
    assert all(type(x) is int for row in m["confusion"] for x in row)


def test_average_precision_by_hand():
    # Ranked: + - + - +  -> precisions at the positives 1/1, 2/3, 3/5.
    ap = average_precision(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([True, False, True, False, True]))
    assert ap == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # Input order does not matter, only the scores do.
    ap_shuffled = average_precision(np.array([0.6, 0.5, 0.9, 0.7, 0.8]), np.array([0, 1, 1, 1, 0]))
    assert ap_shuffled == pytest.approx(ap)
    # A positive ranked last among four: 1/4.
    assert average_precision(np.array([0.4, 0.3, 0.2, 0.1]), np.array([0, 0, 0, 1])) == pytest.approx(0.25)


def test_average_precision_ties_are_stable():
    # All tied: ranks follow input order, so the single positive in 2nd place scores 1/2.
    assert average_precision(np.array([0.5, 0.5, 0.5]), np.array([False, True, False])) == pytest.approx(0.5)
    assert average_precision(np.array([0.5, 0.5, 0.5]), np.array([True, False, False])) == pytest.approx(1.0)


def test_top_k():
    assert top_k(MISTAKES, MISTAKE_LABELS, 1) == pytest.approx(0.5)
    assert top_k(MISTAKES, MISTAKE_LABELS, 2) == pytest.approx(0.75)
    assert top_k(MISTAKES, MISTAKE_LABELS, 5) == pytest.approx(0.75)
    assert top_k(MISTAKES, MISTAKE_LABELS, 6) == 1.0
    assert top_k(MISTAKES, MISTAKE_LABELS, 50) == 1.0  # capped at C


def test_top5_with_fewer_than_five_classes():
    scores = np.array([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    labels = np.array([2, 1, 0])  # every video wrong at top-1
    m = video_metrics(scores, labels)
    assert m["top1"] == 0.0
    assert m["top5"] == 1.0  # k = min(5, 3) = 3 covers every class
    assert top_k(scores, labels, 2) == pytest.approx(1 / 3)  # only video 1 has its class in the top 2


def test_unnormalised_rows_are_fine():
    # Metrics rank scores, so a row summing to 0.97 gives the same answer as its renormalised self.
    m1 = video_metrics(MISTAKES * 0.97, MISTAKE_LABELS)
    m2 = video_metrics(MISTAKES, MISTAKE_LABELS)
    assert m1 == m2


@pytest.mark.parametrize(
    ("scores", "labels", "needle"),
    [
        (np.array([0.2, 0.8]), np.array([1]), "2-D"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "no videos"),
        (np.ones((2, 3)) / 3, np.array([0, 1, 2]), "has 3 entries but scores have 2"),
        (np.ones((2, 3)) / 3, np.array([0, 3]), "outside [0, 3)"),
        (np.ones((2, 3)) / 3, np.array([-1, 0]), "outside [0, 3)"),
        (np.ones((2, 3)) / 3, np.array([0.5, 1.0]), "integer"),
        (np.ones((2, 3)) / 3, np.array([[0, 1]]), "1-D"),
        (np.array([[0.5, np.nan], [0.5, 0.5]]), np.array([0, 1]), "NaN or infinite"),
        (np.array([[0.5, np.inf], [0.5, 0.5]]), np.array([0, 1]), "NaN or infinite"),
    ],
)
def test_bad_input_raises(scores, labels, needle):
    with pytest.raises(MetricsError) as info:
        video_metrics(scores, labels)
    assert needle in str(info.value)
    assert isinstance(info.value, EsspError) and isinstance(info.value, ValueError)


def test_bad_class_names_and_helpers_raise():
    with pytest.raises(MetricsError, match="class_names"):
        video_metrics(MISTAKES, MISTAKE_LABELS, class_names=["only", "two"])
    with pytest.raises(MetricsError, match="k: must be a positive integer"):
        top_k(MISTAKES, MISTAKE_LABELS, 0)
    with pytest.raises(MetricsError, match="no positive"):
        average_precision(np.array([0.1, 0.2]), np.array([False, False]))
    with pytest.raises(MetricsError, match="positives: shape"):
        average_precision(np.array([0.1, 0.2]), np.array([True]))
