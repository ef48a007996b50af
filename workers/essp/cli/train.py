"""`essp worker train`, `essp train` and `essp predict`."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from essp.cli.dataplane import Verbose, WorkerId, _logging, exit_served, supervise, worker_app
from essp.cli.options import given_values, with_model_options
from essp.lifecycle.params import RunParams, parse_params
from essp.settings import Settings

out = Console()
err = Console(stderr=True)


@worker_app.command("train")
def train_worker_cmd(run: Annotated[str, typer.Option(help="The run (its spec.json in S3 says the rest).")],
                     stream: Annotated[str, typer.Option(help="The stream this trainer trains: rgb, flow, ...")],
                     worker_id: WorkerId = None, verbose: Verbose = False,
                     threads: Annotated[int, typer.Option(min=1, help="torch CPU threads.")] = 1,
                     nproc: Annotated[int, typer.Option(min=1, help="DDP processes (one per GPU).")] = 1,
                     backend: Annotated[str, typer.Option(help="DDP backend: auto (nccl with CUDA, else gloo), "
                                                               "nccl, gloo.")] = "auto") -> None:
    """Resident trainer of one stream of one run: trains each epoch the master asks for, checkpoints
    to S3, resumes from the latest checkpoint when restarted. With --nproc N (or under torchrun) it
    trains with DistributedDataParallel, one process per GPU."""
    if backend not in ("auto", "nccl", "gloo"):
        raise typer.BadParameter(f"--backend {backend!r}: use auto, nccl or gloo")
    if nproc > 1:
        _spawn_ranks(["worker", "train", "--run", run, "--stream", stream, "--threads", str(threads),
                      "--backend", backend, *(["--verbose"] if verbose else [])], nproc, worker_id or f"train-{stream}")
        return
    import torch

    from essp.dataplane.resident import limit_threads
    from essp.lifecycle.pipeline import train_spec
    from essp.training.resident import TrainWorker

    limit_threads()
    torch.set_num_threads(threads)
    _logging(verbose)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        import torch.distributed as dist

        chosen = backend if backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(chosen, init_method="env://")
    try:
        settings = Settings()
        state = TrainWorker(settings, train_spec(settings, run, stream), worker_id=worker_id).serve()
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    err.print(f"trainer {stream} of {run} stopped: {json.dumps(state)}")
    exit_served()


def _spawn_ranks(argv: list[str], nproc: int, name: str) -> None:
    """torchrun's job for one machine: N rank processes with RANK/WORLD_SIZE/MASTER_* set;
    SIGTERM/SIGINT reach them all."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    supervise([([*argv, "--worker-id", name], {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
                                                  "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                                                  "MASTER_PORT": str(port)})
               for rank in range(nproc)])


@with_model_options(RunParams, aliases={"dataset": ["--manifest"]})
def train_cmd(
    params: Annotated[str, typer.Option("--params", help="Run params as one JSON object (the options below "
                                                         "win over it).")] = "{}",
    all_splits: Annotated[bool, typer.Option("--all-splits", help="Train each of the dataset's three UCF splits "
                                                                 "(runs <run>-s1..s3) and report their mean.")] = False,
    **options: Any,
) -> None:
    """Train the run's streams through the data plane on the local stack, score, fuse, report, register.
    The options are essp_train's params (essp.lifecycle.params.RunParams); --run defaults to train-<time>,
    and an existing run resumes."""
    from essp.lifecycle.pipeline import run_training

    try:
        values = json.loads(params)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--params is not JSON: {exc}") from None
    if not isinstance(values, dict):
        raise typer.BadParameter("--params must be a JSON object")
    values = {**values, **given_values(RunParams, options)}
    values["run"] = values.get("run") or f"train-{int(time.time())}"
    spec = parse_params(values)
    if all_splits:
        from essp.lifecycle.protocol import train_splits

        report = train_splits(Settings(), spec, log=out.print)
        out.print_json(json.dumps({"mean": report["mean"], "splits": {n: r["metrics"]
                                                                      for n, r in report["splits"].items()}}))
        return
    outcome = run_training(Settings(), spec, log=out.print)
    out.print_json(json.dumps({k: outcome[k] for k in ("selected", "metrics", "registry", "timings", "report")},
                              default=str))


def predict_cmd(
    videos: Annotated[list[str], typer.Argument(help="Video files, folders of videos, or s3:// URIs.")],
    registry: Annotated[str | None, typer.Option(help="Model registry (default: the only one with a production "
                                                       "model; a run registers under its dataset's name).")] = None,
    version: Annotated[int | None, typer.Option(help="Model version (default: production).")] = None,
    fusion: Annotated[str | None, typer.Option(help="Override the registered fusion (fixed strategies).")] = None,
    top: Annotated[int, typer.Option(min=1, help="Classes printed per video.")] = 3,
    snippets: Annotated[int | None, typer.Option(min=1, help="Snippets per video (default: the run's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Score videos with the production models and fusion; print the top classes with scores. Each video that
    cannot be read, probed or decoded is reported with the reason, the others are scored; the exit code is 2
    when any failed."""
    from essp.lifecycle.predict import PredictionError, predict_videos, read_videos

    settings = Settings()
    try:
        sources = read_videos(settings, videos)
    except PredictionError as exc:
        raise typer.BadParameter(str(exc), param_hint="VIDEOS") from None
    result = predict_videos(settings, sources, registry=registry, version=version, fusion=fusion, top=top,
                            snippets=snippets)
    failed = [item for item in result["videos"] if "error" in item]
    if as_json:
        out.print_json(json.dumps(result))
    else:
        out.print(f"model {result['registry']} v{result['version']} (run {result['run']}), fusion {result['fusion']}")
        for item in result["videos"]:
            if "error" in item:
                out.print(f"[red]{escape(item['error'])}[/red]")  # the error names the video
                continue
            ranked = ", ".join(f"{c['class']} {c['score']:.3f}" for c in item["top"])
            out.print(f"{escape(item['video'])}: {ranked}")
        if failed:
            out.print(f"{len(failed)} of {len(result['videos'])} videos failed")
    if failed:
        sys.exit(2)
