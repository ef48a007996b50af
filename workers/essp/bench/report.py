"""A data plane result in words and figures: the summary sentences (the promises, the ratios against their
targets, the machine's limit), the table and the notes printed under it, and the markdown block for
docs/benchmarks.md (the table, the ratios, the CPU per sample by process split into work and overhead,
the broker's cost per epoch)."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from essp.bench.options import PAPER_S_PER_FRAME, TARGET_SPEEDUP
from essp.bench.ratios import against_targets, machine_limit, ratio_lines, ratio_table, ratios


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


def _promise_lines(result: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Per-core speed-up against the paper, and nothing decoded on disk."""
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
    two = result.get("two_streams")
    disk_max = max([r["disk_bytes"] for r in streaming], default=None)
    raw_max = max([r["raw_bytes_delivered"] for r in streaming], default=None)
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
                     f"the classic pipeline wrote {_human_bytes((result.get('classic') or {}).get('disk_bytes'))}. "
                     f"No frame or flow on disk: {'yes' if clean else 'CHECK'}.")
    left = [r["payload_bytes_left_in_redis"] for r in streaming] + ([two["payload_bytes_left_in_redis"]] if two else [])
    summary = {"best_dis_speedup": best["speedup_vs_paper"] if best else None,
               "pipeline_method_min_speedup": slowest["speedup_vs_paper"] if slowest else None,
               "streaming_disk_bytes_max": disk_max, "raw_bytes_delivered_max": raw_max,
               "classic_disk_bytes": (result.get("classic") or {}).get("disk_bytes"),
               "payload_bytes_left_in_redis": sum(left) if left else None}
    return lines, summary


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """The figures the promises and targets are about, each with a sentence. Sets ``result["ratios"]``,
    ``result["overhead_ms_per_sample"]``, ``result["targets"]`` and ``result["limit"]`` first."""
    values, overhead = ratios(result)
    result["ratios"] = values
    result["overhead_ms_per_sample"] = overhead
    result["targets"] = against_targets({**values, "overhead_ms_per_sample": overhead})
    result["limit"] = machine_limit(result)
    lines, summary = _promise_lines(result)
    lines += ratio_lines(result)
    limit = result["limit"]
    if limit:
        lines.append(f"The machine's limit: decode + flow alone cost {_num(limit['cpu_ms_per_sample'])} ms CPU per "
                     f"sample (per core, {limit['pix_fmt'] or 'rgb24'} decode), i.e. "
                     f"{_num(limit['samples_per_s'])} samples/s on {limit['usable_cores']} usable core(s); the "
                     f"one-stream plane reached {_num(limit['plane_samples_per_s'])} "
                     f"({_num(100 * (limit['plane_fraction'] or 0), 0)}%), the lean DataLoader "
                     f"{_num(limit['dataloader_samples_per_s'])} "
                     f"({_num(100 * (limit['dataloader_fraction'] or 0), 0)}%).")
    paced = [(r["workers_per_kind"], r["paced"]) for r in result.get("streaming") or []
             if r.get("paced") and r["paced"]["wait_fraction"] is not None]
    if paced:
        lines.append(f"Trainer data wait at {paced[0][1]['step_ms']:.0f} ms per sample (80% of what the plane "
                     "delivers, unless --trainer-step-ms): "
                     + ", ".join(f"{p['wait_fraction']:.1%} with {c} of each" for c, p in paced) + " (target < 5%).")
    return {**summary, "ratios": values, "overhead_ms_per_sample": overhead, "lines": lines}


def _rate(value: float | None, unit: str, length: int | None = None) -> str:
    text = f"{_num(value)} {unit}"
    if length and value:
        text += f" = {_num(value * length, 0)} flow frames/s"
    return text


def _cpu_note(cpu: dict[str, Any]) -> str:
    text = f"CPU/sample {_num(cpu['total_ms_per_sample'], 0)} ms"
    if cpu.get("work_total_ms_per_sample") is not None:
        text += (f" = work {_num(cpu['work_total_ms_per_sample'], 0)} + overhead "
                 f"{_num(cpu['overhead_ms_per_sample'], 0)}")
    return text


