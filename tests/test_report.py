"""The run report on the real S3: summary figures, plots that are real PNGs of the promised size,
summary.md and the CLI lines, and the write/read round trip."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from essp.clients.s3 import ObjectNotFound, ObjectStore, S3Uri
from essp.errors import EsspError
from essp.evaluation.report import (
    PLOTS,
    PNG_SIGNATURE,
    ReportNotFound,
    build_report,
    plot_size,
    read_report,
    render_plots,
    summary_lines,
    summary_markdown,
    write_report,
)

CLASSES = ["ApplyEyeMakeup", "Basketball", "Diving", "Fencing"]


def metrics(top1, diag, per_class=None, top5=0.95, mAP=0.7):  # noqa: N803
    """Metrics with a 4x4 confusion of 10 videos per class, `diag[i]` of them right."""
    confusion = [[diag[i] if i == j else 0 for j in range(4)] for i in range(4)]
    for i in range(4):
        confusion[i][(i + 1) % 4] += 10 - diag[i]
    return {"videos": 40, "top1": top1, "top5": top5, "mean_class_accuracy": top1, "mAP": mAP,
            "per_class_accuracy": per_class if per_class is not None else [d / 10 for d in diag],
            "confusion": confusion}


def epochs(losses, accs):
    return [{"epoch": i + 1, "loss": loss, "accuracy": acc, "samples_per_s": 120.0 + i, "data_wait": 0.05,
             "lr": 0.01 / (i + 1), "samples": 400} for i, (loss, acc) in enumerate(zip(losses, accs, strict=True))]


HISTORY = {"rgb": epochs([1.3, 0.9, 0.6], [0.4, 0.6, 0.75]), "flow": epochs([1.35, 1.0, 0.8], [0.35, 0.5, 0.6])}
EVALUATION = {
    "class_names": CLASSES,
    "streams": {"rgb": metrics(0.625, [7, 6, 6, 6]),
                "flow": metrics(0.55, [6, 5, 6, 5], per_class=[0.6, None, 0.6, 0.5])},
    "fusion": {
        "average": metrics(0.675, [7, 7, 7, 6]),
        "weighted": metrics(0.7, [8, 7, 7, 6], mAP=0.74),
        "svm": {"skipped": "needs scikit-learn"},
        "stream:rgb": metrics(0.625, [7, 6, 6, 6]),
    },
    "selected": "weighted",
}
PARAMS = {"epochs": 3, "batch_size": 8, "streams": ["rgb", "flow"]}


@pytest.fixture(scope="module")
def report():
    return build_report("run-42", PARAMS, HISTORY, EVALUATION)


def test_summary_fields(report):
    summary = report["summary"]
    assert summary["best_stream"] == "rgb" and summary["best_stream_top1"] == 0.625
    assert summary["selected"] == "weighted" and summary["selected_top1"] == 0.7
    assert summary["chance"] == 0.25 and summary["num_classes"] == 4
    assert summary["fused_ge_best_stream"] is True and summary["fused_gain"] == pytest.approx(0.075)
    assert report["selected_metrics"]["mAP"] == 0.74
    assert report["run"] == "run-42" and report["params"] == PARAMS and report["created_at"].endswith("+00:00")
    # Sorted by top1, skipped last; the missing stream:flow row is added from the streams.
    names = [r["name"] for r in report["fusion_table"]]
    assert names == ["weighted", "average", "stream:rgb", "stream:flow", "svm"]
    assert [r["selected"] for r in report["fusion_table"]] == [True, False, False, False, False]
    assert report["fusion_table"][-1]["skipped"] == "needs scikit-learn"
    assert report["streams"]["rgb"]["final_loss"] == 0.6 and report["streams"]["rgb"]["total_samples"] == 1200
    assert report["streams"]["flow"]["top1"] == 0.55 and report["streams"]["flow"]["epochs"] == 3
    json.dumps(report, allow_nan=False)  # JSON-able as it stands


def test_fused_below_best_stream_and_bad_inputs():
    evaluation = {**EVALUATION, "selected": "average",
                  "fusion": {**EVALUATION["fusion"], "average": metrics(0.6, [6, 6, 6, 6])}}
    report = build_report("r1", {}, HISTORY, evaluation)
    assert report["summary"]["fused_ge_best_stream"] is False
    with pytest.raises(EsspError, match="'svm', which was skipped: needs scikit-learn"):
        build_report("r1", {}, HISTORY, {**EVALUATION, "selected": "svm"})
    with pytest.raises(EsspError, match="'nope', which is not in the fusion table"):
        build_report("r1", {}, HISTORY, {**EVALUATION, "selected": "nope"})
    bad = {**EVALUATION, "fusion": {"weighted": {**metrics(0.7, [8, 7, 7, 6]), "confusion": [[1, 2], [3, 4]]}}}
    with pytest.raises(EsspError, match=r"evaluation\['fusion'\]\['weighted'\]\['confusion'\] must be a 4 x 4"):
        build_report("r1", {}, HISTORY, bad)
    with pytest.raises(EsspError, match="run id 'bad/run' is not valid"):
        build_report("bad/run", {}, HISTORY, EVALUATION)


def test_plots_are_pngs_of_the_promised_size(report):
    plots = render_plots(report)
    assert sorted(plots) == sorted(PLOTS)
    for name, data in plots.items():
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 1024, name
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG"
            assert image.size == (600, 400) == tuple(round(x * 100) for x in plot_size(name, report)), name


def test_plots_without_history_or_confusion_still_render():
    evaluation = {"class_names": CLASSES, "streams": {"rgb": {"top1": 0.5}},
                  "fusion": {"average": {"top1": 0.6}}, "selected": "average"}
    plots = render_plots(build_report("r2", {}, {}, evaluation))
    assert all(data.startswith(PNG_SIGNATURE) for data in plots.values())


def test_summary_lines_and_markdown(report):
    lines = summary_lines(report)
    text = "\n".join(lines)
    for name in ("weighted", "average", "svm", "stream:rgb", "stream:flow"):
        assert name in text
    selected = [line for line in lines if "(selected)" in line]
    assert len(selected) == 1 and "weighted" in selected[0] and selected[0].startswith("*")
    assert "chance 25.0%" in lines[0]
    assert any("stream rgb: top1 62.5%" in line for line in lines)
    markdown = summary_markdown(report)
    assert "| **selected** | weighted | 70.0% |" in markdown and "skipped: needs scikit-learn" in markdown


def test_write_then_read_round_trips(settings, report):
    uris = write_report(settings, report)
    assert sorted(uris) == sorted([*PLOTS, "summary.md", "report.json"])
    assert uris["report.json"] == f"s3://{settings.bucket_runs}/run-42/report/report.json"
    assert read_report(settings, "run-42") == report
    store = ObjectStore(settings)
    location = S3Uri.parse(uris["confusion.png"])
    assert store.client.stat_object(location.bucket, location.key).content_type == "image/png"
    assert store.get_bytes(location.bucket, location.key).startswith(PNG_SIGNATURE)
    summary = S3Uri.parse(uris["summary.md"])
    assert store.get_bytes(summary.bucket, summary.key).decode() == summary_markdown(report)


def test_missing_report_names_the_run(settings):
    with pytest.raises(ReportNotFound, match="run 'never-ran' has no report") as info:
        read_report(settings, "never-ran")
    assert isinstance(info.value, ObjectNotFound)
    ObjectStore(settings).ensure_bucket(settings.bucket_runs)
    with pytest.raises(EsspError, match="never-ran"):
        read_report(settings, "never-ran")
