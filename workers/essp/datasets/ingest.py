"""Ingest a folder in UCF-101's layout into S3 and write its manifest.

    <root>/<Class>/<video>.avi|.mp4|...       class folders of videos
    <root>/classInd.txt                        optional: "1 ClassName" per line (1-based)
    <root>/trainlist0N.txt, testlist0N.txt     optional, also in <root>/ucfTrainTestlist/:
                                               "Class/v_..._g08_c01.avi 1" / "Class/v_..._g01_c01.avi"

Every video is read, probed on its bytes and uploaded to ``s3://<bucket_videos>/<prefix>/<Class>/<file>``
(skipped when the same bytes are already there). A file that cannot be probed (corrupt, truncated,
zero-byte, not a video) or that a split list names but the disk lacks is quarantined with its reason;
one bad file never stops an ingest.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from essp.clients.s3 import ObjectNotFound, ObjectStore, S3Uri
from essp.datasets.manifest import Manifest, ManifestStore, ManifestVideo, QuarantinedVideo, check_name
from essp.datasets.validation import DEFAULT_VAL_FRACTION, carve_validation, check_fraction
from essp.datasets.video import VideoError, VideoInfo, probe_video
from essp.errors import EsspError
from essp.settings import Settings

VIDEO_EXTENSIONS = frozenset({".avi", ".mp4", ".m4v", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".flv", ".wmv",
                              ".3gp", ".ogv", ".ts"})
SPLIT_LIST_DIRS = (".", "ucfTrainTestlist")
# UCF-101's three official splits hold out groups 1-7, 8-14 and 15-21 as the test set.
UCF_TEST_GROUPS = {1: range(1, 8), 2: range(8, 15), 3: range(15, 22)}
HASH_TEST_FRACTION = 0.3
# A video is read whole into memory (to hash, probe and upload it), as a decode worker later fetches it: a larger
# file is quarantined unread.
MAX_VIDEO_BYTES = 4 * 2**30
_GROUP = re.compile(r"_g(\d+)_", re.IGNORECASE)

Progress = Callable[[int, int, str], None]


@dataclass
class _File:
    rel: str  # "Class/file.avi", as on disk
    class_name: str  # the canonical class name (classInd's spelling)
    path: Path


def _find(root: Path, filename: str) -> Path | None:
    for folder in SPLIT_LIST_DIRS:
        candidate = root / folder / filename
        if candidate.is_file():
            return candidate
    return None


def _lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as exc:
        raise EsspError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_class_index(path: Path) -> list[str]:
    """Class names of a classInd.txt ("1 ClassName" lines), ordered by their 1-based index."""
    entries: dict[int, str] = {}
    for n, line in _lines(path):
        index, _, name = line.partition(" ")
        if not index.isdigit() or not name.strip():
            raise EsspError(f"{path} line {n}: expected '<index> <ClassName>', got {line!r}")
        if int(index) in entries:
            raise EsspError(f"{path} line {n}: index {index} given twice")
        entries[int(index)] = name.strip()
    if sorted(entries) != list(range(1, len(entries) + 1)):
        raise EsspError(f"{path}: indexes must run 1..{len(entries)} without gaps, got {sorted(entries)}")
    return [entries[i] for i in sorted(entries)]


def _norm(rel: str) -> str:
    """Split-list paths compare case-insensitively: UCF-101's own lists spell some names differently
    from its folders (HandStandPushups / HandstandPushups)."""
    rel = rel.replace("\\", "/")
    while rel.startswith("./"):
        rel = rel[2:]
    return rel.lstrip("/").lower()


def _video_files(root: Path, classes: list[str] | None) -> tuple[list[str], list[_File], list[QuarantinedVideo]]:
    """(classes, video files in class folders, files quarantined because they have no class or are links
    out of the dataset's root: a symlink may point anywhere on the machine, and ingest uploads what it reads)."""
    real_root = root.resolve()
    outside: list[QuarantinedVideo] = []

    def inside(path: Path, rel: str) -> bool:
        target = path.resolve()
        if target.is_relative_to(real_root):
            return True
        outside.append(QuarantinedVideo(uri=path.absolute().as_uri(), path=rel, stage="ingest",
                                        reason=f"a link to {target}, outside the dataset's root {real_root}: "
                                               "not followed"))
        return False

    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                     and d.name not in SPLIT_LIST_DIRS and inside(d, f"{d.name}/"))

    def videos(folder: Path, files_only: bool = False) -> list[Path]:
        """Entries named like videos: a folder, FIFO or broken link among them is quarantined, not skipped."""
        return sorted(f for f in folder.iterdir() if f.suffix.lower() in VIDEO_EXTENSIONS and not f.name.startswith(".")
                      and (f.is_file() or not files_only))

    if classes is None:
        classes = [d.name for d in folders if videos(d, files_only=True)]
    canonical = {c.lower(): c for c in classes}
    files: list[_File] = []
    orphans: list[QuarantinedVideo] = []
    for folder in folders:
        class_name = canonical.get(folder.name.lower())
        for path in videos(folder):
            rel = f"{folder.name}/{path.name}"
            if not inside(path, rel):
                continue
            if class_name is None:
                orphans.append(QuarantinedVideo(uri=path.resolve().as_uri(), path=rel, stage="ingest",
                                                reason=f"class folder {folder.name!r} is not in classInd.txt"))
            else:
                files.append(_File(rel, class_name, path))
    for path in videos(root, files_only=True):  # a folder named like a video there is a class folder
        if inside(path, path.name):
            orphans.append(QuarantinedVideo(uri=path.resolve().as_uri(), path=path.name, stage="ingest",
                                            reason="not in a class folder (expected <root>/<Class>/<video>)"))
    return classes, files, orphans + outside


