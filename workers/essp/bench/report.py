"""A data plane result in words and figures: the summary sentences, the table and the notes printed
under it, and the markdown block for docs/benchmarks.md."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from essp.bench.options import PAPER_S_PER_FRAME, TARGET_SPEEDUP


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _num(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"



def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """The figures the promises are about, each with a sentence."""
    options = result["options"]
    synthetic = [r for r in result["per_core"] if r["what"] == "decode+flow" and r["source"].startswith("synthetic")]
    dis = [r for r in synthetic if (r["method"] or "").startswith("dis")]
    best = max(dis, key=lambda r: r["speedup_vs_paper"], default=None)
    real = [r for r in result["per_core"] if r["what"] == "decode+flow" and "(real)" in r["source"]
            and (r["method"] or "").startswith("dis")]
    best_real = max(real, key=lambda r: r["speedup_vs_paper"], default=None)
    chosen = [r for r in synthetic if r["method"] == options["pipeline_method"]]
    slowest = min(chosen, key=lambda r: r["speedup_vs_paper"], default=None)
    streaming = result.get("streaming") or []
    classic = result.get("classic") or {}
    disk_max = max((r["disk_bytes"] for r in streaming), default=None)
    raw_max = max((r["raw_bytes_delivered"] for r in streaming), default=None)
    lines = []
    if best:
        met = best["speedup_vs_paper"] >= TARGET_SPEEDUP
        lines.append(f"Decode + flow per core: best DIS {best['speedup_vs_paper']:.1f}x the paper's "
                     f"{PAPER_S_PER_FRAME} s/frame ({best['method']} at {best['size']}x{best['size']})"
                     + (f", {slowest['method']} {slowest['speedup_vs_paper']:.1f}x at {slowest['size']}x"
                        f"{slowest['size']}" if slowest else "")
                     + (f"; on the real clip {best_real['source']} best {best_real['speedup_vs_paper']:.1f}x "
                        f"({best_real['method']} at {best_real['size']}x{best_real['size']})" if best_real else "")
                     + f". Target >= {TARGET_SPEEDUP:.0f}x with DIS: {'met' if met else 'NOT met'}.")
    if streaming:
        clean = disk_max is not None and bool(raw_max) and disk_max < 0.01 * raw_max
        lines.append(f"Disk written by the streaming run's own processes: at most {_human_bytes(disk_max)} "
                     f"(worker logs included) while {_human_bytes(raw_max)} of frames + flow went through Redis; "
                     f"the classic pipeline wrote {_human_bytes(classic.get('disk_bytes'))}. No frame or flow "
                     f"on disk: {'yes' if clean else 'CHECK'}.")
        one = streaming[0]
        cpu = one["cpu_ms_per_sample"]
        stages = {k: cpu.get(k) for k in ("decode", "flow") if cpu.get(k)}
        service_ms = sum(v or 0 for k, v in cpu.items() if k not in ("decode", "flow", "consumer (bench)"))
        loaders = {r["num_workers"]: r for r in result.get("dataloader") or []}
        loader = loaders.get(one["processes"])
        if stages and loader:
            slow = max(stages, key=lambda k: stages[k])
            lines.append(
                f"With {one['workers_per_kind']} worker of each kind, streaming delivered "
                f"{_num(one['samples_per_s'])} samples/s against the DataLoader's {_num(loader['samples_per_s'])} with "
                f"num_workers={loader['num_workers']}: the slower stage ({slow}, {_num(stages[slow], 0)} ms CPU/sample "
                f"against {_num(min(stages.values()), 0)}, plus a Kafka acknowledgement and Redis writes per job) "
                f"bounds a pipeline of one worker each, where each loader process does both; and the local Redis, "
                f"Kafka (Tansu) and S3 (SeaweedFS) spent "
                f"{_num(service_ms, 0)} ms CPU per sample on the same cores (separate machines in production).")
        paced = [(r["workers_per_kind"], r["paced"]) for r in streaming
                 if r.get("paced") and r["paced"]["wait_fraction"] is not None]
        if paced:
            lines.append(f"Trainer data wait at {paced[0][1]['step_ms']:.0f} ms per sample (80% of what one worker "
                         "of each kind delivers, unless --trainer-step-ms): "
                         + ", ".join(f"{p['wait_fraction']:.1%} with {c} of each" for c, p in paced)
                         + " (target < 5%).")
    return {"best_dis_speedup": best["speedup_vs_paper"] if best else None,
            "pipeline_method_min_speedup": slowest["speedup_vs_paper"] if slowest else None,
            "streaming_disk_bytes_max": disk_max, "raw_bytes_delivered_max": raw_max,
            "classic_disk_bytes": classic.get("disk_bytes"), "lines": lines}


def _rate(value: float | None, unit: str, length: int | None = None) -> str:
    text = f"{_num(value)} {unit}"
    if length and value:
        text += f" = {_num(value * length, 0)} flow frames/s"
    return text


def _rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per measurement, in the order of :data:`HEADERS`."""
    rows = []
    opts = result["options"]
    length = opts["length"]
    for r in result["per_core"]:
        source = r["source"]
        if r["what"] == "decode":
            rows.append(("per core", f"decode {r['size']}x{r['size']} from {source}",
                         _rate(r["frames_per_s"], "frames/s"), f"{r['s_per_frame']:.4f}", "", "", "",
                         f"{r['samples']} stacks of {length + 1} frames"))
        else:
            rows.append(("per core", f"decode + {r['method']} {r['size']}x{r['size']} from {source}",
                         _rate(r["frames_per_s"], "flow frames/s"), f"{r['s_per_frame']:.4f}",
                         f"{r['speedup_vs_paper']:.1f}x", "", "",
                         f"flow alone {_num(r['flow_only_frames_per_s'], 0)} frames/s; {r['samples']} stacks"))
    for r in result.get("streaming") or []:
        paced = r.get("paced") or {}
        cpu = r["cpu_ms_per_sample"]
        wait = (f"data wait {_num(100 * paced['wait_fraction'])}% at {_num(paced['step_ms'], 0)} ms/sample; "
                if paced.get("wait_fraction") is not None else "")
        rows.append(("streaming", f"{r['workers_per_kind']} decode + {r['workers_per_kind']} flow workers",
                     _rate(r["samples_per_s"], "samples/s", length), "", "", f"{_num(r['first_sample_s'], 2)} s",
                     _human_bytes(r["disk_bytes"]),
                     wait + f"CPU/sample: decode {_num(cpu.get('decode'), 0)} ms, flow {_num(cpu.get('flow'), 0)} ms"))
    for r in result.get("dataloader") or []:
        rows.append(("DataLoader", f"num_workers={r['num_workers']}, each decodes + computes flow",
                     _rate(r["samples_per_s"], "samples/s", length), "", "", f"{_num(r['first_batch_s'], 2)} s",
                     _human_bytes(r["disk_bytes"]),
                     f"CPU/sample {_num(r['cpu_ms_per_sample'], 0)} ms; batch {r['batch_size']}, {r['start_method']}"))
    c = result.get("classic")
    if c:
        rows.append(("classic", f"extract frames + flow to disk, {c['processes']} processes",
                     _rate(c["extract_frames_per_s"], "frames/s"), "", "", f"{_num(c['first_batch_s'], 2)} s",
                     _human_bytes(c["disk_bytes"]),
                     f"{c['files']} JPEGs: frames {_human_bytes(c['frame_jpeg_bytes'])}, "
                     f"flow x/y {_human_bytes(c['flow_jpeg_bytes'])}"))
        rows.append(("classic", f"then read flow stacks, num_workers={c['read']['num_workers']}",
                     _rate(c["samples_per_s"], "samples/s", length), "", "",
                     f"{_num(c['read']['first_batch_s'], 2)} s", "", "page cache warm (files just written)"))
    return rows


