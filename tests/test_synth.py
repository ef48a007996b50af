"""The synthetic dataset: layout and split lists, determinism, probe facts, and classes that differ
by motion (measured with optical flow on the decoded videos)."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from essp.datasets.synth import MOTIONS, SynthParamError, synthesize
from essp.datasets.video import decode_segment, probe_video

PARAMS = dict(classes=8, videos_per_class=4, frames=16, height=64, width=64, fps=25, keyint=8, seed=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    calls = []
    result = synthesize(out, **PARAMS, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (32, 32) and len(calls) == 32
    return result


def test_layout_and_lists(dataset):
    out = dataset.out_dir
    assert dataset.classes == list(MOTIONS[:8]) and dataset.videos == 32
    assert (out / "classInd.txt").read_text().splitlines() == [f"{i} {c}" for i, c in enumerate(MOTIONS[:8], 1)]
    on_disk = sorted(str(p.relative_to(out)) for p in out.glob("*/*.mp4"))
    assert len(on_disk) == 32
    assert all(re.fullmatch(r"(\w+)/v_\1_g\d\d_c\d\d\.mp4", p) for p in on_disk), on_disk
    assert not list(out.rglob("*.partial"))
    train = [line.split() for line in (out / "trainlist01.txt").read_text().splitlines()]
    test = (out / "testlist01.txt").read_text().split()
    assert all(int(label) == MOTIONS.index(path.split("/")[0]) + 1 for path, label in train)
    train_paths = [path for path, _ in train]
    assert sorted(train_paths + test) == on_disk and not set(train_paths) & set(test)
    assert train_paths == dataset.train and test == dataset.test


def test_every_class_in_both_splits_and_groups_not_split(dataset):
    def groups(paths):
        return {(p.split("/")[0], re.search(r"_g(\d+)_", p).group(1)) for p in paths}

    assert {p.split("/")[0] for p in dataset.train} == set(dataset.classes)
    assert {p.split("/")[0] for p in dataset.test} == set(dataset.classes)
    assert not groups(dataset.train) & groups(dataset.test)  # clips of a group share a background


def test_probe_facts(dataset):
    for rel in dataset.train[:6] + dataset.test[:6]:
        data = (dataset.out_dir / rel).read_bytes()
        info = probe_video(data, rel)
        assert (info.frames, info.width, info.height, info.fps) == (16, 64, 64, 25.0), rel
        assert info.codec == "h264" and info.keyframe_interval == 8, rel


def test_deterministic(dataset, tmp_path):
    again = synthesize(tmp_path / "again", **PARAMS)
    for rel in dataset.train + dataset.test:
        assert (dataset.out_dir / rel).read_bytes() == (again.out_dir / rel).read_bytes(), rel
    other = synthesize(tmp_path / "other", **{**PARAMS, "seed": 4, "classes": 2, "videos_per_class": 2})
    rel = other.train[0]
    assert (dataset.out_dir / rel).read_bytes() != (other.out_dir / rel).read_bytes()


def mean_flow(path: Path) -> np.ndarray:
    """Farneback flow (H, W, 2) averaged over the clip's frame pairs."""
    frames = decode_segment(path.read_bytes(), path.name, 0, 16)
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    return np.mean([cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 9, 3, 5, 1.1, 0)
                    for a, b in zip(gray, gray[1:], strict=False)], axis=0)


def videos(dataset, motion):
    return [dataset.out_dir / p for p in dataset.train + dataset.test if p.startswith(motion + "/")]


@pytest.mark.parametrize(("motion", "axis", "sign"), [
    ("TranslateLeft", 0, -1), ("TranslateRight", 0, 1), ("TranslateUp", 1, -1), ("TranslateDown", 1, 1),
])
def test_translation_direction_shows_in_flow(dataset, motion, axis, sign):
    for path in videos(dataset, motion):
        flow = mean_flow(path)
        assert sign * flow[..., axis].mean() > 0.05, (path.name, flow[..., axis].mean())
        assert abs(flow[..., axis].mean()) > 2 * abs(flow[..., 1 - axis].mean()), path.name


def rotation_and_divergence(flow: np.ndarray) -> tuple[float, float]:
    """Around the frame's centre: mean cross (rotation, >0 clockwise on screen) and dot (expansion)."""
    h, w = flow.shape[:2]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x -= w / 2
    y -= h / 2
    return float((x * flow[..., 1] - y * flow[..., 0]).mean()), float((x * flow[..., 0] + y * flow[..., 1]).mean())


def test_rotation_and_zoom_show_in_flow(dataset):
    for motion, check in [("RotateCW", lambda r, d: r > 0), ("RotateCCW", lambda r, d: r < 0),
                          ("ZoomIn", lambda r, d: d > 0), ("ZoomOut", lambda r, d: d < 0)]:
        for path in videos(dataset, motion):
            rotation, divergence = rotation_and_divergence(mean_flow(path))
            assert check(rotation, divergence), (path.name, rotation, divergence)


def test_bad_parameters_name_themselves(tmp_path):
    for kwargs, param in [(dict(classes=1), "classes"), (dict(classes=len(MOTIONS) + 1), "classes"),
                          (dict(videos_per_class=1), "videos_per_class"), (dict(height=63), "height"),
                          (dict(width=8), "width"), (dict(test_fraction=1.0), "test_fraction"),
                          (dict(keyint=0), "keyint")]:
        with pytest.raises(SynthParamError, match=f"^{param}: ") as caught:
            synthesize(tmp_path, **kwargs)
        assert caught.value.param == param
    assert not list(tmp_path.iterdir())  # nothing written before the check