def _split_lists(root: Path, split: int, classes: list[str], files: list[_File],
                 ) -> tuple[dict[str, str], list[QuarantinedVideo], str] | None:
    """Splits from trainlist0N/testlist0N: (rel -> split, quarantined, rule), or None without lists."""
    names = (f"trainlist{split:02d}.txt", f"testlist{split:02d}.txt")
    found = [_find(root, n) for n in names]
    if found == [None, None]:
        return None
    if None in found:
        have, lack = (names[0], names[1]) if found[0] else (names[1], names[0])
        raise EsspError(f"dataset folder {root}: found {have} but not {lack}; give both or neither")
    on_disk = {_norm(f.rel): f for f in files}
    labels = {c.lower(): i for i, c in enumerate(classes, 1)}
    assigned: dict[str, str] = {}
    quarantined: list[QuarantinedVideo] = []
    for split_name, list_path in zip(("train", "test"), found, strict=True):
        assert list_path is not None
        for n, line in _lines(list_path):
            rel, _, label = line.partition(" ")
            key = _norm(rel)
            class_folder = key.split("/")[0]
            where = f"{list_path.name} line {n}"
            file = on_disk.get(key)
            if file is None:
                quarantined.append(QuarantinedVideo(
                    uri=(root / rel).resolve().as_uri(), path=rel, stage="ingest",
                    class_name=next((c for c in classes if c.lower() == class_folder), None),
                    reason=f"listed in {list_path.name} but missing"))
                continue
            if label.strip() and (not label.strip().isdigit() or int(label) != labels[file.class_name.lower()]):
                quarantined.append(QuarantinedVideo(
                    uri=file.path.resolve().as_uri(), path=file.rel, class_name=file.class_name, stage="ingest",
                    reason=f"label {label.strip()!r} in {where} disagrees with classInd.txt "
                           f"({file.class_name} is {labels[file.class_name.lower()]})"))
                assigned[file.rel] = "bad"
                continue
            if assigned.get(file.rel, split_name) != split_name:
                assigned[file.rel] = "bad"
                quarantined.append(QuarantinedVideo(
                    uri=file.path.resolve().as_uri(), path=file.rel, class_name=file.class_name, stage="ingest",
                    reason=f"listed in both {names[0]} and {names[1]}"))
                continue
            assigned.setdefault(file.rel, split_name)
    return assigned, quarantined, f"split lists {names[0]} / {names[1]}"


