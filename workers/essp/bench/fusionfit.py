"""`essp bench fusion-fit RUN`: the learned fusions of a finished run fitted on its training videos' scores (what
ESSP did before issue 14) and on its validation videos' scores (what it does now), scored on the same test
videos with the same stream models. The training videos are scored here, in this process, with the decode and
extractor code of the workers (essp.evaluation.scoring.score_local), the run's snippets per video. Printed, and
with ``--write-docs`` written into docs/results.md between the ``bench:fusion-fit`` markers.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from essp.bench.dataplane import bench_app
from essp.bench.docs import update_docs

out = Console()
RESULTS = Path("docs/results.md")


def fusion_fit(run: str, *, command: str) -> str:
    from essp.clients.s3 import ObjectStore, S3Uri
    from essp.datasets.manifest import ManifestStore
    from essp.evaluation.fusion import compare_fusions
    from essp.evaluation.scoring import manifest_videos, score_local
    from essp.lifecycle.epochs import load_run
    from essp.lifecycle.pipeline import load_stream_models, stream_scores
    from essp.stack.services import prepare_settings
    from essp.training.artifacts import RunStore

    settings = prepare_settings()
    spec, facts = load_run(settings, run)
    runs = RunStore(settings, run)
    manifest = ManifestStore(settings).load(facts["manifest_uri"])
    models = load_stream_models(settings, spec, len(facts["classes"]))
    store = ObjectStore(settings)
    videos = [(v, store.get_bytes(S3Uri.parse(v.uri).bucket, S3Uri.parse(v.uri).key))
              for v in manifest_videos(manifest, "train")]
    scored, _ = score_local(models, videos, features=spec.features(), length=spec.length, height=spec.size,
                            width=spec.size, snippets=spec.snippets)
    test = stream_scores({s: runs.load_scores("test", s) for s in spec.streams})
    fits = {"training": stream_scores(scored), "validation": stream_scores({s: runs.load_scores("val", s)
                                                                            for s in spec.streams})}
    rows = ["| fitted on | videos | learned top-1 | sequence top-1 | learned mean class acc. |",
            "|---|---|---|---|---|"]
    results: dict[str, Any] = {}
    for name, fit in fits.items():
        results[name] = compare_fusions(fit, test, weights=spec.fusion_weights, seed=spec.seed,
                                        class_names=facts["classes"])
        learned, sequence = results[name]["learned"], results[name]["sequence"]
        rows.append(f"| {name} videos | {len(fit.video_ids)} | {100 * learned['top1']:.1f}% | "
                    f"{100 * sequence['top1']:.1f}% | {100 * learned['mean_class_accuracy']:.1f}% |")
    streams = ", ".join(f"{s} {100 * results['validation'][f'stream:{s}']['top1']:.1f}%" for s in spec.streams)
    return (f"Run `{run}` ({len(test.video_ids)} test videos; the streams alone: {streams}), with `{command}`:\n\n"
            + "\n".join(rows) + "\n")


@bench_app.command("fusion-fit")
def fusion_fit_cmd(
    run: Annotated[str, typer.Argument(help="A finished run (its scores of the test and validation videos).")],
    write_docs: Annotated[bool, typer.Option("--write-docs", help="Update docs/results.md's block.")] = False,
    docs: Annotated[Path, typer.Option(help="The results page to update.")] = RESULTS,
) -> None:
    """The learned fusions of a run fitted on its training videos and on its validation videos, side by side."""
    command = "essp " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else f"essp bench fusion-fit {run}"
    block = fusion_fit(run, command=command)
    out.print(block, markup=False, highlight=False)
    if write_docs:
        update_docs(docs, block, name="fusion-fit", title="Learned fusions: fitted on training or validation videos")
