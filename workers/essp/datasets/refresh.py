"""Refresh a dataset from its bucket: find the videos added, changed or removed under the dataset's
prefix since a manifest, and write the manifest's next version (what the nightly retraining runs
before it trains).

The bucket holds the dataset as ingest left it, ``s3://<bucket>/<prefix>/<Class>/<file>``; people (or
pipelines) add videos there, overwrite some, delete others. :func:`find_changes` lists the prefix and
compares every video object (``essp.datasets.ingest.VIDEO_EXTENSIONS``) with what the manifest recorded, videos
and quarantined entries alike: by ETag and size; where a manifest recorded no ETag (written before it
did), by size and then SHA-256 (the ``sha256`` metadata ingest sets, else a hash of the bytes); where
it recorded neither (a video quarantined at decode by an older version), by whether the object was
written after it was set aside. :func:`refresh_manifest` probes what was added or changed, as ingest
does, and saves the next version:

- new videos go to the **train** split, or to **val** when their group is held out for validation
  (:mod:`essp.datasets.validation`; a manifest from before validation splits gets one, even with no video
  changed); the test split is fixed so that models stay comparable: nothing is ever added to it or moved
  into it;
- a changed video keeps its id and split and gets its new probe facts;
- a video that does not probe, one in a folder that is not one of the manifest's classes, or one not in
  a class folder, is quarantined with the reason (with its ETag, so that it is not reported again until
  it changes);
- a video gone from the bucket leaves the manifest; a test video that goes shrinks the test split, which
  the changes say (``removed_test``).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any

from essp.clients.s3 import ObjectInfo, ObjectNotFound, ObjectStore, S3Uri
from essp.datasets.ingest import VIDEO_EXTENSIONS, _sha256, manifest_video
from essp.datasets.manifest import Manifest, ManifestStore, ManifestVideo, QuarantinedVideo
from essp.datasets.validation import DEFAULT_VAL_FRACTION, carve_validation, needs_carving
from essp.datasets.video import VideoError, probe_video
from essp.errors import EsspError
from essp.settings import Settings

REFRESH_RULE = "videos added by `essp dataset refresh`: train"

Log = Callable[[str], None]


class RefreshError(EsspError):
    """A dataset cannot be refreshed: the message names the manifest or the bucket and the cause."""


@dataclass
class Changes:
    """What differs between a manifest and the videos bucket under the manifest's prefix.

    Every entry is an ``s3://`` URI of a video object. ``bool(changes)`` is true when anything was
    added, changed **or removed**: a removal alone also makes a new manifest version, since a video
    gone from the bucket must leave the manifest (a training video simply goes; a test video goes as
    well, because the planner cannot decode it, and is listed in ``removed_test`` as well, so that the
    shrinking of the fixed test split is never silent).
    """

    added: list[str] = field(default_factory=list)  # objects the manifest does not know
    changed: list[str] = field(default_factory=list)  # videos or quarantined objects whose ETag or size differ
    removed: list[str] = field(default_factory=list)  # in the manifest (videos or quarantined), gone from the bucket
    base: str = ""  # URI of the manifest compared against
    # Test videos that leave the test split: gone from the bucket (in `removed` too) or, after
    # refresh_manifest, changed into something that no longer probes (quarantined).
    removed_test: list[str] = field(default_factory=list)
    # refresh_manifest: added or changed objects it set aside, URI -> reason.
    quarantined: dict[str, str] = field(default_factory=dict)
    unchanged: int = 0  # objects as the manifest recorded them

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "has_changes": bool(self)}


@dataclass
class _Known:
    """What a manifest recorded about one object: a video or a quarantined entry."""

    video: ManifestVideo | None = None
    quarantined: QuarantinedVideo | None = None

    def facts(self) -> tuple[str | None, int | None, str | None]:
        entry = self.video or self.quarantined
        assert entry is not None
        return entry.etag, entry.size_bytes, entry.sha256


@dataclass
class _Scan:
    manifest: Manifest
    uri: str
    bucket: str
    prefix: str  # "" or "name/": what the listing used
    objects: dict[str, ObjectInfo]  # URI -> listing entry, video extensions only
    known: dict[str, _Known]  # URI -> manifest entry, for objects under the prefix
    changes: Changes


def _pool(workers: int | None) -> ThreadPoolExecutor:
    # Threads: S3 waits on the network and PyAV releases the GIL while it demuxes and decodes.
    return ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1))


def _location(settings: Settings, manifest: Manifest) -> tuple[str, str]:
    """(bucket, key prefix) of the dataset's videos: the manifest's prefix when it records one, else
    the one its videos' URIs share (``<prefix>/<Class>/<file>``), else the dataset's name."""
    buckets: Counter[str] = Counter()
    prefixes: Counter[str] = Counter()
    for video in manifest.videos:
        try:
            location = S3Uri.parse(video.uri)
        except ValueError:
            continue
        buckets[location.bucket] += 1
        if location.key.count("/") >= 2:
            prefixes[location.key.rsplit("/", 2)[0]] += 1
    bucket = buckets.most_common(1)[0][0] if buckets else settings.bucket_videos
    prefix = manifest.prefix if manifest.prefix is not None else (
        prefixes.most_common(1)[0][0] if prefixes else manifest.name)
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def _load(settings: Settings, manifest_ref: str) -> tuple[Manifest, str]:
    manifests = ManifestStore(settings)
    try:
        uri = manifests.resolve(manifest_ref)
    except ValueError as exc:  # a malformed s3:// URI
        raise RefreshError(f"manifest reference {manifest_ref!r}: {exc}") from None
    return manifests.load(uri), uri


def _list(store: ObjectStore, bucket: str, prefix: str, manifest_uri: str) -> dict[str, ObjectInfo]:
    try:
        listed = list(store.list_objects(bucket, prefix))
    except ObjectNotFound:
        raise RefreshError(f"videos bucket s3://{bucket} does not exist (manifest {manifest_uri} has its videos "
                           f"under s3://{bucket}/{prefix}); check ESSP_BUCKET_VIDEOS or the manifest") from None
    return {str(S3Uri(bucket, o.key)): o for o in listed if PurePosixPath(o.key).suffix.lower() in VIDEO_EXTENSIONS}


def _differs(store: ObjectStore, bucket: str, known: _Known, obj: ObjectInfo) -> bool:
    """Whether the object is not the one the manifest recorded."""
    etag, size, sha256 = known.facts()
    if etag:
        return etag != obj.etag or (size is not None and size != obj.size)
    if size is not None and size != obj.size:
        return True
    if sha256:
        try:
            recorded = store.stat(bucket, obj.key).metadata.get("sha256")  # ingest sets it on upload
            if recorded is None:
                recorded = _sha256(store.get_bytes(bucket, obj.key))
        except ObjectNotFound:
            return True  # gone since the listing: changed; the next run sees it removed
        return recorded != sha256
    if known.quarantined is not None and obj.last_modified is not None:
        # Nothing recorded but when it was set aside: an object written since then is another one.
        return obj.last_modified.timestamp() > known.quarantined.at
    return False


def _scan(settings: Settings, manifest_ref: str, workers: int | None = None) -> _Scan:
    manifest, uri = _load(settings, manifest_ref)
    bucket, prefix = _location(settings, manifest)
    store = ObjectStore(settings)
    objects = _list(store, bucket, prefix, uri)

    def under_prefix(entry_uri: str) -> bool:
        try:
            location = S3Uri.parse(entry_uri)
        except ValueError:  # file:// of a file ingest never uploaded
            return False
        return location.bucket == bucket and location.key.startswith(prefix)

    known: dict[str, _Known] = {}
    for entry in manifest.quarantined:
        if under_prefix(entry.uri):
            known[entry.uri] = _Known(quarantined=entry)
    for video in manifest.videos:
        if under_prefix(video.uri):
            known[video.uri] = _Known(video=video)

    changes = Changes(base=uri)
    compare = [(u, known[u], o) for u, o in objects.items() if u in known]
    with _pool(workers) as pool:
        differs = list(pool.map(lambda item: _differs(store, bucket, item[1], item[2]), compare))
    for (object_uri, _, _), changed in zip(compare, differs, strict=True):
        if changed:
            changes.changed.append(object_uri)
        else:
            changes.unchanged += 1
    changes.added = sorted(u for u in objects if u not in known)
    changes.changed.sort()
    changes.removed = sorted(u for u in known if u not in objects)
    test = set(manifest.splits.get("test", []))
    changes.removed_test = [u for u in changes.removed if (v := known[u].video) is not None and v.id in test]
    return _Scan(manifest, uri, bucket, prefix, objects, known, changes)


def find_changes(settings: Settings, manifest_ref: str) -> Changes:
    """The videos added, changed and removed under the manifest's prefix in its bucket since the
    manifest `manifest_ref` (a dataset name, NAME@N or an s3:// URI) was written. Reads only."""
    return _scan(settings, manifest_ref).changes


@dataclass
class _Probed:
    uri: str
    rel: str
    class_name: str | None
    video: ManifestVideo | None = None
    reason: str | None = None
    sha256: str | None = None
    gone: bool = False


def _probe(store: ObjectStore, scan: _Scan, object_uri: str) -> _Probed:
    """Classify and probe one added or changed object."""
    obj = scan.objects[object_uri]
    rel = obj.key[len(scan.prefix):]
    parts = rel.split("/")
    classes = {c.lower(): c for c in scan.manifest.classes}
    where = f"s3://{scan.bucket}/{scan.prefix}<Class>/<video>"
    if len(parts) == 1:
        return _Probed(object_uri, rel, None, reason=f"not in a class folder (expected {where})")
    class_name = classes.get(parts[0].lower())
    if len(parts) > 2:
        return _Probed(object_uri, rel, class_name, reason=f"in a folder below a class folder (expected {where})")
    if class_name is None:
        return _Probed(object_uri, rel, None,
                       reason=f"class {parts[0]} is not one of the manifest's {len(classes)} classes; "
                              "a new class needs a new dataset (essp dataset ingest)")
    try:
        data = store.get_bytes(scan.bucket, obj.key)
    except ObjectNotFound:
        return _Probed(object_uri, rel, class_name, gone=True)
    digest = _sha256(data)
    try:
        info = probe_video(data, object_uri)
    except VideoError as exc:
        return _Probed(object_uri, rel, class_name, reason=exc.reason, sha256=digest)
    label = scan.manifest.classes.index(class_name)
    return _Probed(object_uri, rel, class_name, sha256=digest,
                   video=manifest_video(rel, object_uri, class_name, label, info, digest, obj.etag))


def _insert(ids: list[str], new: str) -> list[str]:
    """`ids` plus `new`, keeping a sorted list sorted (ingest writes them sorted)."""
    return sorted([*ids, new]) if ids == sorted(ids) else [*ids, new]


def refresh_manifest(settings: Settings, manifest_ref: str, *, log: Log = print, workers: int | None = None,
                     ) -> tuple[Manifest, str | None, Changes]:
    """Bring the manifest `manifest_ref` up to date with its videos bucket and save the next version.

    Returns (manifest, its URI, changes). Nothing changed: (the base manifest, None, changes), and
    nothing is written. Otherwise added and changed videos are probed (`workers` at once): new ones
    go to the train split, changed ones keep theirs, bad ones are quarantined with the reason, and
    videos gone from the bucket leave the manifest. The base must be the dataset's latest version
    (a refresh of an older one would drop what the versions after it recorded)."""
    scan = _scan(settings, manifest_ref, workers)
    base, changes = scan.manifest, scan.changes
    if not changes and needs_carving(base, None):  # a manifest from before validation splits: it gets one
        return _carved(settings, base, changes, log)
    if not changes:
        log(f"{base.ref}: no changes under s3://{scan.bucket}/{scan.prefix} ({changes.unchanged} videos unchanged)")
        return base, None, changes
    manifests = ManifestStore(settings)
    latest = manifests.latest_version(base.name)
    if latest != base.version:
        raise RefreshError(f"manifest {scan.uri} is {base.ref} but the latest version of {base.name!r} is "
                           f"{latest}: refresh `{base.name}` (the latest) so no version's changes are lost")
    if base.videos and not scan.objects:
        raise RefreshError(f"no video objects under s3://{scan.bucket}/{scan.prefix}, where {base.ref} has "
                           f"{len(base.videos)} videos: refusing to write an empty manifest (wrong bucket or "
                           "prefix? check ESSP_BUCKET_VIDEOS)")

    store = ObjectStore(settings)
    with _pool(workers) as pool:
        probed = list(pool.map(lambda u: _probe(store, scan, u), [*changes.added, *changes.changed]))

    gone = set(changes.removed) | {p.uri for p in probed if p.gone}
    touched = gone | {p.uri for p in probed}
    old_videos = {v.uri: v for v in base.videos}
    videos = {v.id: v for v in base.videos if v.uri not in touched}
    quarantined = [q for q in base.quarantined if q.uri not in touched]
    test_ids = set(base.splits.get("test", []))
    new_train: list[str] = []
    now = time.time()

    for uri in changes.removed:
        log(f"removed  {uri}" + (" (was in the TEST split: the test split shrinks)" if uri in changes.removed_test
                                 else ""))
    # Videos the manifest had first, so that a new object never takes the id of one of them.
    for item in sorted(probed, key=lambda p: (p.uri not in old_videos, p.rel)):
        what = "changed" if item.uri in changes.changed else "added"
        old = old_videos.get(item.uri)
        if item.gone:
            log(f"removed  {item.uri} (deleted while refreshing)")
            changes.removed.append(item.uri)
            if old is not None and old.id in test_ids:
                changes.removed_test.append(item.uri)
            continue
        if item.video is not None and old is None and item.video.id in videos:
            item.reason = f"duplicate id {item.video.id} (also {videos[item.video.id].uri})"
            item.video = None
        if item.video is None:
            obj = scan.objects[item.uri]
            quarantined.append(QuarantinedVideo(uri=item.uri, path=item.rel, reason=item.reason or "",
                                                class_name=item.class_name, stage="ingest", at=now, etag=obj.etag,
                                                size_bytes=obj.size, sha256=item.sha256))
            changes.quarantined[item.uri] = item.reason or ""
            if old is not None and old.id in test_ids:
                changes.removed_test.append(item.uri)
                log(f"{what:<8} {item.uri}: quarantined: {item.reason} (was in the TEST split: the test split "
                    "shrinks)")
            else:
                log(f"{what:<8} {item.uri}: quarantined: {item.reason}")
            continue
        facts = f"{item.video.frames} frames, {item.video.width}x{item.video.height} {item.video.codec}"
        if old is not None:  # the same object with new bytes: same id and split, new probe facts
            videos[old.id] = item.video.model_copy(update={"id": old.id})
            log(f"changed  {item.uri}: {facts}")
        else:
            videos[item.video.id] = item.video
            new_train.append(item.video.id)
            log(f"{what:<8} {item.uri} -> train: {facts}")
    changes.removed.sort()
    changes.removed_test.sort()

    splits = {name: [i for i in ids if i in videos] for name, ids in base.splits.items()}
    for new_id in new_train:
        splits["train"] = _insert(splits.get("train", []), new_id)
    # Entries written before ETags were recorded get the ETag of the object they were found equal to.
    for key, video in list(videos.items()):
        if video.etag is None and (obj := scan.objects.get(video.uri)) is not None:
            videos[key] = video.model_copy(update={"etag": obj.etag})
    quarantined = [q.model_copy(update={"etag": scan.objects[q.uri].etag, "size_bytes": scan.objects[q.uri].size})
                   if q.etag is None and q.uri in scan.objects else q for q in quarantined]
    split_rule = base.split_rule
    if new_train and REFRESH_RULE not in split_rule:
        split_rule = f"{split_rule}; {REFRESH_RULE}" if split_rule else REFRESH_RULE
    manifest = base.model_copy(update={
        "version": 0, "created_at": now, "prefix": scan.prefix.rstrip("/"), "split_rule": split_rule,
        "videos": sorted(videos.values(), key=lambda v: v.id),
        "quarantined": sorted(quarantined, key=lambda q: q.path),
        "splits": splits,
    }, deep=True)
    # new training videos of a held-out group join it; a manifest without a val split gets one
    fraction = base.val_fraction or DEFAULT_VAL_FRACTION
    manifest = carve_validation(manifest, fraction)
    protocol = {}
    for n in base.protocol:  # every UCF split: new videos train there too, each split's validation kept
        if base.ucf_split is not None and n == str(base.ucf_split):
            protocol[n] = {k: list(v) for k, v in manifest.splits.items()}
            continue
        view = base.for_split(int(n))
        kept = {name: [i for i in ids if i in videos] for name, ids in view.splits.items()}
        for new_id in new_train:
            kept["train"] = _insert(kept.get("train", []), new_id)
        protocol[n] = carve_validation(view.model_copy(update={"splits": kept}), fraction, previous=view).splits
    manifest = manifest.model_copy(update={"protocol": protocol})
    uri = manifests.save(manifest)
    saved = manifests.load(uri)
    log(f"{saved.ref}: {uri} ({len(changes.added)} added, {len(changes.changed)} changed, "
        f"{len(changes.removed)} removed, {len(changes.quarantined)} quarantined)")
    return saved, uri, changes


def _carved(settings: Settings, base: Manifest, changes: Changes, log: Log) -> tuple[Manifest, str | None, Changes]:
    """The next version of ``base`` with a validation split carved at the default fraction."""
    manifests = ManifestStore(settings)
    latest = manifests.latest_version(base.name)
    if latest != base.version:
        raise RefreshError(f"{base.ref} is not the latest version of {base.name!r} ({latest}): refresh the latest")
    carved = carve_validation(base, DEFAULT_VAL_FRACTION).model_copy(update={"version": 0, "created_at": time.time()})
    uri = manifests.save(carved)
    saved = manifests.load(uri)
    log(f"{saved.ref}: {uri} (no video changes; validation split carved: {len(saved.splits['val'])} of "
        f"{len(base.splits.get('train', []))} training videos, {DEFAULT_VAL_FRACTION:g} of each class's groups)")
    return saved, uri, changes


__all__ = ["Changes", "RefreshError", "find_changes", "refresh_manifest"]
