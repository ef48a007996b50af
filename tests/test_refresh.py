"""Refreshing a dataset from its bucket (what the nightly retraining runs first), on the real S3:
videos added, overwritten, deleted, corrupt or in an unknown class; manifests written before ETags
were recorded; the `essp dataset refresh` command."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from essp.cli.dataset import dataset_app
from essp.clients.s3 import ObjectStore, S3Uri
from essp.datasets.ingest import ingest_directory
from essp.datasets.manifest import Manifest, ManifestStore
from essp.datasets.refresh import Changes, RefreshError, find_changes, refresh_manifest
from essp.datasets.synth import synthesize
from essp.errors import EsspError, ServiceUnavailable

# 3 classes of 4 videos (2 groups of 2 clips): per class 2 train, 2 test.
SMALL = dict(classes=3, videos_per_class=4, frames=16, height=32, width=32, keyint=8, seed=1)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("refresh") / "ds", **SMALL).out_dir


@pytest.fixture(scope="module")
def extra_dir(tmp_path_factory) -> Path:
    """Other videos of the same classes (another seed, 24 frames): new or replacement bytes."""
    return synthesize(tmp_path_factory.mktemp("refresh-extra") / "ds", **{**SMALL, "seed": 7, "frames": 24}).out_dir


def extra_video(extra_dir: Path, class_name: str = "TranslateLeft") -> bytes:
    return next(iter(sorted((extra_dir / class_name).glob("*.mp4")))).read_bytes()


def put(settings, key: str, data: bytes) -> str:
    return str(ObjectStore(settings).put_bytes(settings.bucket_videos, key, data, content_type="video/mp4"))


def etag(settings, uri: str) -> str:
    location = S3Uri.parse(uri)
    return ObjectStore(settings).stat(location.bucket, location.key).etag


def no_log(_: str) -> None:
    pass


def test_nothing_changes_right_after_an_ingest(settings, synth_dir):
    manifest, uri = ingest_directory(settings, synth_dir, "ds")
    assert manifest.prefix == "ds" and all(v.etag == etag(settings, v.uri) for v in manifest.videos)

    changes = find_changes(settings, "ds")
    assert not changes and changes == Changes(base=uri, unchanged=12)
    assert changes.as_dict() == {"added": [], "changed": [], "removed": [], "base": uri, "removed_test": [],
                                 "quarantined": {}, "unchanged": 12, "has_changes": False}
    lines: list[str] = []
    same, written, changes = refresh_manifest(settings, "ds", log=lines.append)
    assert (same, written, bool(changes)) == (manifest, None, False)
    assert ManifestStore(settings).versions("ds") == [1] and "no changes" in lines[0]


def test_a_new_video_goes_to_train_and_the_test_split_stays(settings, synth_dir, extra_dir):
    base, base_uri = ingest_directory(settings, synth_dir, "ds", prefix="nightly/ds")
    data = extra_video(extra_dir, "TranslateRight")
    new_uri = put(settings, "nightly/ds/TranslateRight/v_TranslateRight_g09_c01.mp4", data)
    put(settings, "nightly/ds/TranslateRight/notes.txt", b"not a video: not looked at")

    changes = find_changes(settings, "ds")
    assert changes and (changes.added, changes.changed, changes.removed) == ([new_uri], [], [])
    assert changes.base == base_uri and changes.unchanged == 12

    lines: list[str] = []
    manifest, uri, changes = refresh_manifest(settings, "ds", log=lines.append)
    assert uri == f"s3://{settings.bucket_videos}/manifests/ds/v0002.json" and manifest.version == 2
    assert manifest == ManifestStore(settings).load("ds")
    video = manifest.video("TranslateRight/v_TranslateRight_g09_c01")
    assert (video.uri, video.class_name, video.label) == (new_uri, "TranslateRight", 1)
    assert (video.frames, video.width, video.height, video.codec, video.keyframe_interval) == (24, 32, 32, "h264", 8)
    assert video.size_bytes == len(data) and video.etag == etag(settings, new_uri)
    assert manifest.splits["train"] == sorted([*base.splits["train"], video.id])
    assert manifest.splits["test"] == base.splits["test"]  # the test split is fixed
    assert manifest.videos == sorted([*base.videos, video], key=lambda v: v.id)
    assert manifest.classes == base.classes and manifest.quarantined == [] and manifest.prefix == "nightly/ds"
    assert "videos added by `essp dataset refresh`: train" in manifest.split_rule
    assert any(new_uri in line and "-> train" in line for line in lines)

    again = find_changes(settings, "ds")
    assert not again and again.unchanged == 13
    same, written, _ = refresh_manifest(settings, "ds", log=no_log)
    assert (same, written) == (manifest, None) and ManifestStore(settings).versions("ds") == [1, 2]


def test_an_overwritten_video_is_probed_again_and_keeps_its_split(settings, synth_dir, extra_dir):
    base, _ = ingest_directory(settings, synth_dir, "ds")
    target = base.split("train")[0]
    data = extra_video(extra_dir, target.class_name)
    location = S3Uri.parse(target.uri)
    put(settings, location.key, data)

    changes = find_changes(settings, "ds")
    assert (changes.added, changes.changed, changes.removed) == ([], [target.uri], [])
    manifest, uri, _ = refresh_manifest(settings, "ds", log=no_log)
    assert manifest.version == 2 and uri is not None
    video = manifest.video(target.id)
    assert (video.uri, video.label, video.frames) == (target.uri, target.label, 24) and target.frames == 16
    assert video.size_bytes == len(data) != target.size_bytes and video.sha256 != target.sha256
    assert video.etag == etag(settings, target.uri) != target.etag
    assert manifest.splits == base.splits  # same split, same order
    assert [v for v in manifest.videos if v.id != target.id] == [v for v in base.videos if v.id != target.id]
    assert manifest.split_rule == base.split_rule  # nothing new went to train
    assert not find_changes(settings, "ds")


def test_bad_files_are_quarantined_once(settings, synth_dir, extra_dir):
    base, _ = ingest_directory(settings, synth_dir, "ds")
    corrupt = put(settings, "ds/TranslateUp/v_TranslateUp_g09_c01.mp4", b"\x00garbage" * 500)
    empty = put(settings, "ds/TranslateUp/v_TranslateUp_g09_c02.mp4", b"")
    stranger = put(settings, "ds/Juggling/v_Juggling_g01_c01.mp4", extra_video(extra_dir))
    loose = put(settings, "ds/loose.mp4", extra_video(extra_dir))
    nested = put(settings, "ds/TranslateUp/more/v_TranslateUp_g10_c01.mp4", extra_video(extra_dir, "TranslateUp"))
    # Same name as a video of the manifest, another extension: its id would be ambiguous.
    dup = put(settings, "ds/TranslateUp/v_TranslateUp_g01_c01.avi", extra_video(extra_dir, "TranslateUp"))

    manifest, _, changes = refresh_manifest(settings, "ds", log=no_log)
    assert sorted(changes.added) == sorted([corrupt, empty, stranger, loose, nested, dup])
    assert manifest.version == 2 and manifest.videos == base.videos and manifest.splits == base.splits
    reasons = {q.uri: q.reason for q in manifest.quarantined}
    assert reasons == changes.quarantined
    assert reasons[corrupt].startswith("not a video")
    assert reasons[empty] == "empty file (0 bytes)"
    assert reasons[stranger] == ("class Juggling is not one of the manifest's 3 classes; a new class needs a new "
                                 "dataset (essp dataset ingest)")
    assert reasons[loose].startswith("not in a class folder (expected s3://")
    assert reasons[nested].startswith("in a folder below a class folder")
    assert reasons[dup] == (f"duplicate id TranslateUp/v_TranslateUp_g01_c01 "
                            f"(also {manifest.video('TranslateUp/v_TranslateUp_g01_c01').uri})")
    by_uri = {q.uri: q for q in manifest.quarantined}
    assert by_uri[corrupt].path == "TranslateUp/v_TranslateUp_g09_c01.mp4" and by_uri[corrupt].stage == "ingest"
    assert by_uri[corrupt].class_name == "TranslateUp" and by_uri[stranger].class_name is None
    assert by_uri[corrupt].etag == etag(settings, corrupt) and by_uri[corrupt].size_bytes == 4000

    again = find_changes(settings, "ds")  # set aside once, not reported again
    assert not again and again.unchanged == 12 + 6
    assert refresh_manifest(settings, "ds", log=no_log)[1] is None

    # Fixed: the corrupt one is now a good video; it leaves the quarantine for the train split.
    put(settings, "ds/TranslateUp/v_TranslateUp_g09_c01.mp4", extra_video(extra_dir, "TranslateUp"))
    changes = find_changes(settings, "ds")
    assert (changes.added, changes.changed, changes.removed) == ([], [corrupt], [])
    fixed, uri, _ = refresh_manifest(settings, "ds", log=no_log)
    assert fixed.version == 3 and corrupt not in {q.uri for q in fixed.quarantined}
    assert "TranslateUp/v_TranslateUp_g09_c01" in fixed.splits["train"]
    assert fixed.splits["test"] == base.splits["test"] and len(fixed.quarantined) == 5


def test_deleted_videos_leave_the_manifest_and_a_test_one_is_reported(settings, synth_dir):
    base, _ = ingest_directory(settings, synth_dir, "ds")
    store = ObjectStore(settings)
    train, test = base.split("train")[0], base.split("test")[0]
    for video in (train, test):
        store.delete(settings.bucket_videos, S3Uri.parse(video.uri).key)

    changes = find_changes(settings, "ds")
    assert changes and (changes.added, changes.changed) == ([], [])
    assert changes.removed == sorted([train.uri, test.uri]) and changes.removed_test == [test.uri]
    lines: list[str] = []
    manifest, uri, changes = refresh_manifest(settings, "ds", log=lines.append)
    assert manifest.version == 2 and uri is not None
    assert {v.id for v in manifest.videos} == {v.id for v in base.videos} - {train.id, test.id}
    assert manifest.splits == {"train": [i for i in base.splits["train"] if i != train.id],
                               "val": base.splits["val"],  # the validation split stays as it was
                               "test": [i for i in base.splits["test"] if i != test.id]}
    assert changes.removed_test == [test.uri]
    assert any(test.uri in line and "TEST split" in line for line in lines)
    assert not find_changes(settings, "ds")


def test_manifests_without_etags_are_compared_by_size_and_sha256(settings, synth_dir, extra_dir):
    """Manifests written before ETags were recorded: size, then the sha256 (object metadata, or the
    bytes when an overwrite dropped it); a decode quarantine with no facts: by its time."""
    ingested, _ = ingest_directory(settings, synth_dir, "ds")
    store, manifests = ObjectStore(settings), ManifestStore(settings)
    victim = ingested.split("train")[1]
    quarantined = ingested.quarantine(victim.uri, "decode error at frame 3", "decode")
    assert manifests.save(quarantined).endswith("/v0002.json")
    # Version 3: as an older ESSP wrote it, without ETags or prefix.
    doc = json.loads(store.get_bytes(settings.bucket_videos, "manifests/ds/v0002.json"))
    for video in doc["videos"]:
        del video["etag"]
    del doc["prefix"], doc["version"]
    assert "etag" not in doc["quarantined"][0]
    old = Manifest.model_validate(doc)
    assert all(v.etag is None for v in old.videos) and old.prefix is None
    store.put_json(settings.bucket_videos, "manifests/ds/v0003.json", {**doc, "version": 3})
    store.put_json(settings.bucket_videos, "manifests/ds/latest.json",
                   {"version": 3, "uri": f"s3://{settings.bucket_videos}/manifests/ds/v0003.json"})

    changes = find_changes(settings, "ds")
    assert not changes and changes.unchanged == 12  # 11 videos + the quarantined one

    # Overwritten with bytes of the same size (no sha256 metadata now: hashed), and with other bytes.
    same_size, other = ingested.split("train")[0], ingested.split("test")[2]
    raw = bytearray(store.get_bytes(settings.bucket_videos, S3Uri.parse(same_size.uri).key))
    raw[len(raw) // 2] ^= 0xFF
    put(settings, S3Uri.parse(same_size.uri).key, bytes(raw))
    put(settings, S3Uri.parse(other.uri).key, extra_video(extra_dir, other.class_name))
    time.sleep(1.1)  # S3 times have one-second resolution
    put(settings, S3Uri.parse(victim.uri).key, extra_video(extra_dir, victim.class_name))  # the decode failure, fixed
    changes = find_changes(settings, "ds")
    assert (changes.added, changes.removed) == ([], [])
    assert changes.changed == sorted([same_size.uri, other.uri, victim.uri]) and changes.unchanged == 9

    manifest, uri, _ = refresh_manifest(settings, "ds", log=no_log)
    assert manifest.version == 4 and uri is not None and manifest.prefix == "ds"
    assert all(v.etag == etag(settings, v.uri) for v in manifest.videos)  # recorded from now on
    assert manifest.video(other.id).frames == 24 and other.id in manifest.splits["test"]
    assert manifest.video(same_size.id).sha256 != same_size.sha256
    assert victim.id in manifest.splits["train"] and manifest.quarantined == []
    assert manifest.splits["test"] == ingested.splits["test"]
    assert not find_changes(settings, "ds")


def test_errors_name_the_cause(settings, synth_dir, closed_port):
    with pytest.raises(EsspError, match=r"manifest s3://\S+/manifests/nothing/latest\.json not found"):
        find_changes(settings, "nothing")
    with pytest.raises(RefreshError, match="manifest reference 's3://only-a-bucket'"):
        find_changes(settings, "s3://only-a-bucket")
    base, uri = ingest_directory(settings, synth_dir, "ds")
    with pytest.raises(ServiceUnavailable, match=r"S3 at \S+ is not reachable"):
        find_changes(settings.model_copy(update={"s3_port": closed_port}), "ds")

    # The videos' bucket is gone.
    gone = f"{settings.bucket_videos}-gone"
    moved = base.model_copy(update={"name": "moved", "version": 0, "prefix": None, "videos": [
        v.model_copy(update={"uri": v.uri.replace(settings.bucket_videos, gone)}) for v in base.videos]})
    with pytest.raises(RefreshError, match=rf"videos bucket s3://{gone} does not exist"):
        find_changes(settings, ManifestStore(settings).save(moved))

    # Changes against an older version can be listed, not written over the versions after it.
    store = ObjectStore(settings)
    bad = put(settings, "ds/TranslateUp/v_TranslateUp_g09_c01.mp4", b"x")
    assert refresh_manifest(settings, "ds", log=no_log)[0].version == 2
    assert find_changes(settings, "ds@1").added == [bad] and find_changes(settings, uri).added == [bad]
    with pytest.raises(RefreshError, match=r"is ds@1 but the latest version of 'ds' is 2"):
        refresh_manifest(settings, uri, log=no_log)

    # Every video gone (wrong bucket or prefix?): no empty manifest.
    for key in list(store.list_keys(settings.bucket_videos, "ds/")):
        store.delete(settings.bucket_videos, key)
    with pytest.raises(RefreshError, match="refusing to write an empty manifest"):
        refresh_manifest(settings, "ds", log=no_log)


def test_refresh_command(settings, synth_dir, extra_dir, monkeypatch):
    monkeypatch.setenv("ESSP_BUCKET_VIDEOS", settings.bucket_videos)
    ingest_directory(settings, synth_dir, "ds")
    runner = CliRunner()
    quiet = runner.invoke(dataset_app, ["refresh", "ds"])
    assert quiet.exit_code == 0, quiet.output
    assert "no changes since s3://" in quiet.output and "nothing written" in quiet.output

    new_uri = put(settings, "ds/ZoomIn/v_x.mp4", b"")  # not a class of the dataset
    added = put(settings, "ds/TranslateLeft/v_TranslateLeft_g09_c01.mp4", extra_video(extra_dir))
    dry = runner.invoke(dataset_app, ["refresh", "ds", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f"added    {added}" in dry.output and f"added    {new_uri}" in dry.output
    assert "2 added, 0 changed, 0 removed, 12 unchanged; nothing written" in dry.output
    assert ManifestStore(settings).versions("ds") == [1]
    as_json = runner.invoke(dataset_app, ["refresh", "ds", "--dry-run", "--json"])
    assert json.loads(as_json.output)["added"] == sorted([added, new_uri])

    done = runner.invoke(dataset_app, ["refresh", "ds"])
    assert done.exit_code == 0, done.output
    assert f"added    {added} -> train" in done.output and f"{new_uri}: quarantined: class ZoomIn" in done.output
    assert f"manifest: s3://{settings.bucket_videos}/manifests/ds/v0002.json" in done.output
    assert ManifestStore(settings).versions("ds") == [1, 2]
    report = json.loads(runner.invoke(dataset_app, ["refresh", "ds", "--json"]).output)
    assert report["has_changes"] is False and report["manifest"] is None and report["unchanged"] == 14

    missing = runner.invoke(dataset_app, ["refresh", "nothing"])
    assert missing.exit_code != 0 and "not found" in str(missing.exception)


def test_a_manifest_from_before_validation_splits_gets_one_on_refresh(settings, synth_dir):
    base, _ = ingest_directory(settings, synth_dir, "ds")
    # what an older ESSP wrote: train and test only, no val_fraction
    old = base.model_copy(update={"version": 0, "val_fraction": None, "val_by_clip": [],
                                  "split_rule": base.split_rule.split("; validation")[0],
                                  "splits": {"train": sorted(base.splits["train"] + base.splits["val"]),
                                             "test": base.splits["test"]}})
    store = ManifestStore(settings)
    store.save(old)
    lines: list[str] = []
    manifest, uri, changes = refresh_manifest(settings, "ds", log=lines.append)
    assert not changes and uri is not None and manifest.version == 3  # no video changed, a version all the same
    assert manifest.splits == base.splits and manifest.val_fraction == 0.1 and manifest.videos == base.videos
    assert "validation split carved" in lines[-1]
    again, written, _ = refresh_manifest(settings, "ds", log=lines.append)
    assert written is None and again == manifest  # and only once
