"""`essp bench dataplane`: a quick run on the real services gives a complete, sane result, and the
docs block is replaced in place."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console
from typer.testing import CliRunner

from essp.bench.dataplane import (
    DOCS_END,
    DOCS_START,
    FLOW_METHODS,
    PAPER_S_PER_FRAME,
    BenchOptions,
    bench_app,
    bench_dataplane,
    update_docs,
)
from essp.clients.redis import redis_client
from essp.clients.s3 import ObjectStore


@pytest.mark.slow
def test_quick_run_is_complete_and_keeps_frames_off_disk(base_settings, tmp_path):
    options = BenchOptions.quick_run()
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\nIntro.\n\n{DOCS_START}\nold figures\n{DOCS_END}\n\nAfter.\n")
    out = io.StringIO()
    result = bench_dataplane(options, settings=base_settings, json_path=tmp_path / "result.json",
                             write_docs=True, docs_path=docs, scratch=tmp_path / "scratch",
                             console=Console(file=out, width=240))
    length, size = options.length, options.pipeline_size

    # Per core: decode, and decode + each flow method, at each size; rates agree with each other.
    per_core = result["per_core"]
    assert {(r["size"], r["method"]) for r in per_core} == {
        (s, m) for s in options.sizes for m in (None, *options.methods)}
    for row in per_core:
        assert row["frames_per_s"] > 0 and row["cpu_s"] > 0
        assert row["s_per_frame"] == pytest.approx(1 / row["frames_per_s"])
        if row["method"]:
            assert row["speedup_vs_paper"] == pytest.approx(PAPER_S_PER_FRAME / row["s_per_frame"])
            assert row["flow_only_frames_per_s"] > row["frames_per_s"]  # decode costs something

    # Streaming: every sample arrived, nothing left in Redis, and almost nothing written to disk.
    (stream,) = result["streaming"]
    assert stream["workers_per_kind"] == 1 and stream["size"] == size
    assert stream["drain"]["samples"] == options.pipeline_samples and stream["dead"] == 0
    assert stream["samples_per_s"] > 0 and stream["first_sample_s"] > 0
    assert 0 <= stream["drain"]["wait_fraction"] <= 1 and 0 <= stream["paced"]["wait_fraction"] <= 1
    assert stream["cpu_ms_per_sample"]["decode"] > 0 and stream["cpu_ms_per_sample"]["flow"] > 0
    assert stream["payload_bytes_left_in_redis"] == 0
    assert stream["raw_bytes_delivered"] == stream["delivered"] * ((length + 1) * size * size * 3
                                                                    + 2 * length * size * size)

    # The baselines did the same samples; the classic pipeline wrote its frames and flow.
    (loader,) = result["dataloader"]
    assert loader["num_workers"] == 2 and loader["samples"] == options.pipeline_samples
    assert loader["samples_per_s"] > 0 and loader["first_batch_s"] > 0
    classic = result["classic"]
    assert classic["disk_bytes"] > 0 and classic["file_bytes"] > 0 and classic["samples_per_s"] > 0
    assert classic["files"] == classic["frames"] + 2 * classic["flow_pairs"]
    assert classic["first_batch_s"] > classic["extract_s"] > 0
    assert stream["disk_bytes"] < classic["disk_bytes"] / 10
    assert stream["disk_bytes"] < stream["raw_bytes_delivered"] / 20
    assert loader["cpu_ms_per_sample"] > 0

    # Reported: the JSON, the table, and the docs block between its markers only.
    assert json.loads((tmp_path / "result.json").read_text())["summary"] == json.loads(
        json.dumps(result["summary"]))
    printed = out.getvalue()
    for stage in ("per core", "streaming", "DataLoader", "classic"):
        assert stage in printed
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nIntro.\n\n") and text.endswith("\n\nAfter.\n")
    assert "old figures" not in text and "essp bench dataplane --quick" in text
    assert result["machine"]["cpu_model"] in text and "| streaming |" in text

    # Its topics' keys and buckets are gone.
    tag = result["tag"]
    isolated = base_settings.model_copy(update={"redis_prefix": tag})
    assert not list(redis_client(isolated).scan_iter(match=f"{tag}:*", count=1000))
    assert not ObjectStore(base_settings).client.bucket_exists(f"{tag}-videos")


def test_docs_block_is_added_when_missing(tmp_path):
    page = tmp_path / "benchmarks.md"
    update_docs(page, "first\n")
    assert page.read_text() == f"# Benchmarks\n\n## Data plane\n\n{DOCS_START}\nfirst\n{DOCS_END}\n"
    page.write_text(page.read_text() + "\n## Training\n\nkept\n")
    update_docs(page, "second\n")
    assert "first" not in page.read_text() and f"{DOCS_START}\nsecond\n{DOCS_END}" in page.read_text()
    assert page.read_text().endswith("## Training\n\nkept\n")


def test_bad_options_are_refused_before_anything_runs():
    runner = CliRunner()
    result = runner.invoke(bench_app, ["dataplane", "--methods", "dis_fast,sift"])
    assert result.exit_code != 0 and "sift" in result.output
    result = runner.invoke(bench_app, ["dataplane", "--sizes", "224,x"])
    assert result.exit_code != 0
    assert set(BenchOptions().methods) == set(FLOW_METHODS)


@pytest.mark.slow
def test_trainer_bench_quick_run_measures_compute_and_data_wait(base_settings, tmp_path):
    from essp.bench.trainer import TrainerBenchOptions, bench_trainer

    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\n## Data plane\n\n{DOCS_START}\nkept\n{DOCS_END}\n")
    result = bench_trainer(TrainerBenchOptions.quick_run(), settings=base_settings, json_path=tmp_path / "r.json",
                           write_docs=True, docs_path=docs)
    rows = result["rows"]
    compute = {(r["stream"], r["arch"]) for r in rows if r["stage"] == "compute"}
    streaming = [r for r in rows if r["stage"] == "streaming"]
    assert compute == {("rgb", "tiny"), ("flow", "tiny")}
    assert {(r["stream"], r["workers"]) for r in streaming} == {("rgb", 1), ("flow", 1)}
    assert all(r["images_per_s"] > 0 for r in rows if r["stage"] == "compute")
    for row in streaming:
        assert row["samples"] == 8 and row["samples_per_s"] > 0 and 0 <= row["data_wait"] <= 1
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == json.loads(json.dumps(rows))
    page = docs.read_text()
    assert "kept" in page and "<!-- bench:trainer:start -->" in page and "| streaming | flow | tiny |" in page


def test_trainer_bench_refuses_bad_options():
    import essp.bench.trainer  # noqa: F401 - registers `bench trainer` (the CLI imports it the same way)

    runner = CliRunner()
    result = runner.invoke(bench_app, ["trainer", "--archs", "tiny,alexnet"])
    assert result.exit_code != 0 and "alexnet" in result.output
    result = runner.invoke(bench_app, ["trainer", "--streams", "depth"])
    assert result.exit_code != 0 and "depth" in result.output
