"""`essp bench trainer`: what a trainer computes per second, and how long it waits for the data plane.

Two measurements, in one run, printed as a table and (``--write-docs``) written into
docs/benchmarks.md between the ``bench:trainer`` markers:

- **compute**: one :class:`~essp.training.trainer.StreamTrainer` per (stream, architecture) trained on
  in-memory uint8 batches of the stream's shape, so the figure is the step alone: images/s (one
  image = one sample: an RGB frame, or a stack of 2L flow channels) on the CPU (all cores, fp32) or
  on a GPU (bf16 autocast, channels-last) when one is there;
- **streaming**: the same trainer fed by the real data plane (resident decode and extractor worker
  processes on the local stack, an epoch planned to Kafka, samples from Redis through the prefetching
  ``SampleStream``) with 1 and 2 workers of each kind: samples/s and the fraction of the epoch the
  trainer waited for data (promise 3: under 5% when enough workers run).
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from essp.bench.dataplane import bench_app
from essp.bench.docs import DEFAULT_DOCS, update_docs
from essp.bench.processes import machine_info
from essp.settings import Settings

# torch and the trainer are imported inside the functions: `essp --help` must not pay for them.

out = Console()


@dataclass(frozen=True)
class TrainerBenchOptions:
    streams: tuple[str, ...] = ("rgb", "flow")
    archs: tuple[str, ...] = ("tiny", "resnet18")
    size: int = 112
    length: int = 10
    batch_size: int = 16
    steps: int = 12  # timed steps per compute measurement (after 2 warm-up steps)
    workers: tuple[int, ...] = (1, 2)
    samples: int = 96  # samples of each streaming epoch
    stream_archs: tuple[str, ...] = ("tiny", "resnet18")
    flow_method: str = "dis_fast"
    classes: int = 4
    videos_per_class: int = 4
    frames: int = 48
    seed: int = 0
    device: str = "auto"

    @classmethod
    def quick_run(cls, **overrides: Any) -> TrainerBenchOptions:
        values: dict[str, Any] = {"archs": ("tiny",), "stream_archs": ("tiny",), "size": 32, "length": 4,
                                  "batch_size": 4, "steps": 2, "workers": (1,), "samples": 8, "classes": 2,
                                  "videos_per_class": 2, "frames": 16}
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        from essp.training.architectures import ARCHITECTURES
        from essp.training.models import stream_channels

        for arch in (*self.archs, *self.stream_archs):
            if arch not in ARCHITECTURES:
                raise ValueError(f"architecture {arch!r} is not one of {', '.join(ARCHITECTURES)}")
        for stream in self.streams:
            stream_channels(stream, self.length)  # raises for an unknown stream
        if self.size < 16 or self.batch_size < 2 or self.steps < 1 or self.samples < self.batch_size:
            raise ValueError("size >= 16, batch >= 2, steps >= 1 and samples >= batch are needed")
        if not self.workers or min(self.workers) < 1:
            raise ValueError(f"workers must be positive counts, got {self.workers}")


@dataclass
class _Batches:
    """An endless iterable of in-memory samples of one stream's shape."""

    stream: str
    length: int
    size: int
    classes: int = 4
    cache: list[Any] = field(default_factory=list)

    def take(self, count: int) -> list[Any]:
        from essp.dataplane.consumer import Sample
        from essp.training.models import stream_channels

        rng = np.random.default_rng(0)
        shape = (stream_channels(self.stream, self.length), self.size, self.size)
        while len(self.cache) < count:
            i = len(self.cache)
            self.cache.append(Sample(f"b{i}", 0, int(rng.integers(self.classes)),
                                     rng.integers(0, 256, size=shape, dtype=np.uint8), None))  # type: ignore[arg-type]
        return self.cache[:count]


def measure_compute(options: TrainerBenchOptions, say: Callable[[str], None]) -> list[dict[str, Any]]:
    import torch

    from essp.training.params import TrainParams
    from essp.training.trainer import StreamTrainer

    rows = []
    for stream in options.streams:
        for arch in options.archs:
            params = TrainParams(arch=arch, batch_size=options.batch_size, lr=0.01, seed=options.seed,
                                 device=options.device, precise_bn_batches=0)
            trainer = StreamTrainer(stream, num_classes=options.classes, length=options.length, params=params)
            samples = _Batches(stream, options.length, options.size, options.classes).take(options.batch_size * 2)
            trainer.train_epoch(samples)  # warm-up: allocations, cuDNN autotune
            timed = _Batches(stream, options.length, options.size, options.classes).take(
                options.batch_size * options.steps)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            trainer.train_epoch(timed)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            row = {"stage": "compute", "stream": stream, "arch": arch, "device": str(trainer.device),
                   "precision": "bf16 autocast, channels-last" if trainer.amp else "fp32",
                   "threads": torch.get_num_threads(), "images_per_s": len(timed) / seconds,
                   "ms_per_step": 1000 * seconds / options.steps, "channels": trainer.in_channels}
            rows.append(row)
            say(f"compute {stream:<5} {arch:<9} {row['images_per_s']:8.1f} images/s on {row['device']}")
            del trainer
    return rows