def _stable_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _hold_out(units: list[str], salt: str) -> set[str]:
    """A deterministic ~30% of `units` (at least one, never all when there are two or more)."""
    if len(units) < 2:
        return set()
    ranked = sorted(units, key=lambda u: _stable_hash(f"{salt}:{u}"))
    return set(ranked[:min(max(round(len(units) * HASH_TEST_FRACTION), 1), len(units) - 1)])


def _split_by_rule(split: int, files: list[_File]) -> tuple[dict[str, str], str]:
    """Without split lists: by UCF group where the official rule gives a class both splits, else a
    seeded hash over groups (clips of one group stay together) or over file names."""
    by_class: dict[str, list[_File]] = {}
    for file in files:
        by_class.setdefault(file.class_name, []).append(file)
    assigned: dict[str, str] = {}
    rules: set[str] = set()
    for class_name, members in by_class.items():
        groups = {f.rel: int(m.group(1)) for f in members if (m := _GROUP.search(f.path.name))}
        grouped = [f for f in members if f.rel in groups]
        loose = [f for f in members if f.rel not in groups]
        if grouped:
            official = {f.rel: groups[f.rel] in UCF_TEST_GROUPS[split] for f in grouped}
            distinct = sorted({str(g) for g in groups.values()})
            if len(set(official.values())) == 2:
                rules.add(f"UCF groups (split {split}: groups {UCF_TEST_GROUPS[split].start}-"
                          f"{UCF_TEST_GROUPS[split].stop - 1} test)")
                assigned.update({rel: "test" if test else "train" for rel, test in official.items()})
            elif len(distinct) >= 2:
                rules.add(f"hash of group ids ({HASH_TEST_FRACTION:.0%} of groups test)")
                held = _hold_out(distinct, f"{split}:{class_name}")
                assigned.update({f.rel: "test" if str(groups[f.rel]) in held else "train" for f in grouped})
            else:
                loose += grouped
        if loose:
            rules.add(f"hash of file names ({HASH_TEST_FRACTION:.0%} test)")
            held = _hold_out([f.rel for f in loose], str(split))
            assigned.update({f.rel: "test" if f.rel in held else "train" for f in loose})
    return assigned, "; ".join(sorted(rules)) or "none (no videos)"


def _other_splits(root: Path, split: int, classes: list[str], files: list[_File], lists: bool,
                  ) -> dict[int, dict[str, str]]:
    """UCF-101's other splits, as the asked one is decided: by their own split lists (a split whose lists are
    missing is left out; their problems are the asked split's to report), else by the same rule."""
    out: dict[int, dict[str, str]] = {}
    for other in UCF_TEST_GROUPS:
        if other == split:
            continue
        if lists:
            try:
                found = _split_lists(root, other, classes, files)
            except EsspError:
                found = None
            if found is not None:
                out[other] = {rel: where for rel, where in found[0].items() if where != "bad"}
        else:
            out[other] = _split_by_rule(other, files)[0]
    return out


def _protocol(split: int, others: dict[int, dict[str, str]], ids_of: dict[str, str], manifest: Manifest,
              val_fraction: float, latest: Manifest | None) -> dict[str, dict[str, list[str]]]:
    """Every split ingest found, each with its validation split carved (the asked one is `manifest.splits`)."""
    protocol = {str(split): {k: list(v) for k, v in manifest.splits.items()}}
    known = set(manifest.splits.get("train", [])) | set(manifest.splits.get("val", [])) | set(
        manifest.splits.get("test", []))
    for other, assigned in sorted(others.items()):
        splits = {s: sorted(ids_of[rel] for rel, where in assigned.items() if where == s and ids_of.get(rel) in known)
                  for s in ("train", "test")}
        view = manifest.model_copy(update={"splits": splits, "val_fraction": None, "val_by_clip": []})
        previous = latest.for_split(other) if latest is not None and str(other) in latest.protocol else None
        protocol[str(other)] = carve_validation(view, val_fraction, previous=previous).splits
    return dict(sorted(protocol.items()))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _upload(store: ObjectStore, bucket: str, key: str, data: bytes, digest: str) -> tuple[bool, str]:
    """Upload unless the object already holds these bytes (same size and sha256): (uploaded, the object's ETag)."""
    try:
        stat = store.stat(bucket, key)
    except ObjectNotFound:
        stat = None
    if stat is not None and stat.size == len(data) and stat.metadata.get("sha256") == digest:
        return False, stat.etag
    content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    etag = store.put_object(bucket, key, data, content_type=content_type, metadata={"sha256": digest})
    return True, etag or store.stat(bucket, key).etag