def _decoded(row: dict[str, Any]) -> str:
    return f"; {row['decoded_per_used']:.2f} frames decoded per frame used" if row.get("decoded_per_used") else ""


def _loader_row(label: str, r: dict[str, Any], length: int | None) -> tuple[str, ...]:
    return ("DataLoader", label, _rate(r["samples_per_s"], "samples/s", length), "", "",
            f"{_num(r['first_batch_s'], 2)} s", _human_bytes(r["disk_bytes"]),
            f"CPU/sample {_num(r['cpu_ms_per_sample'], 0)} ms (main + loaders); batch {r['batch_size']}, "
            f"{r['start_method']}{_decoded(r)}")


def _rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per measurement, in the order of :data:`HEADERS`."""
    rows = []
    length = result["options"]["length"]
    for r in result["per_core"]:
        source, fmt = r["source"], f" ({r['pix_fmt']})" if r.get("pix_fmt") == "gray" else ""
        if r["what"] == "decode":
            rows.append(("per core", f"decode{fmt} {r['size']}x{r['size']} from {source}",
                         _rate(r["frames_per_s"], "frames/s"), f"{r['s_per_frame']:.4f}", "", "", "",
                         f"{r['samples']} stacks of {length + 1} frames{_decoded(r)}"))
        else:
            rows.append(("per core", f"decode{fmt} + {r['method']} {r['size']}x{r['size']} from {source}",
                         _rate(r["frames_per_s"], "flow frames/s"), f"{r['s_per_frame']:.4f}",
                         f"{r['speedup_vs_paper']:.1f}x", "", "",
                         f"flow alone {_num(r['flow_only_frames_per_s'], 0)} frames/s; {r['samples']} stacks"))
    for r in result.get("streaming") or []:
        paced = r.get("paced") or {}
        wait = (f"; data wait {_num(100 * paced['wait_fraction'])}% at {_num(paced['step_ms'], 0)} ms/sample"
                if paced.get("wait_fraction") is not None else "")
        rows.append(("streaming", f"{r['workers_per_kind']} decode + {r['workers_per_kind']} flow workers, "
                     f"{len(r['epochs'])} epochs", _rate(r["samples_per_s"], "samples/s", length), "", "",
                     f"{_num(r['first_sample_s'], 2)} s", _human_bytes(r["disk_bytes"]),
                     _cpu_note(r["cpu"]) + wait + _decoded(r)))
    two = result.get("two_streams")
    if two:
        w = two["workers"]
        rows.append(("streaming", f"{w['decode']} decode + {w['flow']} flow + {w['rgb']} rgb workers, rgb + flow "
                     "streams", _rate(two["samples_per_s"], "samples/s of both"), "", "",
                     f"{_num(two['first_sample_s'], 2)} s", "", _cpu_note(two["cpu"]) + "; one decode feeds both"))
    for r in result.get("dataloader") or []:
        rows.append(_loader_row(f"lean, num_workers={r['num_workers']}: decode_segment ({r['pix_fmt']}) + flow "
                                "extractor", r, length))
    user = result.get("dataloader_user")
    if user:
        rows.append(_loader_row(f"user-written, num_workers={user['num_workers']}: PyAV + OpenCV frame by frame",
                                user, length))
    pair = result.get("two_dataloaders")
    if pair:
        rgb, flow = pair["streams"]["rgb"], pair["streams"]["flow"]
        rows.append(("DataLoader", f"two, one per stream: rgb num_workers={rgb['num_workers']} (its frame only) + "
                     f"flow num_workers={flow['num_workers']}", _rate(pair["samples_per_s"], "samples/s of both"),
                     "", "", f"{_num(min(rgb['first_batch_s'], flow['first_batch_s']), 2)} s",
                     _human_bytes(pair["disk_bytes"]), f"CPU/sample {_num(pair['cpu_ms_per_sample'], 0)} ms; "
                     f"rgb{_decoded(rgb).removeprefix(';')}"))
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
CPU_ROLES = ("decode", "flow", "rgb", "consumer (bench)", "redis", "kafka (tansu)", "s3 (weed)")


def cpu_breakdown(cpu: dict[str, Any]) -> str:
    """One line: total = work (by worker) + overhead (by process), ms per sample."""
    work, by_process = cpu.get("work_ms_per_sample"), cpu.get("overhead_by_process_ms_per_sample")
    text = f"{_num(cpu['total_ms_per_sample'])} ms in all"
    if work is not None and by_process is not None:
        text += (f" = work {_num(cpu['work_total_ms_per_sample'])} ("
                 + ", ".join(f"{role} {_num(ms)}" for role, ms in work.items()) + ") + overhead "
                 f"{_num(cpu['overhead_ms_per_sample'])} ("
                 + ", ".join(f"{role} {_num(ms)}" for role, ms in by_process.items()) + ")")
    else:
        text += " (" + ", ".join(f"{role} {_num(ms)}" for role, ms in cpu["cpu_ms_per_sample"].items()) + \
                "; the workers report no work_cpu_s: no work / overhead split)"
    return text


def details(result: dict[str, Any]) -> list[str]:
    """What the table's cells mean, and the figures behind the streaming CPU and disk columns."""
    opts = result["options"]
    length, size = opts["length"], opts["pipeline_size"]
    lines = [
        f"Per core: one process, OpenCV/FFmpeg/BLAS at one thread; rates per CPU-second of that process. "
        f"A flow frame is one frame pair; decode + flow s/frame = (decode of L+1 = {length + 1} frames + "
        f"{length} flow fields) / {length}. vs paper = {PAPER_S_PER_FRAME} s / that.",
        f"Streaming, DataLoaders and classic: {opts['pipeline_method']} at {size}x{size}, L={length}, the same "
        f"sampled segments; samples/s from the first delivery (a chunk of the plane, a batch of a DataLoader) to "
        f"the last sample. First batch: streaming from publishing the epoch to its first sample (resident workers), "
        f"DataLoader from iter() (its processes start), classic = extraction + the reader's first batch.",
        "Disk written: growth of write_bytes in /proc/<pid>/io (counted per dirtied 4 KiB page) of the workers and "
        "this process (streaming), this process and the loader processes (DataLoader), the extraction processes "
        "(classic). This process's own output counts when it is redirected to a file.",
    ]
    for r in result.get("streaming") or []:
        services = ", ".join(f"{role} {_human_bytes(b)}" for role, b in sorted(r["disk_bytes_services"].items()))
        lines.append(
            f"Streaming {r['workers_per_kind']}+{r['workers_per_kind']}: workers up in {_num(r['startup_s'])} s; "
            f"{r['delivered']} samples delivered ({r['dead']} dead, {r['redone']} redone), "
            f"{_human_bytes(r['raw_bytes_delivered'])} of raw frames + flow through Redis, "
            f"{_human_bytes(r['payload_bytes_left_in_redis'])} left there. Disk: "
            + ", ".join(f"{name} {_human_bytes(b)}" for name, b in r["disk_bytes_by_process"].items())
            + f" (worker logs {_human_bytes(r['worker_log_bytes'])}); services, shared with anything else running: "
            f"{services}; Redis persistence {r['redis_persistence']}.")
        lines.append(f"CPU per sample, streaming {r['workers_per_kind']}+{r['workers_per_kind']} over "
                     f"{r['measured_samples']} samples of {len(r['epochs'])} epochs: {cpu_breakdown(r['cpu'])}.")
        lines.append("Broker (Tansu + SeaweedFS) CPU per sample by epoch: "
                     + ", ".join(f"{e['epoch']}: {_num(e['cpu']['broker_ms_per_sample'])} ms "
                                 f"({_num(e['samples_per_s'])} samples/s)" for e in r["epochs"]) + ".")
    two = result.get("two_streams")
    if two:
        lines.append(f"Two streams: {two['samples']} samples on each of rgb and flow (delivered "
                     + ", ".join(f"{k} {v}" for k, v in two["delivered"].items())
                     + f"; every sample of both: {'yes' if two['all_delivered'] else 'NO'}), "
                     f"{_human_bytes(two['payload_bytes_left_in_redis'])} left in Redis; CPU per sample: "
                     f"{cpu_breakdown(two['cpu'])}.")
    pair = result.get("two_dataloaders")
    if pair:
        lines.append("Two DataLoaders: delivered " + ", ".join(f"{k} {v}" for k, v in pair["delivered"].items())
                     + f"; {_num(pair['samples_per_s_from_start'])} samples/s counted from iter() (the plane from "
                     f"publishing: {_num((two or {}).get('samples_per_s_from_start'))}).")
    limit = result.get("limit")
    if limit:
        lines.append(f"Machine limit: {limit['usable_cores']} usable core(s) x 1000 / "
                     f"{_num(limit['cpu_ms_per_sample'])} ms (decode + {opts['pipeline_method']} per sample, per "
                     f"core) = {_num(limit['samples_per_s'])} samples/s.")
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