HEADERS = ("stage", "measurement", "throughput", "s/frame, 1 core", "vs paper", "first batch", "disk written",
           "notes")


def details(result: dict[str, Any]) -> list[str]:
    """What the table's cells mean, and the figures behind the streaming disk and CPU columns."""
    opts = result["options"]
    length, size = opts["length"], opts["pipeline_size"]
    lines = [
        f"Per core: one process, OpenCV/FFmpeg/BLAS at one thread; rates per CPU-second of that process. "
        f"A flow frame is one frame pair; decode + flow s/frame = (decode of L+1 = {length + 1} frames + "
        f"{length} flow fields) / {length}. vs paper = {PAPER_S_PER_FRAME} s / that.",
        f"Streaming, DataLoader and classic: {opts['pipeline_method']} at {size}x{size}, L={length}, the same "
        f"sampled segments; samples/s from the first sample (batch) to the last. First batch: streaming from "
        f"publishing the epoch to its first sample (resident workers), DataLoader from iter() (its processes "
        f"start), classic = extraction + the reader's first batch. The DataLoader gets as many processes as the "
        f"streaming run has workers; each does decode and flow, where a streaming worker does one of the two.",
        "Disk written: growth of write_bytes in /proc/<pid>/io (counted per dirtied 4 KiB page) of the workers and "
        "this process (streaming), this process and the loader processes (DataLoader), the extraction processes "
        "(classic). This process's own output counts when it is redirected to a file.",
    ]
    for r in result.get("streaming") or []:
        services = ", ".join(f"{role} {_human_bytes(b)}" for role, b in sorted(r["disk_bytes_services"].items()))
        cpu = ", ".join(f"{role} {_num(ms, 0)} ms" for role, ms in r["cpu_ms_per_sample"].items())
        lines.append(
            f"Streaming {r['workers_per_kind']}+{r['workers_per_kind']}: workers up in {_num(r['startup_s'])} s; "
            f"{r['delivered']} samples delivered ({r['dead']} dead, {r['redone']} redone), "
            f"{_human_bytes(r['raw_bytes_delivered'])} of raw frames + flow through Redis, "
            f"{_human_bytes(r['payload_bytes_left_in_redis'])} left there. Disk: "
            + ", ".join(f"{name} {_human_bytes(b)}" for name, b in r["disk_bytes_by_process"].items())
            + f" (worker logs {_human_bytes(r['worker_log_bytes'])}); services, shared with anything else running: "
            f"{services}; Redis persistence {r['redis_persistence']}. CPU per sample: {cpu}.")
    if result.get("streaming"):
        lines.append("Tansu keeps the Kafka log (jobs, notices, offsets, heartbeats: small JSON) as objects in "
                     "SeaweedFS, so the broker's writes show up under s3 (weed): broker/S3 metadata, not frames.")
    return lines


def result_table(result: dict[str, Any]) -> Table:
    m = result["machine"]
    table = Table(*HEADERS, title=f"essp bench dataplane: {m['cpu_model']}, {m['cores']} cores, {result['date']}")
    for row in _rows(result):
        table.add_row(*(Text(cell) for cell in row))
    return table


def render_markdown(result: dict[str, Any]) -> str:
    """The docs block: when, where, the exact command, the table and what it says."""
    m = result["machine"]
    ds = result.get("dataset", {})
    lines = [
        f"Measured {result['date']} on {m['cpu_model']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['memory_gib']} GiB; load average {m['load_avg'][0]} at the start, "
        f"{m.get('load_avg_end', ['?'])[0]} at the end; {result['elapsed_s']:.0f} s in all. Dataset: "
        f"{ds.get('videos')} synthetic H.264 videos of {ds.get('frames_per_video')} frames at {ds.get('size')} "
        f"(keyframe every {ds.get('keyint')}), {_human_bytes(ds.get('bytes'))}.",
        "",
        "```",
        result["command"],
        "```",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    for row in _rows(result):
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    lines.append("")
    lines += [f"- {line}" for line in result["summary"]["lines"] + details(result)]
    return "\n".join(lines) + "\n"
