"""`essp bench dataplane`: a quick run on the real services gives a complete, sane result (every sample of
every measured epoch and of both streams delivered, CPU splits that add up, the ratios as defined, nothing
left in Redis, nothing decoded on disk), its parts compute what they say, and the docs block is replaced in
place. No timing thresholds: the speed targets live in the benchmark's output only."""

from __future__ import annotations

import io
import json
import math
import os
import threading

import pytest
from rich.console import Console
from typer.testing import CliRunner

from essp.bench.accounting import counter_deltas, cpu_split, fresh_snapshot, read_workers
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
from essp.bench.options import TARGETS
from essp.bench.streaming import rate
from essp.clients.redis import redis_client
from essp.clients.s3 import ObjectStore
from essp.dataplane.extractors import frames_format


def _check_split(cpu: dict, samples: int, epochs: int = 1) -> None:
    """A CPU split adds up: every role's ms sum to the total, work + overhead = total, the overhead by
    process sums to the overhead, and each worker's work is positive and within that worker's CPU."""
    assert cpu["samples"] == samples
    per = cpu["cpu_ms_per_sample"]
    assert {"consumer (bench)", "redis", "kafka (tansu)", "s3 (weed)"} <= set(per)
    assert cpu["total_ms_per_sample"] == pytest.approx(sum(v or 0 for v in per.values()))
    work, by_process = cpu["work_ms_per_sample"], cpu["overhead_by_process_ms_per_sample"]
    assert work is not None and by_process is not None, "the workers report no work_cpu_s"
    assert set(work) <= set(per) and {"decode", "flow"} <= set(work)
    assert cpu["work_total_ms_per_sample"] == pytest.approx(sum(work.values()))
    assert cpu["work_total_ms_per_sample"] + cpu["overhead_ms_per_sample"] == pytest.approx(cpu["total_ms_per_sample"])
    assert sum(by_process.values()) == pytest.approx(cpu["overhead_ms_per_sample"])
    assert cpu["broker_ms_per_sample"] == pytest.approx(per["kafka (tansu)"] + per["s3 (weed)"])
    # /proc counts CPU in clock ticks: user and system time each lose up to a tick per reading.
    slack = 4 * epochs * 1000 / os.sysconf("SC_CLK_TCK") / samples
    for role in ("decode", "flow"):
        assert 0 < work[role] <= per[role] + slack, (role, work[role], per[role])


