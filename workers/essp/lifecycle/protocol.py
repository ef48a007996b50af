"""The three-split protocol (issue 14): UCF-101 papers report the mean over the dataset's three train/test
splits. :func:`train_splits` trains one run per split (run ids ``<base>-s1`` .. ``-s3``, the ``split`` param set,
each a whole run: epochs, scoring, fusion, report, registry) and :func:`protocol_report` gathers each split's
figures and their mean (and spread) into ``s3://<runs>/<base>/protocol.json``. A manifest holds the splits its
ingest found (``Manifest.protocol``: split lists ``trainlist0N``/``testlist0N``, or UCF-101's group rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from essp.contract import check_run_id
from essp.errors import EsspError
from essp.lifecycle.params import RunParams
from essp.settings import Settings
from essp.training.artifacts import RunStore

PROTOCOL_FILE = "protocol.json"
PROTOCOL_METRICS = ("top1", "top5", "mean_class_accuracy", "mAP")
Log = Callable[[str], None]


def split_run_id(base: str, split: int) -> str:
    return check_run_id(f"{base[:60]}-s{int(split)}")


def protocol_report(settings: Settings, base: str, runs: dict[int, str], *, log: Log = print) -> dict[str, Any]:
    """Each split's selected fusion and streams (from its report), the mean and standard deviation of each
    metric over the splits; written to ``<base>/protocol.json``."""
    from essp.evaluation.report import read_report

    splits: dict[str, Any] = {}
    for split, run in sorted(runs.items()):
        report = read_report(settings, run)
        splits[str(split)] = {"run": run, "selected": report["selected"],
                              "metrics": {k: report["selected_metrics"][k] for k in PROTOCOL_METRICS},
                              "videos": report["selected_metrics"].get("videos"),
                              "streams": {s: {k: m[k] for k in PROTOCOL_METRICS}
                                          for s, m in report["evaluation"]["streams"].items()}}
    if not splits:
        raise EsspError(f"protocol {base}: no split was trained")

    def spread(values: list[float]) -> dict[str, float]:
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        return {"mean": mean, "std": std}

    rows = list(splits.values())
    mean = {k: spread([r["metrics"][k] for r in rows]) for k in PROTOCOL_METRICS}
    streams = sorted({s for r in rows for s in r["streams"]})
    stream_mean = {s: {k: spread([r["streams"][s][k] for r in rows if s in r["streams"]]) for k in PROTOCOL_METRICS}
                   for s in streams}
    report = {"base": base, "splits": splits, "mean": mean, "streams_mean": stream_mean,
              "selected": sorted({r["selected"] for r in rows})}
    RunStore(settings, base).save_json(PROTOCOL_FILE, report)
    for split, row in splits.items():
        log(f"  split {split} ({row['run']}): {row['selected']} top1 {100 * row['metrics']['top1']:.1f}%  "
            + "  ".join(f"{s} {100 * m['top1']:.1f}%" for s, m in row["streams"].items()))
    log(f"  mean over {len(splits)} split(s): top1 {100 * mean['top1']['mean']:.1f}% "
        f"(+/- {100 * mean['top1']['std']:.1f}), mean class accuracy {100 * mean['mean_class_accuracy']['mean']:.1f}%"
        f"; report {RunStore(settings, base).uri(PROTOCOL_FILE)}")
    return report


def train_splits(settings: Settings, spec: RunParams, splits: tuple[int, ...] = (1, 2, 3), *, log: Log = print,
                 train: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
    """One whole run per split (``<run>-s<N>``), then :func:`protocol_report` under the run's own id."""
    from essp.lifecycle.pipeline import run_training

    train = train or run_training
    base = spec.run_id()
    runs = {}
    for split in splits:
        one = spec.model_copy(update={"run": split_run_id(base, split), "split": split})
        log(f"split {split}: run {one.run}")
        train(settings, one, log=log)
        runs[split] = one.run
    return protocol_report(settings, base, runs, log=log)
