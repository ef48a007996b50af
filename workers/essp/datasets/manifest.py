"""Versioned dataset manifests in S3: which videos a dataset has, their labels, splits and probe
facts, and which videos are quarantined and why.

Layout in the videos bucket::

    manifests/<name>/v0001.json     one immutable object per version
    manifests/<name>/latest.json    {"version": N, "uri": "s3://.../v000N.json"}

A reference is a full ``s3://`` URI of a version, a dataset name (its latest version), or
``name@N`` (version N).
"""

from __future__ import annotations

import re
import time
from typing import Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, ValidationError, model_serializer

from essp.clients.s3 import ObjectNotFound, ObjectStore, S3Uri
from essp.errors import EsspError
from essp.settings import Settings

MANIFEST_PREFIX = "manifests"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION_KEY = re.compile(r"/v(\d+)\.json$")


class ManifestVideo(BaseModel):
    id: str  # "ClassName/v_ClassName_g01_c01": unique within the manifest, stable across versions
    uri: str  # s3://bucket/key of the video
    class_name: str
    label: int = Field(ge=0)  # 0-based index into Manifest.classes
    frames: int = Field(ge=1)
    fps: float = Field(gt=0)
    width: int
    height: int
    codec: str
    keyframe_interval: int | None
    size_bytes: int
    sha256: str
    # The S3 object's ETag when it was probed (what `essp dataset refresh` compares); None in manifests
    # written before it was recorded.
    etag: str | None = None


# Facts of the S3 object a quarantined entry was made from, where known: written only when set.
_OBJECT_FACTS = ("etag", "size_bytes", "sha256")