@pytest.mark.slow
def test_quick_run_is_complete_and_keeps_frames_off_disk(base_settings, tmp_path):
    options = BenchOptions.quick_run()
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\nIntro.\n\n{DOCS_START}\nold figures\n{DOCS_END}\n\nAfter.\n")
    out = io.StringIO()
    result = bench_dataplane(options, settings=base_settings, json_path=tmp_path / "result.json",
                             write_docs=True, docs_path=docs, scratch=tmp_path / "scratch",
                             console=Console(file=out, width=240))
    length, size, samples = options.length, options.pipeline_size, options.pipeline_samples
    gray = frames_format({"flow": {}}) == "gray"

    # Per core: decode (in the worker's frame format), and decode + each flow method, at each size.
    per_core = result["per_core"]
    assert {(r["size"], r["method"]) for r in per_core} == {
        (s, m) for s in options.sizes for m in (None, *options.methods)}
    for row in per_core:
        assert row["frames_per_s"] > 0 and row["cpu_s"] > 0 and row["pix_fmt"] == ("gray" if gray else "rgb24")
        assert row["s_per_frame"] == pytest.approx(1 / row["frames_per_s"])
        if row["method"]:
            assert row["speedup_vs_paper"] == pytest.approx(PAPER_S_PER_FRAME / row["s_per_frame"])
            assert row["flow_only_frames_per_s"] > row["frames_per_s"]  # decode costs something
        else:
            assert row["decoded_per_used"] >= 1

    # One stream: every epoch measured and delivered whole, its CPU split adds up, nothing left in Redis.
    (stream,) = result["streaming"]
    assert stream["workers_per_kind"] == 1 and stream["size"] == size and stream["dead"] == 0
    assert [e["epoch"] for e in stream["epochs"]] == list(range(1, options.epochs + 1))
    for epoch in stream["epochs"]:
        assert epoch["samples"] == samples and epoch["all_delivered"] and epoch["samples_per_s"] > 0
        assert epoch["worker_counters"]["worker-decode-0"]["jobs_done"] == samples
        assert epoch["worker_counters"]["worker-extract-flow-0"]["jobs_done"] == samples
        _check_split(epoch["cpu"], samples)
    _check_split(stream["cpu"], samples * options.epochs, options.epochs)
    assert stream["measured_samples"] == samples * options.epochs and stream["all_delivered"]
    broker = stream["broker_ms_per_sample_by_epoch"]
    assert len(broker) == options.epochs and all(b > 0 for b in broker)
    assert broker == [e["cpu"]["broker_ms_per_sample"] for e in stream["epochs"]]
    assert stream["samples_per_s"] > 0 and stream["first_sample_s"] > 0 and stream["decoded_per_used"] >= 1
    assert 0 <= stream["paced"]["wait_fraction"] <= 1
    assert stream["payload_bytes_left_in_redis"] == 0
    frames_bytes = (length + 1) * size * size * (1 if gray else 3)
    assert stream["raw_bytes_delivered"] == stream["delivered"] * (frames_bytes + 2 * length * size * size)

    # Two streams from one decode: both streams delivered every planned sample, the same ones.
    two = result["two_streams"]
    assert two["workers"] == {"decode": 1, "flow": 1, "rgb": 1} and two["processes"] == 3
    assert two["delivered"] == {"rgb": samples, "flow": samples} and two["samples"] == samples
    assert two["all_delivered"] and two["same_samples"] and two["dead"] == 0
    assert two["streams"]["rgb"]["all_delivered"] and two["streams"]["flow"]["all_delivered"]
    assert two["payload_bytes_left_in_redis"] == 0 and two["samples_per_s"] > 0
    assert set(two["features"]) == {"rgb", "flow"} and "rgb" in two["cpu"]["work_ms_per_sample"]
    _check_split(two["cpu"], samples)

    # The baselines did the same samples; the classic pipeline wrote its frames and flow.
    (loader,) = result["dataloader"]
    assert loader["num_workers"] == 2 and loader["samples"] == samples and loader["style"] == "lean"
    assert loader["pix_fmt"] == ("gray" if gray else "rgb24") and loader["decoded_per_used"] >= 1
    assert loader["samples_per_s"] > 0 and loader["first_batch_s"] > 0
    assert loader["cpu_ms_per_sample"] > loader["loader_cpu_ms_per_sample"] > 0  # main process included
    user = result["dataloader_user"]
    assert user["style"] == "user" and user["samples"] == samples and user["num_workers"] == 2
    assert user["frames_used"] == samples * (length + 1) and user["cpu_ms_per_sample"] > 0
    pair = result["two_dataloaders"]
    assert pair["delivered"] == {"rgb": samples, "flow": samples} and pair["processes"] == 3
    assert pair["streams"]["rgb"]["num_workers"] == 1 and pair["streams"]["flow"]["num_workers"] == 2
    assert pair["streams"]["rgb"]["frames_used"] == samples  # the RGB loader decodes its one frame
    assert pair["samples_per_s"] > 0 and pair["cpu_ms_per_sample"] > 0
    classic = result["classic"]
    assert classic["disk_bytes"] > 0 and classic["file_bytes"] > 0 and classic["samples_per_s"] > 0
    assert classic["files"] == classic["frames"] + 2 * classic["flow_pairs"]
    assert classic["first_batch_s"] > classic["extract_s"] > 0
    # The workers hold every frame and feature of the plane; this test's own process also counts its
    # output, which pytest's capture spools to a temporary file (~60 KB of client logs in a full run).
    workers_disk = sum(v or 0 for k, v in stream["disk_bytes_by_process"].items() if k != "bench")
    assert workers_disk < classic["disk_bytes"] / 10
    assert workers_disk < stream["raw_bytes_delivered"] / 20
    assert stream["disk_bytes"] < stream["raw_bytes_delivered"] / 4

    # The ratios, as defined, and the plane's own CPU per sample, with the targets beside them.
    ratios = result["ratios"]
    assert set(ratios) == {"one_stream_vs_dataloader", "two_streams_vs_two_dataloaders",
                           "cpu_per_sample_vs_dataloader", "broker_cost_last_vs_first_epoch"}
    for value in (*ratios.values(), result["overhead_ms_per_sample"]):
        assert isinstance(value, float) and math.isfinite(value) and value > 0
    assert ratios["one_stream_vs_dataloader"] == pytest.approx(stream["samples_per_s"] / loader["samples_per_s"])
    assert ratios["two_streams_vs_two_dataloaders"] == pytest.approx(two["samples_per_s"] / pair["samples_per_s"])
    assert ratios["cpu_per_sample_vs_dataloader"] == pytest.approx(
        stream["cpu"]["total_ms_per_sample"] / loader["cpu_ms_per_sample"])
    assert ratios["broker_cost_last_vs_first_epoch"] == pytest.approx(broker[-1] / broker[0])
    assert result["overhead_ms_per_sample"] == pytest.approx(stream["cpu"]["overhead_ms_per_sample"])
    assert set(result["targets"]) == set(TARGETS)
    for name, item in result["targets"].items():
        op, bound = TARGETS[name]
        assert item["met"] == (item["value"] <= bound if op == "<=" else item["value"] >= bound)
    limit = result["limit"]
    assert limit["samples_per_s"] == pytest.approx(limit["usable_cores"] * 1000 / limit["cpu_ms_per_sample"])
    assert limit["plane_samples_per_s"] == stream["samples_per_s"]

    # Reported: the JSON, the table, and the docs block between its markers only.
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert saved["ratios"] == pytest.approx(ratios) and saved["overhead_ms_per_sample"] > 0
    printed = out.getvalue()
    for stage in ("per core", "streaming", "DataLoader", "classic", "user-written", "rgb + flow", "target >= 1.15"):
        assert stage in printed
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nIntro.\n\n") and text.endswith("\n\nAfter.\n")
    assert "old figures" not in text and "essp bench dataplane --quick" in text
    assert result["machine"]["cpu_model"] in text and "| streaming |" in text
    assert "| the plane against its baselines |" in text and "`broker_cost_last_vs_first_epoch`" in text
    assert "| **all** |" in text and "Broker (Tansu + SeaweedFS) CPU per sample by epoch: 1:" in text

    # Its topics' keys and buckets are gone.
    tag = result["tag"]
    isolated = base_settings.model_copy(update={"redis_prefix": tag})
    assert not list(redis_client(isolated).scan_iter(match=f"{tag}:*", count=1000))
    assert not ObjectStore(base_settings).client.bucket_exists(f"{tag}-videos")