def _cpu_table(result: dict[str, Any]) -> list[str]:
    """Markdown: CPU ms per sample by process, work and overhead, for each streaming measurement."""
    columns = [(f"one stream {r['workers_per_kind']}+{r['workers_per_kind']}", r["cpu"])
               for r in result.get("streaming") or []]
    if result.get("two_streams"):
        columns.append(("two streams", result["two_streams"]["cpu"]))
    if not columns:
        return []
    lines = ["| process | " + " | ".join(f"{name}: all / work / overhead" for name, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]

    def cell(cpu: dict[str, Any], role: str | None) -> str:
        if role is None:
            return (f"**{_num(cpu['total_ms_per_sample'])}** / {_num(cpu['work_total_ms_per_sample'])} / "
                    f"{_num(cpu['overhead_ms_per_sample'])}")
        if role not in cpu["cpu_ms_per_sample"]:
            return ""
        work = (cpu.get("work_ms_per_sample") or {}).get(role)
        over = (cpu.get("overhead_by_process_ms_per_sample") or {}).get(role)
        return f"{_num(cpu['cpu_ms_per_sample'][role])} / {_num(work) if work is not None else '-'} / {_num(over)}"

    for role in (*CPU_ROLES, None):
        lines.append(f"| {role or '**all**'} | " + " | ".join(cell(cpu, role) for _, cpu in columns) + " |")
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    """The docs block: when, where, the exact command, the table, the ratios, the CPU split, and notes."""
    m = result["machine"]
    ds = result.get("dataset", {})
    lines = [
        f"Measured {result['date']} on {m['cpu_model']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['memory_gib']} GiB; load average {m['load_avg'][0]} at the start, "
        f"{m.get('load_avg_end', ['?'])[0]} at the end; {result['elapsed_s']:.0f} s in all. Dataset: "
        f"{ds.get('videos')} synthetic H.264 videos of {ds.get('frames_per_video')} frames at {ds.get('size')} "
        f"(keyframe every {ds.get('keyint')}), {_human_bytes(ds.get('bytes'))}.",
        "", "```", result["command"], "```", "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    for row in _rows(result):
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    lines += ["", "| the plane against its baselines | figure | target | met |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in ratio_table(result)]
    cpu = _cpu_table(result)
    if cpu:
        lines += ["", "CPU per delivered sample (ms) by process: all / work (decode_segment, extract) / overhead:", "",
                  *cpu]
    lines.append("")
    lines += [f"- {line}" for line in result["summary"]["lines"] + details(result)]
    return "\n".join(lines) + "\n"