def _dataset(settings: Settings, options: TrainerBenchOptions, scratch: Path) -> Any:
    from essp.datasets.ingest import ingest_directory
    from essp.datasets.synth import synthesize

    root = scratch / "synth"
    synthesize(root, classes=options.classes, videos_per_class=options.videos_per_class, frames=options.frames,
               height=max(options.size, 64), width=max(options.size, 64), seed=options.seed)
    manifest, _ = ingest_directory(settings, root, "bench-trainer")
    return manifest


def measure_streaming(settings: Settings, options: TrainerBenchOptions, scratch: Path,
                      say: Callable[[str], None]) -> list[dict[str, Any]]:
    import torch

    from essp.clients.kafka import delete_topics, ensure_topics
    from essp.contract import Topics
    from essp.dataplane.plan import run_topic_names
    from essp.deploy.local import LocalProcess, LocalProcesses, stop_together, worker_args, worker_name

    manifest = _dataset(settings, options, scratch)
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.shared())
    rows = []
    torch.set_num_threads(1)  # the trainer shares the cores with the workers, as on one node
    for stream in options.streams:
        features = {stream: {"method": options.flow_method} if stream == "flow" else {}}
        workers: list[LocalProcess] = []
        try:
            for count in options.workers:
                workers += LocalProcesses(settings, state_dir=scratch).start(
                    [cmd for index in range(len(workers) // 2, count)
                     for cmd in ((worker_name("decode", index), worker_args("decode")),
                                 (worker_name(stream, index), worker_args(stream)))])
                for arch in options.stream_archs:
                    run = f"bt-{stream}-{arch}-{count}-{uuid.uuid4().hex[:6]}"
                    row = _stream_epoch(settings, manifest, run, stream, arch, features, options)
                    row.update({"stage": "streaming", "workers": count})
                    rows.append(row)
                    say(f"streaming {stream:<5} {arch:<9} {count} worker(s) of each kind: "
                        f"{row['samples_per_s']:.1f} samples/s, data wait {100 * row['data_wait']:.1f}%")
                    delete_topics(settings, run_topic_names(settings, run))
        finally:
            stop_together(workers)
    return rows


def _stream_epoch(settings: Settings, manifest: Any, run: str, stream: str, arch: str,
                  features: dict[str, dict[str, Any]], options: TrainerBenchOptions) -> dict[str, Any]:
    from essp.dataplane.consumer import SampleStream
    from essp.dataplane.plan import plan_epoch, publish_plan
    from essp.training.params import TrainParams
    from essp.training.trainer import StreamTrainer

    params = TrainParams(arch=arch, batch_size=options.batch_size, lr=0.01, seed=options.seed, device=options.device)
    trainer = StreamTrainer(stream, num_classes=len(manifest.classes), length=options.length, params=params)
    size = options.size
    warm = plan_epoch(manifest, run=run, epoch=0, features=features, length=options.length, height=size,
                      width=size, samples=options.batch_size * 2, seed=options.seed)
    timed = plan_epoch(manifest, run=run, epoch=1, features=features, length=options.length, height=size,
                       width=size, samples=options.samples, seed=options.seed)
    with SampleStream(settings, run, stream) as source:
        publish_plan(settings, warm)
        trainer.train_epoch(source.epoch(0, len(warm.jobs), timeout_s=180), wait_s=lambda: source.stats.waited_s)
        publish_plan(settings, timed)
        stats = trainer.train_epoch(source.epoch(1, len(timed.jobs), timeout_s=180),
                                    wait_s=lambda: source.stats.waited_s)
    return {"stream": stream, "arch": arch, "device": str(trainer.device), "samples": stats.samples,
            "samples_per_s": stats.samples_per_s, "data_wait": stats.data_wait, "seconds": stats.seconds}


def bench_trainer(options: TrainerBenchOptions, *, settings: Settings | None = None, compute: bool = True,
                  streaming: bool = True, json_path: Path | None = None, write_docs: bool = False,
                  docs_path: Path = DEFAULT_DOCS, command: str | None = None) -> dict[str, Any]:
    import torch

    from essp.stack.services import isolated_settings, remove_isolated

    started = time.time()
    result: dict[str, Any] = {"machine": machine_info(), "options": options.__dict__, "rows": [],
                              "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
                              "command": command or "essp bench trainer",
                              "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if compute:
        result["rows"] += measure_compute(options, out.print)
    if streaming:
        base = settings or Settings()
        isolated = isolated_settings(base, "bt" + uuid.uuid4().hex[:8])
        with tempfile.TemporaryDirectory(prefix="essp-bench-trainer-") as scratch:
            try:
                result["rows"] += measure_streaming(isolated, options, Path(scratch), out.print)
            finally:
                remove_isolated(isolated)
    result["seconds"] = round(time.time() - started, 1)
    out.print(result_table(result))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2, default=str))
    if write_docs:
        update_docs(docs_path, render_markdown(result), name="trainer", title="Trainer")
    return result