def test_cpu_split_adds_up_and_says_when_work_is_unknown():
    cpu = cpu_split({"decode": 1.0, "flow": 2.0, "redis": 0.5, "kafka (tansu)": 0.2, "s3 (weed)": 0.3},
                    {"decode": 0.4, "flow": 1.5}, 10)
    assert cpu["total_ms_per_sample"] == pytest.approx(400)
    assert cpu["work_ms_per_sample"] == pytest.approx({"decode": 40, "flow": 150})
    assert cpu["overhead_ms_per_sample"] == pytest.approx(210)
    assert cpu["overhead_by_process_ms_per_sample"] == pytest.approx(
        {"decode": 60, "flow": 50, "redis": 50, "kafka (tansu)": 20, "s3 (weed)": 30})
    assert cpu["broker_ms_per_sample"] == pytest.approx(50)
    unknown = cpu_split({"decode": 1.0, "flow": 2.0}, {"decode": 0.4, "flow": None}, 10)
    assert unknown["work_ms_per_sample"] is None and unknown["overhead_ms_per_sample"] is None
    with pytest.raises(ValueError):
        cpu_split({"decode": 1.0}, {"decode": 0.5}, 0)


def test_rate_counts_from_the_first_delivery_unit():
    # Three chunks of 4 samples, one second apart: 8 samples over 2 s after the first chunk.
    arrivals = [10.0 + t for t in (1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)]
    got = rate(10.0, arrivals, 4)
    assert got["samples_per_s"] == pytest.approx(4.0) and got["counted"] == 8
    assert got["first_sample_s"] == pytest.approx(1.0) and got["samples_per_s_from_start"] == pytest.approx(4.0)
    assert rate(10.0, arrivals[:4], 4)["samples_per_s"] is None  # one chunk: no rate after it
    assert rate(10.0, [11.0, 12.0, 13.0], 1)["samples_per_s"] == pytest.approx(1.0)


