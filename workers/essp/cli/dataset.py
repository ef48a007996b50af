"""`essp dataset`: synthesise a dataset, ingest a folder, refresh it from its bucket, show a manifest."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from essp.datasets.manifest import Manifest, ManifestStore, check_name
from essp.datasets.synth import MOTIONS, SynthParamError, synthesize
from essp.datasets.validation import DEFAULT_VAL_FRACTION, MAX_VAL_FRACTION
from essp.errors import EsspError
from essp.stack.services import prepare_settings

dataset_app = typer.Typer(help="Datasets: synthesise, ingest, refresh, show manifests.", no_args_is_help=True)

VAL_HELP = ("Share of each class's training groups held out as the validation split (never a test video; "
            "a class with one training group gives none).")

out = Console()
err = Console(stderr=True)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("[dim]{task.fields[item]}"), console=err, transient=True)


def _check_name(name: str, option: str) -> str:
    try:
        return check_name(name)
    except EsspError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _summary(manifest: Manifest, uri: str, counts: dict[str, int] | None = None) -> None:
    table = Table("dataset", f"{manifest.name}@{manifest.version}", show_header=True)
    created = dt.datetime.fromtimestamp(manifest.created_at).isoformat(timespec="seconds")
    rows = [("manifest", uri), ("created", created), ("source", manifest.source),
            ("split rule", manifest.split_rule or "-"), ("classes", str(len(manifest.classes))),
            ("videos", str(len(manifest.videos)))]
    # train, val, test, others
    splits = sorted(manifest.splits, key=lambda s: (s != "train", s != "val", s != "test", s))
    rows += [(f"  {name}", str(len(manifest.splits[name]))) for name in splits]
    unsplit = len(manifest.videos) - sum(len(ids) for ids in manifest.splits.values())
    if unsplit:
        rows.append(("  in no split", str(unsplit)))
    rows.append(("quarantined", str(len(manifest.quarantined))))
    if counts:
        rows.append(("uploads", f"{counts.get('uploaded', 0)} uploaded, {counts.get('unchanged', 0)} already there"))
    for row in rows:
        table.add_row(*row)
    out.print(table)

    per_class = Table("label", "class", *splits, title="videos per class")
    counted = {name: {label: len(v) for label, v in manifest.by_class(name).items()} for name in splits}
    for label, class_name in enumerate(manifest.classes):
        per_class.add_row(str(label), class_name, *(str(counted[s].get(label, 0)) for s in splits))
    out.print(per_class)

    if manifest.quarantined:
        bad = Table("stage", "video", "reason", title="quarantined", title_style="bold red")
        bad.columns[1].overflow = "fold"
        for entry in manifest.quarantined:
            bad.add_row(entry.stage, entry.path, entry.reason)
        out.print(bad)


def _ingest(directory: Path, name: str, split: int, prefix: str | None, workers: int | None,
            val_fraction: float = DEFAULT_VAL_FRACTION) -> None:
    from essp.datasets.ingest import ingest_directory

    settings = prepare_settings()
    counts: dict[str, int] = {}
    with _progress() as progress:
        task = progress.add_task(f"ingest {directory}", total=None, item="")

        def advance(done: int, total: int, path: str) -> None:
            progress.update(task, completed=done, total=total, item=path)

        manifest, uri = ingest_directory(settings, directory, name, split=split, prefix=prefix, progress=advance,
                                         workers=workers, counts=counts, val_fraction=val_fraction)
    _summary(manifest, uri, counts)
    out.print(f"manifest: {uri}")


@dataset_app.command("synth")
def synth_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the dataset to (UCF-101 layout).",
                                          file_okay=False)],
    classes: Annotated[int, typer.Option(min=2, max=len(MOTIONS),
                                         help=f"Number of motion classes, the first N of: {', '.join(MOTIONS)}.")] = 6,
    videos_per_class: Annotated[int, typer.Option(min=2, help="Videos per class.")] = 10,
    frames: Annotated[int, typer.Option(min=2, help="Frames per video.")] = 48,
    height: Annotated[int, typer.Option(min=16, help="Frame height (even).")] = 112,
    width: Annotated[int, typer.Option(min=16, help="Frame width (even).")] = 112,
    fps: Annotated[int, typer.Option(min=1, help="Frame rate.")] = 25,
    keyint: Annotated[int, typer.Option(min=1, help="Keyframe interval in frames (fixed).")] = 12,
    seed: Annotated[int, typer.Option(help="Same seed, same videos.")] = 0,
    ingest: Annotated[bool, typer.Option("--ingest/--no-ingest", help="Ingest it into S3 afterwards.")] = False,
    name: Annotated[str, typer.Option(help="Manifest name when ingesting.")] = "synth",
    val_fraction: Annotated[float, typer.Option(min=0.01, max=MAX_VAL_FRACTION, help=VAL_HELP)] = DEFAULT_VAL_FRACTION,
) -> None:
    """Write a synthetic dataset whose classes differ by motion; optionally ingest it."""
    if ingest:
        _check_name(name, "--name")
    with _progress() as progress:
        task = progress.add_task(f"synthesise {out_dir}", total=classes * videos_per_class, item="")
        try:
            result = synthesize(out_dir, classes=classes, videos_per_class=videos_per_class, frames=frames,
                                height=height, width=width, fps=fps, keyint=keyint, seed=seed,
                                progress=lambda done, total: progress.update(task, completed=done))
        except SynthParamError as exc:
            raise typer.BadParameter(exc.message, param_hint=f"--{exc.param.replace('_', '-')}") from None
    out.print(f"wrote {result.videos} videos of {len(result.classes)} classes to {result.out_dir} "
              f"(train {len(result.train)}, test {len(result.test)}): {', '.join(result.classes)}")
    if ingest:
        _ingest(result.out_dir, name, 1, None, None, val_fraction)


@dataset_app.command("ingest")
def ingest_cmd(
    directory: Annotated[Path, typer.Argument(help="Folder in UCF-101 layout: <Class>/<video>, optional "
                                              "classInd.txt, trainlist0N.txt, testlist0N.txt.",
                                              exists=True, file_okay=False, dir_okay=True)],
    name: Annotated[str | None, typer.Option(help="Dataset (manifest) name; default: the folder's name.")] = None,
    split: Annotated[int, typer.Option(min=1, max=3, help="Which of UCF-101's three splits.")] = 1,
    prefix: Annotated[str | None, typer.Option(help="Key prefix of the videos in the bucket; default: the name.")]
    = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Files probed and uploaded at once.")] = None,
    val_fraction: Annotated[float, typer.Option(min=0.01, max=MAX_VAL_FRACTION, help=VAL_HELP)] = DEFAULT_VAL_FRACTION,
) -> None:
    """Upload and probe every video, quarantine the bad ones, write a new manifest version (train / val / test)."""
    name = _check_name(name or directory.resolve().name, "--name")
    if prefix is not None and not prefix.strip("/"):
        raise typer.BadParameter("must not be empty", param_hint="--prefix")
    _ingest(directory, name, split, prefix, workers, val_fraction)


@dataset_app.command("show")
def show_cmd(
    ref: Annotated[str, typer.Argument(help="Dataset name (latest version), NAME@N, or the s3:// URI of a manifest.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest itself as JSON.")] = False,
) -> None:
    """Summarise a manifest: classes, splits, quarantined videos and versions."""
    manifests = ManifestStore(prepare_settings())
    uri = manifests.resolve(ref)
    manifest = manifests.load(uri)
    if as_json:
        out.print_json(json.dumps(manifest.model_dump(mode="json")))
        return
    _summary(manifest, uri)
    versions = manifests.versions(manifest.name) if not ref.startswith("s3://") else []
    if versions:
        out.print(f"versions of {manifest.name}: {', '.join(map(str, versions))}")


@dataset_app.command("refresh")
def refresh_cmd(
    ref: Annotated[str, typer.Argument(help="Dataset name (latest version), NAME@N, or the s3:// URI of a manifest.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list the changes; write nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the changes and the new manifest's URI as JSON.")]
    = False,
    workers: Annotated[int | None, typer.Option(min=1, help="Videos compared and probed at once.")] = None,
) -> None:
    """Find videos added, changed or removed in the bucket since a manifest and write the next version."""
    from essp.datasets.refresh import find_changes, refresh_manifest

    def say(line: str) -> None:
        if not as_json:
            out.print(line, markup=False, highlight=False, soft_wrap=True)

    settings = prepare_settings()
    uri: str | None = None
    if dry_run:
        changes = find_changes(settings, ref)
        for label, uris in (("added", changes.added), ("changed", changes.changed), ("removed", changes.removed)):
            for item in uris:
                test = " (in the TEST split: the test split would shrink)" if item in changes.removed_test else ""
                say(f"{label:<8} {item}{test}")
    else:
        _, uri, changes = refresh_manifest(settings, ref, log=say, workers=workers)
    counts = (f"{len(changes.added)} added, {len(changes.changed)} changed, {len(changes.removed)} removed, "
              f"{changes.unchanged} unchanged")
    if as_json:
        out.print_json(json.dumps({**changes.as_dict(), "manifest": uri, "dry_run": dry_run}))
    elif dry_run:
        say(f"dry run against {changes.base}: {counts}; nothing written")
    elif uri is None:
        say(f"no changes since {changes.base} ({counts}); nothing written")
    else:
        say(f"{counts}, {len(changes.quarantined)} quarantined")
        say(f"manifest: {uri}")
