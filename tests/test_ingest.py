"""Ingest into the real S3 and manifests: bad files quarantined with their reasons, idempotent
re-ingest, versions, UCF-101 split files, split rules without them, and the `essp dataset` commands."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from essp.cli.dataset import dataset_app
from essp.clients.s3 import ObjectStore, S3Uri
from essp.datasets.ingest import ingest_directory
from essp.datasets.manifest import Manifest, ManifestStore
from essp.datasets.synth import synthesize
from essp.datasets.video import decode_segment
from essp.errors import EsspError

SMALL = dict(classes=3, videos_per_class=4, frames=16, height=64, width=64, keyint=8, seed=1)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("synth") / "ds", **SMALL).out_dir


@pytest.fixture
def messy(synth_dir, tmp_path) -> Path:
    """The synthetic dataset plus a corrupt, a truncated and a zero-byte video in class folders."""
    root = tmp_path / "messy"
    shutil.copytree(synth_dir, root)
    good = (root / "TranslateLeft" / "v_TranslateLeft_g01_c01.mp4").read_bytes()
    (root / "TranslateLeft" / "v_TranslateLeft_g09_c01.avi").write_bytes(
        np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (root / "TranslateRight" / "v_TranslateRight_g09_c01.mp4").write_bytes(good[:int(len(good) * 0.6)])
    (root / "TranslateUp" / "v_TranslateUp_g09_c01.mp4").write_bytes(b"")
    (root / "TranslateUp" / "notes.txt").write_text("not a video, not looked at")
    return root


def stat(settings, uri: str):
    location = S3Uri.parse(uri)
    return ObjectStore(settings).client.stat_object(location.bucket, location.key)


def test_ingest_quarantines_bad_files_and_uploads_the_rest(settings, messy):
    done = []
    counts: dict[str, int] = {}
    manifest, uri = ingest_directory(settings, messy, "messy", progress=lambda d, t, p: done.append((d, t, p)),
                                     counts=counts)
    assert uri == f"s3://{settings.bucket_videos}/manifests/messy/v0001.json" and manifest.version == 1
    assert len(done) == 15 and done[-1][:2] == (15, 15)
    assert manifest.classes == ["TranslateLeft", "TranslateRight", "TranslateUp"]
    assert len(manifest.videos) == 12 and counts == {"uploaded": 12, "unchanged": 0, "quarantined": 3, "unsplit": 0}
    assert manifest.split_rule.startswith("split lists trainlist01.txt / testlist01.txt; validation: 0.1 of each ")
    train, val, test = manifest.split("train"), manifest.split("val"), manifest.split("test")
    assert len(train) + len(val) + len(test) == 12
    assert not {v.id for v in train} & {v.id for v in test} and not {v.id for v in val} & {v.id for v in train + test}
    for split in ("train", "val", "test"):
        assert sorted(manifest.by_class(split)) == [0, 1, 2]

    reasons = {q.path: q.reason for q in manifest.quarantined}
    assert reasons["TranslateLeft/v_TranslateLeft_g09_c01.avi"].startswith("not a video")
    assert reasons["TranslateRight/v_TranslateRight_g09_c01.mp4"].startswith("truncated: ")
    assert reasons["TranslateUp/v_TranslateUp_g09_c01.mp4"] == "empty file (0 bytes)"
    assert all(q.stage == "ingest" and q.uri.startswith("file://") for q in manifest.quarantined)
    assert {q.class_name for q in manifest.quarantined} == set(manifest.classes)

    store = ObjectStore(settings)
    keys = sorted(store.list_keys(settings.bucket_videos, "messy/"))
    assert len(keys) == 12 and not any("g09" in k for k in keys)  # bad files are not uploaded
    video = manifest.video("TranslateUp/v_TranslateUp_g02_c01")
    assert (video.label, video.frames, video.width, video.height, video.codec) == (2, 16, 64, 64, "h264")
    assert video.keyframe_interval == 8 and video.uri == f"s3://{settings.bucket_videos}/messy/{video.id}.mp4"
    location = S3Uri.parse(video.uri)
    data = store.get_bytes(location.bucket, location.key)
    assert data == (messy / f"{video.id}.mp4").read_bytes() and len(data) == video.size_bytes
    assert decode_segment(data, video.uri, video.frames - 4, 4, fps=video.fps).shape == (4, 64, 64, 3)
    pointer = store.get_json(settings.bucket_videos, "manifests/messy/latest.json")
    assert pointer == {"version": 1, "uri": uri}


def test_reingest_is_idempotent_and_changes_make_versions(settings, messy):
    manifests = ManifestStore(settings)
    first, uri1 = ingest_directory(settings, messy, "ds")
    modified = {v.id: stat(settings, v.uri).last_modified for v in first.videos}
    time.sleep(1.1)  # S3 times have one-second resolution: a re-upload would show

    counts: dict[str, int] = {}
    again, uri2 = ingest_directory(settings, messy, "ds", counts=counts)
    assert (uri2, again.version) == (uri1, 1)  # nothing changed: no new version
    assert counts["uploaded"] == 0 and counts["unchanged"] == 12
    assert {v.id: stat(settings, v.uri).last_modified for v in again.videos} == modified
    assert manifests.versions("ds") == [1]

    # One video more and one fewer: a new version; the old one stays loadable.
    up = messy / "TranslateUp"
    shutil.copy(up / "v_TranslateUp_g01_c01.mp4", up / "v_TranslateUp_g05_c01.mp4")
    (messy / "TranslateLeft" / "v_TranslateLeft_g02_c02.mp4").unlink()
    counts = {}
    third, uri3 = ingest_directory(settings, messy, "ds", counts=counts)
    assert third.version == 2 and uri3.endswith("/manifests/ds/v0002.json")
    assert counts["uploaded"] == 1 and counts["unchanged"] == 11
    assert "TranslateUp/v_TranslateUp_g05_c01" in {v.id for v in third.videos}
    assert "TranslateLeft/v_TranslateLeft_g02_c02" not in {v.id for v in third.videos}
    assert manifests.versions("ds") == [1, 2]
    assert manifests.load("ds").version == 2
    assert manifests.load("ds@1") == first
    assert manifests.load(uri3) == third


def test_manifest_errors_and_quarantine(settings, synth_dir):
    manifests = ManifestStore(settings)
    with pytest.raises(EsspError, match=r"manifest s3://\S+/manifests/nothing/latest\.json not found: .*"
                                        r"`essp dataset ingest DIR --name nothing`"):
        manifests.load("nothing")
    manifest, uri = ingest_directory(settings, synth_dir, "q")
    with pytest.raises(EsspError, match=r"manifest s3://\S+/manifests/q/v0009\.json not found \(versions of 'q': 1\)"):
        manifests.load("q@9")
    with pytest.raises(EsspError, match="version must be a number"):
        manifests.load("q@x")
    with pytest.raises(EsspError, match="already exists: versions are immutable"):
        manifests.save(manifest)

    victim = manifest.split("train")[0]
    smaller = manifest.quarantine(victim.uri, "decode error at frame 3", "decode")
    assert smaller.version == 2 and manifest.version == 1  # a new object; the original is untouched
    assert victim.id not in {v.id for v in smaller.videos} and victim.id not in smaller.splits["train"]
    assert smaller.quarantined[-1].model_dump(exclude={"at"}) == {
        "uri": victim.uri, "path": victim.id, "reason": "decode error at frame 3",
        "class_name": victim.class_name, "stage": "decode"}
    assert manifests.save(smaller).endswith("/manifests/q/v0002.json")
    assert manifests.load("q") == smaller
    # Re-ingesting the same folder keeps the decode failure out (its bytes did not change).
    again, uri = ingest_directory(settings, synth_dir, "q")
    assert again == smaller and uri.endswith("/manifests/q/v0002.json")
    with pytest.raises(EsspError, match="no video at s3://nowhere/x"):
        smaller.quarantine("s3://nowhere/x", "x", "decode")

    ObjectStore(settings).put_bytes(settings.bucket_videos, "manifests/broken/v0001.json", b'{"name": 1}')
    with pytest.raises(EsspError, match=r"manifest s3://\S+/manifests/broken/v0001\.json is not a valid manifest"):
        manifests.load(f"s3://{settings.bucket_videos}/manifests/broken/v0001.json")


def write_avi(path: Path, shade: int, frames: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(frames):
            img = np.full((32, 32, 3), shade, np.uint8)
            img[:, i * 4:i * 4 + 4] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode(None))


def test_ucf_split_files_are_honoured(settings, tmp_path):
    root = tmp_path / "ucf"
    # classInd's order is not alphabetical: labels must follow it.
    files = {"Zeta": ["v_Zeta_g01_c01", "v_Zeta_g08_c01", "v_Zeta_g08_c02"],
             "Alpha": ["v_Alpha_g01_c01", "v_Alpha_g02_c01", "v_Alpha_g09_c01"]}
    for class_name, stems in files.items():
        for n, stem in enumerate(stems):
            write_avi(root / class_name / f"{stem}.avi", 40 * n)
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 Zeta\n2 Alpha\n")
    (lists / "trainlist01.txt").write_text(
        "Zeta/v_Zeta_g08_c01.avi 1\r\nzeta/v_Zeta_g08_c02.avi 1\r\n"  # CRLF and a differently cased folder
        "Alpha/v_Alpha_g09_c01.avi 2\r\nAlpha/v_Alpha_g02_c01.avi 1\r\nAlpha/v_Alpha_g10_c01.avi 2\r\n")
    (lists / "testlist01.txt").write_text("Zeta/v_Zeta_g01_c01.avi\nAlpha/v_Alpha_g01_c01.avi\n")
    (root / "Stray").mkdir()
    write_avi(root / "Stray" / "v_Stray_g01_c01.avi", 0)

    manifest, _ = ingest_directory(settings, root, "ucf")
    assert manifest.classes == ["Zeta", "Alpha"]
    # Zeta's one training group of two clips gives a validation clip; Alpha's single clip gives none
    assert manifest.splits == {"train": ["Alpha/v_Alpha_g09_c01", "Zeta/v_Zeta_g08_c01"],
                               "val": ["Zeta/v_Zeta_g08_c02"],
                               "test": ["Alpha/v_Alpha_g01_c01", "Zeta/v_Zeta_g01_c01"]}
    assert manifest.val_by_clip == ["Zeta"]
    assert {v.id: v.label for v in manifest.videos} == {
        "Zeta/v_Zeta_g01_c01": 0, "Zeta/v_Zeta_g08_c01": 0, "Zeta/v_Zeta_g08_c02": 0,
        "Alpha/v_Alpha_g01_c01": 1, "Alpha/v_Alpha_g09_c01": 1}
    assert all(v.codec == "mpeg4" and v.frames == 8 and v.uri.endswith(".avi") for v in manifest.videos)
    reasons = {q.path: q.reason for q in manifest.quarantined}
    assert reasons == {
        "Alpha/v_Alpha_g10_c01.avi": "listed in trainlist01.txt but missing",
        "Alpha/v_Alpha_g02_c01.avi": "label '1' in trainlist01.txt line 4 disagrees with classInd.txt (Alpha is 2)",
        "Stray/v_Stray_g01_c01.avi": "class folder 'Stray' is not in classInd.txt",
    }

    (lists / "testlist01.txt").unlink()
    with pytest.raises(EsspError, match="found trainlist01.txt but not testlist01.txt"):
        ingest_directory(settings, root, "ucf")


def test_split_rules_without_lists(settings, tmp_path):
    root = tmp_path / "plain"
    for g in range(1, 26):  # UCF-101's 25 groups
        write_avi(root / "Grouped" / f"v_Grouped_g{g:02d}_c01.avi", 5 * g, frames=2)
    for n in range(10):
        write_avi(root / "Loose" / f"clip{n}.avi", 20 * n, frames=2)
    manifest, _ = ingest_directory(settings, root, "plain", split=2)
    test_groups = {int(i.split("_g")[1][:2]) for i in manifest.splits["test"] if i.startswith("Grouped/")}
    assert test_groups == set(range(8, 15))
    loose_test = [i for i in manifest.splits["test"] if i.startswith("Loose/")]
    assert len(loose_test) == 3  # 30% of 10 by a seeded hash of the names
    assert "UCF groups (split 2: groups 8-14 test)" in manifest.split_rule
    assert "hash of file names" in manifest.split_rule
    again, _ = ingest_directory(settings, root, "plain2", split=2)
    assert again.splits == manifest.splits  # deterministic

    with pytest.raises(EsspError, match="split 4: must be 1, 2 or 3"):
        ingest_directory(settings, root, "plain", split=4)
    with pytest.raises(EsspError, match="not a directory"):
        ingest_directory(settings, root / "nope", "plain")
    with pytest.raises(EsspError, match="no class folders with videos"):
        ingest_directory(settings, tmp_path / "plain" / "Grouped", "empty")


def test_dataset_commands(settings, tmp_path, monkeypatch):
    monkeypatch.setenv("ESSP_BUCKET_VIDEOS", settings.bucket_videos)
    runner = CliRunner()
    out = tmp_path / "cli"
    made = runner.invoke(dataset_app, ["synth", "--out", str(out), "--classes", "2", "--videos-per-class", "2",
                                       "--frames", "8", "--height", "32", "--width", "32", "--ingest",
                                       "--name", "clitest"])
    assert made.exit_code == 0, made.output
    assert f"manifest: s3://{settings.bucket_videos}/manifests/clitest/v0001.json" in made.output
    shown = runner.invoke(dataset_app, ["show", "clitest"])
    assert shown.exit_code == 0 and "clitest@1" in shown.output and "TranslateRight" in shown.output
    as_json = runner.invoke(dataset_app, ["show", "clitest@1", "--json"])
    assert Manifest.model_validate(json.loads(as_json.output)).name == "clitest"

    bad = runner.invoke(dataset_app, ["synth", "--out", str(tmp_path / "x"), "--height", "33"])
    assert bad.exit_code == 2 and "--height" in bad.output and "even" in bad.output
    bad = runner.invoke(dataset_app, ["ingest", str(out), "--split", "4"])
    assert bad.exit_code == 2 and "--split" in bad.output
    bad = runner.invoke(dataset_app, ["ingest", str(out), "--name", "no spaces"])
    assert bad.exit_code == 2 and "--name" in bad.output


def test_links_out_of_the_root_and_surprising_probe_errors_are_quarantined_not_fatal(settings, synth_dir, tmp_path,
                                                                                     monkeypatch):
    import essp.datasets.ingest as ingest_module

    root = tmp_path / "linked"
    shutil.copytree(synth_dir, root)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = outside / "v_TranslateLeft_g50_c01.mp4"
    shutil.copy(synth_dir / "TranslateLeft" / "v_TranslateLeft_g01_c01.mp4", secret)
    (root / "TranslateLeft" / "v_TranslateLeft_g51_c01.mp4").symlink_to(secret)  # a file linked out
    (root / "TranslateRight" / "v_TranslateRight_g52_c01.mp4").symlink_to(  # a link inside the root is fine
        root / "TranslateRight" / "v_TranslateRight_g01_c01.mp4")
    (root / "Elsewhere").symlink_to(outside, target_is_directory=True)  # a class folder linked out
    real_probe = ingest_module.probe_video

    def probe(data, name):  # a decoder's own error, not a VideoError, on one file
        if name == "TranslateUp/v_TranslateUp_g02_c01.mp4":
            raise RuntimeError("decoder state corrupted")
        return real_probe(data, name)

    monkeypatch.setattr(ingest_module, "probe_video", probe)
    manifest, _ = ingest_directory(settings, root, "linked")
    reasons = {q.path: q.reason for q in manifest.quarantined}
    assert reasons["TranslateLeft/v_TranslateLeft_g51_c01.mp4"].startswith(f"a link to {secret}, outside")
    assert reasons["Elsewhere/"].startswith(f"a link to {outside}, outside")
    assert reasons["TranslateUp/v_TranslateUp_g02_c01.mp4"] == "probe failed: RuntimeError: decoder state corrupted"
    assert "Elsewhere" not in manifest.classes and "v_TranslateLeft_g50_c01" not in str(manifest.videos)
    assert "TranslateRight/v_TranslateRight_g52_c01" in {v.id for v in manifest.videos}
    assert len(manifest.videos) == 12  # 12 copied - 1 probe failure + 1 link inside
    keys = ObjectStore(settings).list_keys(settings.bucket_videos, "linked/")
    assert not any("g50" in k or "g51" in k for k in keys)


def test_every_per_file_error_is_quarantined_with_its_reason(settings, synth_dir, tmp_path):
    """A folder, a FIFO and a broken link named like videos, an unreadable file, one too large to read
    whole, a text file: each is quarantined with its reason (none is read that should not be: a FIFO
    would block the read forever), the good videos are ingested. Root reads a chmod-000 file: as root, the
    ingest runs without the capabilities that let it (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    import os
    import subprocess
    import sys

    from essp.datasets.ingest import MAX_VIDEO_BYTES

    root = tmp_path / "odd"
    shutil.copytree(synth_dir, root)
    left = root / "TranslateLeft"
    (left / "v_TranslateLeft_g10_c01.avi").mkdir()
    os.mkfifo(left / "v_TranslateLeft_g10_c02.mp4")
    (left / "v_TranslateLeft_g10_c03.mp4").symlink_to(left / "gone.mp4")
    locked = left / "v_TranslateLeft_g10_c04.mp4"
    locked.write_bytes((left / "v_TranslateLeft_g01_c01.mp4").read_bytes())
    locked.chmod(0)
    with open(left / "v_TranslateLeft_g10_c05.mkv", "wb") as huge:  # sparse: no disk taken
        huge.truncate(MAX_VIDEO_BYTES + 2**30)
    (left / "v_TranslateLeft_g10_c06.mp4").write_text("#EXTM3U\n#EXTINF:2.0,\nhttp://127.0.0.1:9/a.ts\n")

    essp = [str(Path(sys.executable).parent / "essp"), "dataset", "ingest", str(root), "--name", "odd"]
    if os.geteuid() == 0:
        drop = "-dac_override,-dac_read_search"
        essp = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", *essp]
    done = subprocess.run(essp, env={**os.environ, **settings.as_env()}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = ManifestStore(settings).load("odd")
    reasons = {q.path.rsplit("_", 1)[-1]: q.reason for q in manifest.quarantined}
    assert reasons == {
        "c01.avi": "not a regular file (a directory): not read",
        "c02.mp4": "not a regular file (a FIFO): not read",
        "c03.mp4": f"not a regular file (a broken link to {left / 'gone.mp4'}): not read",
        "c04.mp4": "cannot read: Permission denied",
        "c05.mkv": "5.0 GiB, larger than ESSP ingests (4 GiB, read whole into memory): not read",
        "c06.mp4": "not a video: no container format recognised (text: an HLS/M3U playlist, 45 bytes; ESSP opens "
                   "MP4/MOV, AVI, Matroska/WebM, MPEG-TS, MPEG-PS, MPEG video, FLV, ASF/WMV, Ogg, raw H.264, "
                   "raw H.265)",
    }
    assert len(manifest.videos) == 12 and manifest.classes == ["TranslateLeft", "TranslateRight", "TranslateUp"]