def test_worker_snapshot_waits_for_events_composed_after_it_began(settings):
    from essp.contract import RedisKeys, WorkerEvent, encode

    key = RedisKeys(settings.redis_prefix).worker("worker-decode-0")
    client = redis_client(settings)

    def event(work: float) -> bytes:
        return encode(WorkerEvent(event="heartbeat", worker_id="worker-decode-0", worker_kind="decode",
                                  counters={"work_cpu_s": work, "uptime_s": work}))

    client.set(key, event(1.0))
    with pytest.raises(RuntimeError, match="no fresh heartbeat from worker-decode-0"):
        fresh_snapshot(settings, ["worker-decode-0"], timeout_s=0.3)
    stop = threading.Event()

    def beat() -> None:
        work = 2.0
        while not stop.wait(0.1):
            client.set(key, event(work))
            work += 1.0

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        snap = fresh_snapshot(settings, ["worker-decode-0"], timeout_s=5)
    finally:
        stop.set()
        thread.join()
    assert snap.counters["worker-decode-0"]["work_cpu_s"] >= 3.0  # the second event after the call began
    before = read_workers(settings, ["worker-decode-0"])
    assert counter_deltas(before, snap) == {"worker-decode-0": {"work_cpu_s": pytest.approx(
        snap.counters["worker-decode-0"]["work_cpu_s"] - before.counters["worker-decode-0"]["work_cpu_s"])}}

    # A worker that ran out of work says so: its "idle" event is exact at once, but only once per epoch.
    client.set(key, encode(WorkerEvent(event="heartbeat", worker_id="worker-decode-0", worker_kind="decode",
                                       detail="idle", counters={"work_cpu_s": 9.0})))
    idle = fresh_snapshot(settings, ["worker-decode-0"], timeout_s=0.3)
    assert idle.counters["worker-decode-0"]["work_cpu_s"] == 9.0
    with pytest.raises(RuntimeError, match="no fresh heartbeat"):
        fresh_snapshot(settings, ["worker-decode-0"], timeout_s=0.3, since=idle)  # no newer idle event


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


def test_the_recorded_command_leaves_out_where_results_go():
    from essp.bench.dataplane import _measuring_args

    args = ["bench", "dataplane", "--write-docs", "--json", "/tmp/r.json", "--epochs", "3", "--docs=d.md", "--keep"]
    assert _measuring_args(args) == ["bench", "dataplane", "--epochs", "3"]


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


def _bench_brokers() -> list[str]:
    from pathlib import Path

    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"essp-bench" in argv and b"memory://tansu/" in argv:
            found.append(entry.name)
    return found


def test_broker_memory_runs_the_plane_on_a_broker_of_its_own_and_stops_it(base_settings, tmp_path):
    from essp.clients.kafka import list_topics

    options = BenchOptions.quick_run(broker="memory", two_streams=False, user_baseline=False,
                                     methods=("dis_fast",))
    seen: set[str] = set()
    done = threading.Event()

    def watch_local_broker() -> None:  # the bench's topics must never appear on the stack's own broker
        while not done.wait(0.5):
            seen.update(t for t in list_topics(base_settings) if t.startswith("bench"))

    watcher = threading.Thread(target=watch_local_broker, daemon=True)
    watcher.start()
    try:
        result = bench_dataplane(options, settings=base_settings, scratch=tmp_path / "scratch",
                                 console=Console(file=io.StringIO(), width=240))
    finally:
        done.set()
        watcher.join(10)
    assert "in memory" in result["broker"] and "--broker memory" in result["command"]
    (stream,) = result["streaming"]
    assert all(e["all_delivered"] for e in stream["epochs"]) and stream["dead"] == 0
    assert not [t for t in seen if t.startswith(result["tag"])], seen
    assert _bench_brokers() == []  # stopped at the end


def test_broker_option_is_checked_and_memory_figures_stay_out_of_the_docs():
    runner = CliRunner()
    result = runner.invoke(bench_app, ["dataplane", "--broker", "kafka"])
    assert result.exit_code != 0 and "broker 'kafka' is not one of local, memory" in result.output
    result = runner.invoke(bench_app, ["dataplane", "--broker", "memory", "--write-docs"])
    words = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code != 0 and "--write-docs: docs/benchmarks.md's block holds the local stack's figures" in words