def video_id(rel: str) -> str:
    """A video's id in a manifest: its path under the dataset's root or prefix without the extension
    ("Class/v_Class_g01_c01.avi" -> "Class/v_Class_g01_c01")."""
    return rel.rsplit(".", 1)[0]


def manifest_video(rel: str, uri: str, class_name: str, label: int, info: VideoInfo, digest: str,
                   etag: str | None) -> ManifestVideo:
    """The manifest entry of a video that probed fine (`rel`: "Class/file" under the root or prefix)."""
    return ManifestVideo(id=video_id(rel), uri=uri, class_name=class_name, label=label, frames=info.frames,
                         fps=info.fps, width=info.width, height=info.height, codec=info.codec,
                         keyframe_interval=info.keyframe_interval, size_bytes=info.size_bytes, sha256=digest,
                         etag=etag)


def _ingest_file(store: ObjectStore, bucket: str, prefix: str, file: _File, label: int,
                 ) -> tuple[ManifestVideo | QuarantinedVideo, bool]:
    """Probe one file and upload it: (its manifest entry or quarantine entry, whether it was uploaded)."""
    def bad(reason: str) -> tuple[QuarantinedVideo, bool]:
        return QuarantinedVideo(uri=file.path.resolve().as_uri(), path=file.rel, reason=reason,
                                class_name=file.class_name, stage="ingest"), False

    if not file.path.is_file():
        return bad(f"not a regular file ({_kind(file.path)}): not read")
    try:
        size = file.path.stat().st_size
        if size > MAX_VIDEO_BYTES:
            return bad(f"{size / 2**30:.1f} GiB, larger than ESSP ingests ({MAX_VIDEO_BYTES / 2**30:.0f} GiB, read "
                       "whole into memory): not read")
        data = file.path.read_bytes()
    except OSError as exc:
        return bad(f"cannot read: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - one file's surprise must not end the ingest
        return bad(f"cannot read: {type(exc).__name__}: {exc}")
    try:
        info = probe_video(data, file.rel)
    except VideoError as exc:
        return bad(exc.reason)
    except Exception as exc:  # noqa: BLE001 - one file's surprise (a decoder's own error) must not end the ingest
        return bad(f"probe failed: {type(exc).__name__}: {exc}")
    digest = _sha256(data)
    key = f"{prefix}/{file.rel}"
    uploaded, etag = _upload(store, bucket, key, data, digest)
    return manifest_video(file.rel, str(S3Uri(bucket, key)), file.class_name, label, info, digest, etag), uploaded


def _kind(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return f"a broken link to {os.readlink(path)}"
    if path.is_dir():
        return "a directory"
    if path.is_fifo():
        return "a FIFO"
    if path.is_socket():
        return "a socket"
    if path.is_block_device() or path.is_char_device():
        return "a device"
    return "missing" if not path.exists() else "not a file"


def ingest_directory(settings: Settings, root: Path, name: str, *, split: int = 1, prefix: str | None = None,
                     progress: Progress | None = None, workers: int | None = None,
                     counts: dict[str, int] | None = None,
                     val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[Manifest, str]:
    """Ingest `root` (UCF-101 layout) as dataset `name`: upload, probe, split (train / val / test: the
    validation split is `val_fraction` of each class's training groups, essp.datasets.validation), write
    the manifest.

    Returns the manifest and its URI. Re-ingesting unchanged files uploads nothing, and when the
    result equals the latest manifest no new version is written: the latest one is returned. A video
    the latest version quarantined at decode stays quarantined while its bytes are unchanged.
    `progress(done, total, path)` is called after each file; `counts`, when given, receives
    uploaded / unchanged / quarantined / unsplit.
    """
    root = Path(root)
    if not root.is_dir():
        raise EsspError(f"dataset folder {root}: not a directory")
    check_name(name)
    if split not in UCF_TEST_GROUPS:
        raise EsspError(f"split {split}: must be 1, 2 or 3 (UCF-101's three train/test splits)")
    check_fraction(val_fraction)
    prefix = (prefix or name).strip("/")
    if not prefix:
        raise EsspError("prefix: must not be empty")

    class_index = _find(root, "classInd.txt")
    classes, files, quarantined = _video_files(root, read_class_index(class_index) if class_index else None)
    if not classes:
        raise EsspError(f"dataset folder {root}: no class folders with videos (expected <root>/<Class>/<video>.avi, "
                        f"extensions {', '.join(sorted(VIDEO_EXTENSIONS))})")
    listed = _split_lists(root, split, classes, files)
    assigned_by_split = _other_splits(root, split, classes, files, listed is not None)
    if listed is None:
        assigned, split_rule = _split_by_rule(split, files)
    else:
        assigned, list_problems, split_rule = listed
        quarantined += list_problems
        files = [f for f in files if assigned.get(f.rel) != "bad"]

    labels = {c: i for i, c in enumerate(classes)}
    store = ObjectStore(settings)
    bucket = settings.bucket_videos
    store.ensure_bucket(bucket)
    manifests = ManifestStore(settings)
    latest_uri = manifests.resolve(name) if manifests.latest_version(name) else None
    latest = manifests.load(latest_uri) if latest_uri else None
    # Decode found these broken although they probe fine: keep them out until their bytes change.
    decode_failed = {q.uri: q for q in latest.quarantined if q.stage == "decode"} if latest else {}
    results: list[tuple[_File, ManifestVideo]] = []
    tally = {"uploaded": 0, "unchanged": 0}
    total = len(files)
    # Threads: uploads wait on the network and PyAV releases the GIL while it demuxes and decodes.
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        futures = {pool.submit(_ingest_file, store, bucket, prefix, f, labels[f.class_name]): f for f in files}
        for done, future in enumerate(as_completed(futures), 1):
            file = futures[future]
            entry, uploaded = future.result()
            if isinstance(entry, ManifestVideo):
                tally["uploaded" if uploaded else "unchanged"] += 1
                if entry.uri in decode_failed and not uploaded:
                    quarantined.append(decode_failed[entry.uri])
                else:
                    results.append((file, entry))
            else:
                quarantined.append(entry)
            if progress:
                progress(done, total, file.rel)

    videos: dict[str, ManifestVideo] = {}
    split_of: dict[str, str | None] = {}
    for file, video in sorted(results, key=lambda r: r[0].rel):
        if video.id in videos:  # the same name with another extension: the id would be ambiguous
            quarantined.append(QuarantinedVideo(uri=video.uri, path=file.rel, class_name=video.class_name,
                                                stage="ingest", reason=f"duplicate id {video.id} "
                                                                       f"(also {videos[video.id].uri})"))
            continue
        videos[video.id] = video
        split_of[video.id] = assigned.get(file.rel)
    splits = {s: sorted(i for i, where in split_of.items() if where == s) for s in ("train", "test")}
    ids_of = {file.rel: video.id for file, video in results if videos.get(video.id) is video}
    manifest = Manifest(name=name, source=str(root.resolve()), prefix=prefix, split_rule=split_rule,
                        classes=classes, videos=sorted(videos.values(), key=lambda v: v.id),
                        quarantined=sorted(quarantined, key=lambda q: q.path), splits=splits)
    # the latest version's validation videos stay validation videos (essp.datasets.validation)
    manifest = carve_validation(manifest, val_fraction, previous=latest)
    protocol = _protocol(split, assigned_by_split, ids_of, manifest, val_fraction, latest)
    manifest = manifest.model_copy(update={"protocol": protocol, "ucf_split": split})
    if counts is not None:
        counts.update(tally, quarantined=len(manifest.quarantined),
                      unsplit=len(videos) - sum(len(ids) for ids in splits.values()))

    if latest and latest_uri and latest.same_content(manifest):
        return latest, latest_uri
    uri = manifests.save(manifest)
    return manifests.load(uri), uri
