"""The plane's cost against its baselines, from one `essp bench dataplane` result: the four ratios and the
plane's own CPU per sample (with the issue's targets beside them, :data:`essp.bench.options.TARGETS`), and
the machine's limit (decode + flow CPU alone, from the per-core measurement, on the usable cores).

- ``one_stream_vs_dataloader``: one-stream plane samples/s / the lean DataLoader's with as many processes;
- ``two_streams_vs_two_dataloaders``: two-stream plane samples/s / two DataLoaders' (one per stream);
- ``cpu_per_sample_vs_dataloader``: the one-stream plane's CPU per sample, every process (workers,
  consumer, Redis, Tansu, SeaweedFS) / the lean DataLoader's (its main and loader processes);
- ``broker_cost_last_vs_first_epoch``: Tansu + SeaweedFS CPU per sample, last measured epoch / first;
- ``overhead_ms_per_sample``: the one-stream plane's CPU per sample beyond decode and flow (all services).
"""

from __future__ import annotations

from typing import Any

from essp.bench.options import TARGETS


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def lean_loader(result: dict[str, Any], processes: int) -> dict[str, Any] | None:
    """The lean DataLoader row with ``processes`` loader processes."""
    return next((r for r in result.get("dataloader") or [] if r["num_workers"] == processes), None)


def machine_limit(result: dict[str, Any]) -> dict[str, Any] | None:
    """Decode + flow CPU alone per sample at the pipeline's size and method (per core, synthetic videos),
    as samples/s on the machine's usable cores, beside what the plane and the lean DataLoader reach."""
    options = result["options"]
    row = next((r for r in result.get("per_core") or [] if r["what"] == "decode+flow"
                and r["source"].startswith("synthetic") and r["method"] == options["pipeline_method"]
                and r["size"] == options["pipeline_size"]), None)
    if row is None:
        return None
    cpu_ms = row.get("cpu_ms_per_sample") or 1000 * row["s_per_frame"] * options["length"]
    cores = result["machine"]["usable_cores"] or 1
    limit = cores * 1000 / cpu_ms
    streaming = result.get("streaming") or []
    plane = streaming[0]["samples_per_s"] if streaming else None
    loader = lean_loader(result, streaming[0]["processes"]) if streaming else None
    return {"cpu_ms_per_sample": cpu_ms, "usable_cores": cores, "samples_per_s": limit, "pix_fmt": row.get("pix_fmt"),
            "plane_samples_per_s": plane, "plane_fraction": _div(plane, limit),
            "dataloader_samples_per_s": loader["samples_per_s"] if loader else None,
            "dataloader_fraction": _div(loader["samples_per_s"] if loader else None, limit)}


def ratios(result: dict[str, Any]) -> tuple[dict[str, float | None], float | None]:
    """(the four ratios, the plane's own CPU ms per sample), None where a part was not measured."""
    streaming = result.get("streaming") or []
    one = streaming[0] if streaming else None
    loader = lean_loader(result, one["processes"]) if one else None
    two, pair = result.get("two_streams"), result.get("two_dataloaders")
    broker = one["broker_ms_per_sample_by_epoch"] if one else []
    values = {
        "one_stream_vs_dataloader": _div(one and one["samples_per_s"], loader and loader["samples_per_s"]),
        "two_streams_vs_two_dataloaders": _div(two and two["samples_per_s"], pair and pair["samples_per_s"]),
        "cpu_per_sample_vs_dataloader": _div(one and one["cpu"]["total_ms_per_sample"],
                                             loader and loader["cpu_ms_per_sample"]),
        "broker_cost_last_vs_first_epoch": _div(broker[-1], broker[0]) if len(broker) > 1 else None,
    }
    return values, one["overhead_ms_per_sample"] if one else None


def against_targets(values: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    """Each figure with its target and whether it is met (None: not measured)."""
    out = {}
    for name, (op, bound) in TARGETS.items():
        value = values.get(name)
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        out[name] = {"value": value, "target": f"{op} {bound:g}", "met": met}
    return out


LABELS = {
    "overhead_ms_per_sample": "plane's own CPU per sample, one stream, services included (ms)",
    "one_stream_vs_dataloader": "one stream: plane samples/s / lean DataLoader samples/s",
    "two_streams_vs_two_dataloaders": "two streams from one decode: plane samples/s / two DataLoaders samples/s",
    "cpu_per_sample_vs_dataloader": "CPU per sample: plane (all processes) / lean DataLoader (all processes)",
    "broker_cost_last_vs_first_epoch": "broker (Tansu + SeaweedFS) CPU per sample: last epoch / first",
}


def ratio_lines(result: dict[str, Any]) -> list[str]:
    """One sentence per target: the figure, the target, met or not."""
    lines = []
    for name, item in result.get("targets", {}).items():
        value = item["value"]
        shown = "n/a" if value is None else (f"{value:.1f}" if name == "overhead_ms_per_sample" else f"{value:.2f}")
        verdict = "not measured" if item["met"] is None else ("met" if item["met"] else "NOT met")
        label = LABELS[name]
        lines.append(f"{label[0].upper()}{label[1:]}: {shown} (target {item['target']}): {verdict}.")
    return lines


def ratio_table(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, met) rows for the docs block."""
    rows = []
    for name, item in result.get("targets", {}).items():
        value = item["value"]
        shown = "n/a" if value is None else (f"{value:.1f}" if name == "overhead_ms_per_sample" else f"{value:.2f}")
        rows.append((f"`{name}`: {LABELS[name]}", shown, item["target"],
                     "n/a" if item["met"] is None else ("yes" if item["met"] else "no")))
    return rows
