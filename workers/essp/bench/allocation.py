"""`essp bench allocation`: wall time to a target validation accuracy with trainer slots static or moved by
validation loss (the paper's §3.4, essp.lifecycle.allocation), on the synthetic set.

The same run twice, one after the other on this machine: the same dataset, seeds, params and total slots
(``trainer_procs x 2`` DDP processes), ``allocation`` ``static`` and then ``validation_loss``. After each epoch
the bench reads both streams' validation top-1 (the trainers' histories) and notes the training time so far
(from the first epoch's start: worker start-up and scoring are the same for both and left out). The figure:
seconds until both streams reached ``--target``, and their ratio; every slot decision is listed. Printed, and
with ``--write-docs`` written into docs/benchmarks.md between the ``bench:allocation`` markers.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from essp.bench.dataplane import bench_app
from essp.bench.docs import DEFAULT_DOCS, update_docs
from essp.bench.processes import machine_info

out = Console()

DEFAULTS: dict[str, Any] = {"rgb_arch": "tiny", "flow_arch": "tiny", "length": 5, "size": 64, "batch_size": 8,
                            "lr": 0.05, "samples_per_epoch": 96, "snippets": 5, "val_snippets": 5, "fusion": "average",
                            "seed": 0, "val_fraction": 0.2}


def _time_to(target: float, epochs: list[dict[str, Any]]) -> float | None:
    for row in epochs:
        if all(v is not None and v >= target for v in row["val_top1"].values()):
            return row["seconds"]
    return None


def run_policy(settings: Any, policy: str, *, dataset: str, epochs: int, procs: int, tag: str,
               say: Any) -> dict[str, Any]:
    """One training run with ``allocation`` = ``policy``; its per-epoch times and validation top-1."""
    from essp.lifecycle.allocation import allocation_record
    from essp.lifecycle.params import parse_params
    from essp.lifecycle.pipeline import run_training
    from essp.lifecycle.progress import stream_histories

    run = f"{tag}-{policy.replace('_', '-')}"
    spec = parse_params({**DEFAULTS, "dataset": dataset, "run": run, "epochs": epochs, "trainer_procs": procs,
                         "allocation": policy})
    rows: list[dict[str, Any]] = []

    def on_epoch(epoch: int, seconds: float) -> None:
        histories = stream_histories(settings, run, spec.streams)
        top1 = {s: next((h.get("val_top1") for h in hs if int(h["epoch"]) == epoch), None)
                for s, hs in histories.items()}
        rows.append({"epoch": epoch, "seconds": round(seconds, 1), "val_top1": top1})
        say(f"  {policy}: epoch {epoch} at {seconds:.1f}s, validation top-1 "
            + ", ".join(f"{s} {v if v is None else round(v, 3)}" for s, v in top1.items()))

    outcome = run_training(settings, spec, log=lambda line: None, on_epoch=on_epoch)
    record = allocation_record(settings, run) or {"decisions": []}
    return {"policy": policy, "run": run, "epochs": rows, "train_s": outcome["timings"].get("train_s"),
            "test_top1": outcome["metrics"]["top1"],
            "decisions": [{k: d[k] for k in ("epoch", "slots", "reason", "moved")} for d in record["decisions"]]}


def bench_allocation(*, classes: int = 4, videos_per_class: int = 16, epochs: int = 8, procs: int = 2,
                     target: float = 0.85, write_docs: bool = False, docs_path: Path = DEFAULT_DOCS,
                     json_path: Path | None = None, command: str | None = None) -> dict[str, Any]:
    from essp.datasets.ingest import ingest_directory
    from essp.datasets.synth import synthesize
    from essp.stack.services import isolated_settings, prepare_settings, remove_isolated

    def say(message: str) -> None:
        out.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}", highlight=False)

    tag = "balloc" + uuid.uuid4().hex[:6]
    settings = isolated_settings(prepare_settings(), tag).model_copy(update={"heartbeat_s": 1.0})
    result: dict[str, Any] = {"benchmark": "allocation", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "command": command or "essp bench allocation", "machine": machine_info(),
                              "params": {**DEFAULTS, "epochs": epochs, "trainer_procs": procs,
                                         "slots": 2 * procs, "classes": classes,
                                         "videos_per_class": videos_per_class}, "target_val_top1": target}
    try:
        with tempfile.TemporaryDirectory(prefix="essp-bench-alloc-") as scratch:
            say(f"synthesising {classes * videos_per_class} videos")
            synthesize(Path(scratch) / "data", classes=classes, videos_per_class=videos_per_class, frames=48,
                       height=112, width=112, seed=0)
            ingest_directory(settings, Path(scratch) / "data", "alloc", val_fraction=DEFAULTS["val_fraction"])
        result["runs"] = [run_policy(settings, policy, dataset="alloc", epochs=epochs, procs=procs, tag=tag, say=say)
                          for policy in ("static", "validation_loss")]
    finally:
        remove_isolated(settings)
    for run in result["runs"]:
        run["to_target_s"] = _time_to(target, run["epochs"])
    static, dynamic = (r["to_target_s"] for r in result["runs"])
    result["ratio_static_over_dynamic"] = round(static / dynamic, 3) if static and dynamic else None
    block = render(result)
    out.print(block, markup=False, highlight=False)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    if write_docs:
        update_docs(docs_path, block, name="allocation", title="Trainer slots: static or moved by validation loss")
    return result


def render(result: dict[str, Any]) -> str:
    params = result["params"]
    lines = [f"Measured {result['date']} on {result['machine'].get('cpu_model', '?')} "
             f"({result['machine'].get('cores', '?')} cores) with `{result['command']}`: "
             f"{params['classes']} classes x {params['videos_per_class']} clips, both streams `tiny` at "
             f"{params['size']}x{params['size']}, L={params['length']}, {params['epochs']} epochs of "
             f"{params['samples_per_epoch']} samples, {params['slots']} slots (`trainer_procs` "
             f"{params['trainer_procs']} x 2 streams), the same seeds; target: validation top-1 >= "
             f"{result['target_val_top1']} on both.", "",
             "| allocation | to target (s) | training (s) | test top-1 | slots moved |", "|---|---|---|---|---|"]
    for run in result["runs"]:
        moved = "; ".join(f"before epoch {d['epoch']}: " + ", ".join(f"{s} {n}" for s, n in d["slots"].items())
                          for d in run["decisions"] if d["moved"])
        reached = "not reached" if run["to_target_s"] is None else f"{run['to_target_s']:.1f}"
        lines.append(f"| {run['policy']} | {reached} | {run['train_s']} | {run['test_top1']:.3f} | {moved or '-'} |")
    ratio = result["ratio_static_over_dynamic"]
    lines += ["", f"Static / dynamic time to target: {ratio if ratio is not None else 'n/a (a run did not reach it)'}.",
              "", "Validation top-1 after each epoch (seconds of training so far):", ""]
    for run in result["runs"]:
        cells = ", ".join(f"e{r['epoch']} {r['seconds']}s " + "/".join(
            "-" if v is None else f"{v:.2f}" for v in r["val_top1"].values()) for r in run["epochs"])
        lines.append(f"- {run['policy']} (rgb/flow): {cells}")
    return "\n".join(lines) + "\n"


@bench_app.command("allocation")
def allocation_cmd(
    epochs: Annotated[int, typer.Option(min=2, help="Epochs of each run.")] = 8,
    procs: Annotated[int, typer.Option(min=2, help="trainer_procs: each stream's slots to start with.")] = 2,
    target: Annotated[float, typer.Option(min=0, max=1, help="Validation top-1 both streams must reach.")] = 0.85,
    videos_per_class: Annotated[int, typer.Option(min=4)] = 16,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result as JSON here.")] = None,
    write_docs: Annotated[bool, typer.Option("--write-docs", help="Update docs/benchmarks.md's block.")] = False,
    docs: Annotated[Path, typer.Option(help="The benchmarks page to update.")] = DEFAULT_DOCS,
) -> None:
    """Seconds to a target validation accuracy with trainer slots static or moved by validation loss (§3.4)."""
    command = "essp " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    bench_allocation(epochs=epochs, procs=procs, target=target, videos_per_class=videos_per_class,
                     write_docs=write_docs, docs_path=docs, json_path=json_out, command=command)