class QuarantinedVideo(BaseModel):
    uri: str  # the object's s3:// URI, or file:// of a local file that never got uploaded
    path: str  # the video's id or its path relative to the ingested folder
    reason: str
    class_name: str | None = None
    stage: Literal["ingest", "decode"]
    at: float = Field(default_factory=time.time)
    # The object as it was when set aside (`essp dataset refresh` records them to see it change).
    etag: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unknown_facts(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        for key in _OBJECT_FACTS:
            if key in data and data[key] is None:
                del data[key]
        return data


class Manifest(BaseModel):
    v: int = 1  # schema version of this document
    name: str
    version: int = Field(0, ge=0)  # 0: not saved yet; ManifestStore.save assigns the next one
    created_at: float = Field(default_factory=time.time)
    source: str  # where the videos came from (the ingested folder)
    prefix: str | None = None  # key prefix of the videos in the bucket (<prefix>/<Class>/<file>); None: older
    split_rule: str = ""  # how train/test (and val) were decided (split files, UCF groups, hash)
    classes: list[str]
    videos: list[ManifestVideo] = []
    quarantined: list[QuarantinedVideo] = []
    splits: dict[str, list[str]] = {}  # "train" / "val" / "test" -> video ids
    # The share of each class's training groups held out as "val" (essp.datasets.validation); None: no val split.
    val_fraction: float | None = None
    val_by_clip: list[str] = []  # classes with one training group, whose validation clips share its scene
    # UCF-101's three train/test splits as ingest found them: "1".."3" -> {"train", "val", "test"}; `splits`
    # is the one ingest was asked for. Empty: the manifest knows only `splits` (ingested before issue 14).
    protocol: dict[str, dict[str, list[str]]] = {}
    ucf_split: int | None = None  # which of `protocol` `splits` is

    def video(self, video_id: str) -> ManifestVideo:
        for video in self.videos:
            if video.id == video_id:
                return video
        raise EsspError(f"manifest {self.ref}: no video {video_id!r}")

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def split(self, name: str) -> list[ManifestVideo]:
        """The videos of split `name`, in the split's order."""
        if name not in self.splits:
            raise EsspError(f"manifest {self.ref} has no split {name!r} (splits: {', '.join(self.splits) or 'none'})")
        by_id = {v.id: v for v in self.videos}
        return [by_id[i] for i in self.splits[name] if i in by_id]

    def by_class(self, split: str) -> dict[int, list[ManifestVideo]]:
        """Label -> videos of that class in `split` (what the epoch planner samples from)."""
        out: dict[int, list[ManifestVideo]] = {}
        for video in self.split(split):
            out.setdefault(video.label, []).append(video)
        return out

    def for_split(self, split: int) -> Manifest:
        """This manifest as UCF split ``split`` sees it: `splits` are that split's train / val / test (a view for
        one run, not a version of the dataset: its `protocol` is left empty)."""
        if str(split) not in self.protocol:
            have = ", ".join(sorted(self.protocol)) or "none recorded"
            raise EsspError(f"manifest {self.ref} has no UCF split {split} (splits: {have}); ingest the folder again "
                            "(`essp dataset ingest`, with trainlist0N/testlist0N or UCF-101 group names) to record "
                            "all three")
        return self.model_copy(update={"splits": {k: list(v) for k, v in self.protocol[str(split)].items()},
                                       "protocol": {}, "split_rule": f"UCF split {split}; {self.split_rule}"},
                               deep=True)

    def quarantine(self, uri: str, reason: str, stage: Literal["ingest", "decode"] = "decode") -> Manifest:
        """A new manifest (version + 1) without the video at `uri`, which is listed as quarantined."""
        video = next((v for v in self.videos if v.uri == uri), None)
        if video is None:
            raise EsspError(f"manifest {self.ref}: no video at {uri} to quarantine")
        entry = QuarantinedVideo(uri=uri, path=video.id, reason=reason, class_name=video.class_name, stage=stage)
        return self.model_copy(update={
            "version": self.version + 1,
            "created_at": time.time(),
            "videos": [v for v in self.videos if v.uri != uri],
            "splits": {name: [i for i in ids if i != video.id] for name, ids in self.splits.items()},
            "protocol": {n: {name: [i for i in ids if i != video.id] for name, ids in split.items()}
                         for n, split in self.protocol.items()},
            "quarantined": [*self.quarantined, entry],
        }, deep=True)

    def same_content(self, other: Manifest) -> bool:
        """Same classes, videos, splits and quarantine reasons (version and timestamps aside)."""
        def strip(q: list[QuarantinedVideo]) -> list[tuple]:
            return sorted((e.uri, e.path, e.reason, e.class_name, e.stage) for e in q)

        return (self.classes == other.classes and self.videos == other.videos and self.splits == other.splits
                and self.split_rule == other.split_rule and self.val_fraction == other.val_fraction
                and self.protocol == other.protocol and strip(self.quarantined) == strip(other.quarantined))


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise EsspError(f"dataset name {name!r} is not valid: use letters, digits, '_', '.', '-' "
                        "(it becomes part of S3 keys)")
    return name


class ManifestStore:
    """Saves and loads manifests under ``s3://<bucket_videos>/manifests/<name>/``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = ObjectStore(settings)
        self.bucket = settings.bucket_videos

    def _key(self, name: str, version: int) -> str:
        return f"{MANIFEST_PREFIX}/{name}/v{version:04d}.json"

    def _latest_key(self, name: str) -> str:
        return f"{MANIFEST_PREFIX}/{name}/latest.json"

    def uri(self, name: str, version: int) -> str:
        return str(S3Uri(self.bucket, self._key(name, version)))

    def versions(self, name: str) -> list[int]:
        check_name(name)
        try:
            keys = list(self.store.list_keys(self.bucket, f"{MANIFEST_PREFIX}/{name}/"))
        except ObjectNotFound:
            return []
        return sorted(int(m.group(1)) for k in keys if (m := _VERSION_KEY.search(k)))

    def latest_version(self, name: str) -> int:
        """The version latest.json points at (0 when the dataset has none)."""
        try:
            pointer = self.store.get_json(self.bucket, self._latest_key(name))
        except ObjectNotFound:
            return 0
        return int(pointer["version"])

    def save(self, manifest: Manifest) -> str:
        """Write the manifest and point latest.json at it; returns its URI.

        Version 0 gets the next version after the latest; an explicit version must not exist yet
        (versions are immutable)."""
        check_name(manifest.name)
        self.store.ensure_bucket(self.bucket)
        # Next after every stored version, not only latest.json's: a lost pointer update never
        # makes a later save overwrite a version.
        known = max([self.latest_version(manifest.name), *self.versions(manifest.name)])
        version = manifest.version or known + 1
        key = self._key(manifest.name, version)
        if self.store.exists(self.bucket, key):
            raise EsspError(f"manifest s3://{self.bucket}/{key} already exists: versions are immutable "
                            f"(save with version 0 to append version {known + 1})")
        saved = manifest.model_copy(update={"version": version})
        self.store.put_json(self.bucket, key, saved.model_dump(mode="json"))
        uri = str(S3Uri(self.bucket, key))
        if version >= known:
            self.store.put_json(self.bucket, self._latest_key(manifest.name), {"version": version, "uri": uri})
        return uri

    def resolve(self, ref: str) -> str:
        """The s3:// URI of the version `ref` names."""
        if ref.startswith("s3://"):
            S3Uri.parse(ref)
            return ref
        name, sep, version = ref.partition("@")
        check_name(name)
        if sep:
            if not version.isdigit() or int(version) < 1:
                raise EsspError(f"manifest reference {ref!r}: version must be a number >= 1 (name@3)")
            return self.uri(name, int(version))
        latest = f"s3://{self.bucket}/{self._latest_key(name)}"
        try:
            pointer = self.store.get_json(self.bucket, self._latest_key(name))
        except ObjectNotFound:
            raise EsspError(f"manifest {latest} not found: no dataset named {name!r} has been ingested into "
                            f"s3://{self.bucket} (create it with `essp dataset ingest DIR --name {name}` or "
                            f"`essp dataset synth --out DIR --ingest --name {name}`)") from None
        except ValueError as exc:
            raise EsspError(f"manifest pointer {latest} is not JSON: {exc}") from None
        if not isinstance(pointer, dict) or not isinstance(pointer.get("uri"), str):
            raise EsspError(f"manifest pointer {latest} has no \"uri\" (got {pointer!r})")
        return pointer["uri"]

    def load(self, ref: str) -> Manifest:
        """The manifest `ref` names: an s3:// URI, a dataset name (latest) or name@N."""
        uri = self.resolve(ref)
        location = S3Uri.parse(uri)
        try:
            raw = self.store.get_bytes(location.bucket, location.key)
        except ObjectNotFound:
            name = ref.partition("@")[0]
            have = self.versions(name) if not ref.startswith("s3://") else []
            hint = (f"versions of {name!r}: {', '.join(map(str, have))}" if have else
                    "create it with `essp dataset ingest DIR --name NAME`")
            raise EsspError(f"manifest {uri} not found ({hint})") from None
        try:
            return Manifest.model_validate_json(raw)
        except ValidationError as exc:
            raise EsspError(f"manifest {uri} is not a valid manifest: {exc}") from None