def _rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for row in result["rows"]:
        if row["stage"] == "compute":
            rows.append(("compute", row["stream"], row["arch"], row["device"], f"{row['images_per_s']:.1f} images/s",
                         "", f"{row['ms_per_step']:.0f} ms/step, {row['precision']}, {row['threads']} thread(s)"))
        else:
            rows.append(("streaming", row["stream"], row["arch"], row["device"],
                         f"{row['samples_per_s']:.1f} samples/s", f"{100 * row['data_wait']:.1f}%",
                         f"{row['workers']} decode + {row['workers']} {row['stream']} worker(s), "
                         f"{row['samples']} samples"))
    return rows


HEADERS = ("stage", "stream", "arch", "device", "throughput", "data wait", "notes")


def result_table(result: dict[str, Any]) -> Table:
    table = Table(*HEADERS, title="essp bench trainer")
    for row in _rows(result):
        table.add_row(*row)
    return table


def render_markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    options = result["options"]
    lines = [f"Measured {result['started_at']} on {machine['cpu_model']}, {machine['cores']} cores "
             f"({machine['usable_cores']} usable), {machine['memory_gib']} GiB; GPU: {result['cuda'] or 'none'}; "
             f"{result['seconds']} s in all. Inputs {options['size']}x{options['size']}, L={options['length']} "
             f"(flow: {2 * options['length']} channels), batch {options['batch_size']}.", "",
             "```", result["command"], "```", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(result)]
    return "\n".join(lines) + "\n"


def _csv(text: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in text.split(",") if v.strip()) if text else None


@bench_app.command("trainer")
def trainer_cmd(
    quick: Annotated[bool, typer.Option("--quick", help="A smoke run of a few seconds.")] = False,
    streams: Annotated[str | None, typer.Option(help="Streams, e.g. rgb,flow.")] = None,
    archs: Annotated[str | None, typer.Option(help="Architectures for the compute figures.")] = None,
    stream_archs: Annotated[str | None, typer.Option(help="Architectures fed by the data plane.")] = None,
    size: Annotated[int | None, typer.Option(min=16)] = None,
    length: Annotated[int | None, typer.Option(min=1)] = None,
    batch_size: Annotated[int | None, typer.Option(min=2)] = None,
    workers: Annotated[str | None, typer.Option(help="Workers of each kind, e.g. 1,2.")] = None,
    samples: Annotated[int | None, typer.Option(min=2, help="Samples of each streaming epoch.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda.")] = None,
    compute: Annotated[bool, typer.Option(help="Measure the step on in-memory batches.")] = True,
    streaming: Annotated[bool, typer.Option(help="Measure the trainer fed by the data plane.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result as JSON here.")] = None,
    write_docs: Annotated[bool, typer.Option("--write-docs", help="Update docs/benchmarks.md's block.")] = False,
    docs: Annotated[Path, typer.Option(help="The benchmarks page to update.")] = DEFAULT_DOCS,
) -> None:
    """Trainer images/s per stream and architecture, and its data-wait fraction fed by 1 and 2 workers."""
    overrides = {k: v for k, v in {
        "streams": _csv(streams), "archs": _csv(archs), "stream_archs": _csv(stream_archs), "size": size,
        "length": length, "batch_size": batch_size, "samples": samples, "device": device,
        "workers": tuple(int(w) for w in _csv(workers) or ()) or None,
    }.items() if v is not None}
    try:
        options = TrainerBenchOptions.quick_run(**overrides) if quick else TrainerBenchOptions(**overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    command = "essp " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    bench_trainer(options, compute=compute, streaming=streaming, json_path=json_out, write_docs=write_docs,
                  docs_path=docs, command=command)

