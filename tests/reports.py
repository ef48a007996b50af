"""A real run report for UI tests: seeded per-stream scores of a few videos, scored and fused with the
project's own functions the way ``essp.lifecycle.pipeline.fuse_and_report`` does, then built and written to S3."""

from __future__ import annotations

from typing import Any

import numpy as np

from essp.evaluation.fusion import StreamScores, compare_fusions, make_fuser
from essp.evaluation.metrics import video_metrics
from essp.evaluation.report import build_report, write_report
from essp.settings import Settings

CLASSES = ["ApplyEyeMakeup", "Basketball", "Diving", "Fencing", "JumpRope"]
STREAMS = ("rgb", "flow")
HOSTILE = "<script>alert('essp')</script>"


def seeded_split(rng: np.random.Generator, split: str, videos_per_class: int,
                 strength: dict[str, float]) -> StreamScores:
    """Per-stream class probabilities of ``videos_per_class`` videos per class: the true class's logit
    raised by the stream's ``strength`` over Gaussian noise (a stronger stream is more accurate)."""
    labels = np.repeat(np.arange(len(CLASSES)), videos_per_class)
    ids = [f"v_{CLASSES[label]}_{split}_{i:02d}" for i, label in enumerate(labels)]
    scores = {}
    for stream in STREAMS:
        logits = rng.normal(0.0, 1.0, (len(labels), len(CLASSES)))
        logits[np.arange(len(labels)), labels] += strength[stream]
        probs = np.exp(logits - logits.max(1, keepdims=True))
        scores[stream] = probs / probs.sum(1, keepdims=True)
    return StreamScores(video_ids=ids, labels=labels, scores=scores)


def seeded_history(rng: np.random.Generator, epochs: int = 4) -> dict[str, list[dict[str, Any]]]:
    history = {}
    for k, stream in enumerate(STREAMS):
        loss, acc = 1.6 + 0.1 * k, 0.25
        rows = []
        for epoch in range(epochs):
            loss *= float(rng.uniform(0.6, 0.85))
            acc = min(0.99, acc + float(rng.uniform(0.08, 0.18)))
            rows.append({"epoch": epoch, "loss": loss, "accuracy": acc, "samples": 128,
                         "samples_per_s": float(rng.uniform(90, 140)), "data_wait": float(rng.uniform(0.01, 0.2)),
                         "lr": 0.01})
        history[stream] = rows
    return history


def build_seeded_report(run: str, *, seed: int = 7, fusion: str = "learned",
                        params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report of a run whose scores are seeded random numbers (fusion and metrics are computed for real)."""
    rng = np.random.default_rng(seed)
    strength = {"rgb": 2.2, "flow": 1.6}
    train = seeded_split(rng, "train", 8, strength)
    test = seeded_split(rng, "test", 6, strength)
    comparison = compare_fusions(train, test, seed=seed, class_names=CLASSES)
    fuser = make_fuser(fusion, seed=seed, num_classes=len(CLASSES))
    fuser.fit(train)
    selected = video_metrics(fuser.predict(test), test.labels, CLASSES)
    evaluation = {"class_names": CLASSES, "streams": {s: comparison[f"stream:{s}"] for s in STREAMS},
                  "fusion": {**comparison, fusion: selected}, "selected": fusion}
    params = params if params is not None else {
        "run": run, "manifest": f"synth{HOSTILE}", "epochs": 4, "batch_size": 16, "lr": 0.01, "seed": seed,
        "fusion": fusion,
        "streams": {"rgb": {"arch": "tiny"}, "flow": {"arch": "tiny", "options": {"method": "dis_fast"}}},
    }
    return build_report(run, params, seeded_history(rng), evaluation)


def write_seeded_report(settings: Settings, run: str, **kwargs: Any) -> dict[str, Any]:
    """Build the seeded report of ``run`` and write it (JSON, plots, summary.md) to the runs bucket."""
    report = build_seeded_report(run, **kwargs)
    write_report(settings, report)
    return report
