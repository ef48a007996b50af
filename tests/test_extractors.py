"""Feature extractors: known motion, quantisation, shapes, and the open registry. Pure compute."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import cv2
import numpy as np
import pytest

from essp.dataplane import extractors as ex
from essp.dataplane.extractors import (
    EXTRACTOR_TABLE,
    ExtractorDeployment,
    ExtractorOptionError,
    ExtractorPluginError,
    FeatureExtractor,
    UnknownExtractor,
    create_extractor,
    dequantise,
    dequantise_flow,
    extractor_class,
    extractor_kinds,
    flow_to_rgb,
    load_extractor_plugins,
    plugin_modules_from_env,
    quantise,
    register_extractor,
    unregister_extractor,
)

BUILTIN = ["flow", "flow_bi", "framediff", "framestack", "rgb", "warped_flow"]

# Per-pair motion (dx, dy) in pixels, content moving right/down is positive: an integer shift, a
# sub-pixel one in other directions, then no motion. Different per pair so that a mixed-up channel
# order (x/y or pair order) or sign fails.
MOTIONS = [(3.0, -2.0), (-1.5, 0.5), (0.0, 0.0), (5.0, 4.0)]
# Test bound: small enough that the quantisation step (2*8/255 = 0.063 px) hardly hides an error.
TEST_BOUND = 8.0
# Median interior error, measured with OpenCV 5.0 over 16 textures x 2 random shifts of up to 6 px
# (128x128, TV-L1 64x64): DIS ultrafast/fast <= 0.25 px (they stop at a quarter-resolution scale),
# DIS medium <= 0.10, Farneback <= 0.08, TV-L1 <= 0.10. The tolerances below are 1.4-2x that, plus
# half a quantisation step; a wrong sign or swapped x/y on MOTIONS is off by >= 1 px.
METHOD_TOLERANCE = {"dis_ultrafast": 0.35, "dis_fast": 0.35, "dis_medium": 0.2, "farneback": 0.2, "tvl1": 0.2}
HALF_STEP = TEST_BOUND / 255


def _texture(size: int, seed: int = 0) -> np.ndarray:
    """Smoothed random noise scaled to 0..255 (float32): textured at every scale DIS/TV-L1 look at."""
    noise = np.random.default_rng(seed).random((size, size)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 2.0)
    return (smooth - smooth.min()) / (smooth.max() - smooth.min()) * 255


def _moving_frames(size: int, motions: list[tuple[float, float]]) -> np.ndarray:
    """len(motions)+1 RGB frames of a texture translated by motions[t] between frame t and t+1."""
    margin = 24
    canvas = _texture(size + 2 * margin)
    frames, px, py = [], 0.0, 0.0
    for step in [(0.0, 0.0), *motions]:
        px, py = px + step[0], py + step[1]
        # warpAffine maps src(x) to dst(x + p): the content moves by +p.
        moved = cv2.warpAffine(canvas, np.float32([[1, 0, px], [0, 1, py]]), canvas.shape[::-1],
                               flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
        crop = np.clip(moved[margin:margin + size, margin:margin + size], 0, 255).round().astype(np.uint8)
        frames.append(np.repeat(crop[..., None], 3, axis=2))
    return np.stack(frames)


@pytest.fixture
def clean_registry() -> Iterator[None]:
    """Whatever a test registers is gone afterwards; the table is restored as it was."""
    kinds, table = set(extractor_kinds()), dict(EXTRACTOR_TABLE)
    yield
    for kind in set(extractor_kinds()) - kinds:
        unregister_extractor(kind)
    EXTRACTOR_TABLE.clear()
    EXTRACTOR_TABLE.update(table)


# ------------------------------------------------------------------------------------------------
# Flow: known motion


@pytest.mark.parametrize("method", ex.FLOW_METHODS)
def test_flow_recovers_known_motion(method: str) -> None:
    size = 64 if method == "tvl1" else 128  # TV-L1 is ~50x slower than DIS
    frames = _moving_frames(size, MOTIONS)
    extractor = create_extractor("flow", {"method": method, "bound": TEST_BOUND})
    feature = extractor.extract(frames)
    assert feature.shape == (2 * len(MOTIONS), size, size)

    flow = dequantise_flow(feature, TEST_BOUND)  # (L, 2, H, W)
    border = 12  # content enters at the edges; the interior is fully seen in both frames
    for t, (dx, dy) in enumerate(MOTIONS):
        interior = flow[t, :, border:-border, border:-border]
        got = (float(np.median(interior[0])), float(np.median(interior[1])))
        tolerance = METHOD_TOLERANCE[method] + HALF_STEP
        assert got == pytest.approx((dx, dy), abs=tolerance), f"{method} pair {t}: flow {got}, shift {(dx, dy)}"


def test_flow_sign_and_channel_order() -> None:
    """Pure right motion lands in channel 0 (x) positive, pure down motion in channel 1 (y) positive."""
    frames = _moving_frames(96, [(2.0, 0.0), (0.0, 2.0)])
    feature = create_extractor("flow", {"method": "dis_fast", "bound": TEST_BOUND}).extract(frames)
    medians = [float(np.median(dequantise(channel[12:-12, 12:-12], TEST_BOUND))) for channel in feature]
    # x1, y1, x2, y2
    assert medians == pytest.approx([2.0, 0.0, 0.0, 2.0], abs=METHOD_TOLERANCE["dis_fast"] + HALF_STEP)


def test_flow_of_still_frames_is_zero() -> None:
    """No motion -> codes 128 (exact zero) or 127 (a method's -1e-6 noise): within a step of zero."""
    frames = np.repeat(_moving_frames(64, [(0.0, 0.0)])[:1], 3, axis=0)
    for method in ex.FLOW_METHODS:
        feature = create_extractor("flow", {"method": method}).extract(frames)
        assert set(np.unique(feature).tolist()) <= {127, 128}, method
        assert np.abs(dequantise_flow(feature, 20.0)).max() <= 20.0 / 255 + 1e-6, method


@pytest.mark.parametrize("method", ["dis_ultrafast", "dis_fast", "dis_medium"])
def test_flow_does_not_depend_on_earlier_frame_sizes(method: str) -> None:
    """A small stack first must not change (or slow down) the flow of later, larger stacks: OpenCV's DIS
    lowers its finest scale for a small frame and keeps it lowered unless the extractor resets it."""
    frames = _moving_frames(128, MOTIONS[:2])
    fresh = create_extractor("flow", {"method": method}).extract(frames)
    reused = create_extractor("flow", {"method": method})
    reused.extract(_random_frames(2, 24, 24))
    np.testing.assert_array_equal(reused.extract(frames), fresh)


def test_flow_pairs_unquantised_matches_extract() -> None:
    frames = _moving_frames(64, MOTIONS[:2])
    extractor = create_extractor("flow", {"method": "dis_fast", "bound": TEST_BOUND})
    pairs = extractor.flow_pairs(frames)  # (L, H, W, 2)
    assert pairs.shape == (2, 64, 64, 2) and pairs.dtype == np.float32
    stacked = pairs.transpose(0, 3, 1, 2).reshape(4, 64, 64)
    np.testing.assert_array_equal(quantise(stacked, TEST_BOUND), extractor.extract(frames))


# ------------------------------------------------------------------------------------------------
# The flow family (flow_bi, warped_flow) and the frame stack: known motion


def _interior_medians(field: np.ndarray, border: int = 12) -> tuple[float, float]:
    """Median (x, y) of a dequantised (2, H, W) field away from the edges, where content enters."""
    return (float(np.median(field[0, border:-border, border:-border])),
            float(np.median(field[1, border:-border, border:-border])))


@pytest.mark.parametrize("method", ["dis_fast", "farneback"])
def test_flow_bi_gives_the_forward_then_the_backward_motion(method: str) -> None:
    frames = _moving_frames(128, MOTIONS)
    length = len(MOTIONS)
    options = {"method": method, "bound": TEST_BOUND}
    feature = create_extractor("flow_bi", options).extract(frames)
    assert feature.shape == (4 * length, 128, 128)
    flow = dequantise_flow(feature, TEST_BOUND)  # (2L, 2, H, W): the L forward fields, then the L backward ones
    tolerance = METHOD_TOLERANCE[method] + HALF_STEP
    for t, (dx, dy) in enumerate(MOTIONS):
        assert _interior_medians(flow[t]) == pytest.approx((dx, dy), abs=tolerance), f"forward {t}"
        assert _interior_medians(flow[length + t]) == pytest.approx((-dx, -dy), abs=tolerance), f"backward {t}"
    # The forward half is the flow stream's feature itself.
    np.testing.assert_array_equal(feature[:2 * length], create_extractor("flow", options).extract(frames))


def _pan_with_object(size: int, camera: tuple[float, float], motion: tuple[float, float], pairs: int,
                     ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Grey frames of a textured background the camera pans over by ``camera`` per frame, with a textured
    48x48 object moving by ``motion`` per frame in the image; and the object's top-left corner per frame."""
    margin, side = 24, 48
    background, thing = _texture(size + 2 * margin), _texture(side, seed=5)
    frames, corners = [], []
    for t in range(pairs + 1):
        shift = np.float32([[1, 0, camera[0] * t], [0, 1, camera[1] * t]])
        moved = cv2.warpAffine(background, shift, background.shape[::-1], flags=cv2.INTER_CUBIC,
                               borderMode=cv2.BORDER_REFLECT)[margin:margin + size, margin:margin + size]
        x, y = 40 + motion[0] * t, 50 + motion[1] * t
        place = np.float32([[1, 0, x], [0, 1, y]])
        mask = cv2.warpAffine(np.ones((side, side), np.float32), place, (size, size))
        pasted = cv2.warpAffine(thing, place, (size, size), flags=cv2.INTER_CUBIC)
        frames.append(np.clip(moved * (1 - mask) + pasted * mask, 0, 255).round().astype(np.uint8))
        corners.append((int(x), int(y)))
    return np.stack(frames), corners


def test_camera_motion_is_the_shift_of_the_frame_and_identity_without_texture() -> None:
    gray = _moving_frames(128, MOTIONS[:1])[..., 0]
    homography = ex.camera_motion(gray[0], gray[1], 100)
    # The homography moves every point of the frame as the content moved (its 8 terms trade off a little: up to
    # 0.11 px at the frame's corners, less than DIS's own error).
    grid = np.stack(np.meshgrid(np.arange(12, 117, 8.0), np.arange(12, 117, 8.0)), axis=-1).reshape(-1, 1, 2)
    moved = cv2.perspectiveTransform(grid, homography) - grid
    assert np.abs(moved.reshape(-1, 2) - MOTIONS[0]).max() < 0.15
    flat = np.full((64, 64), 90, np.uint8)  # no corners to track: no estimate
    np.testing.assert_array_equal(ex.camera_motion(flat, flat, 100), np.eye(3))


def test_warped_flow_of_pure_camera_motion_is_zero() -> None:
    frames = _moving_frames(128, MOTIONS)
    feature = create_extractor("warped_flow", {"bound": TEST_BOUND}).extract(frames)
    assert feature.shape == (2 * len(MOTIONS), 128, 128)
    flow = dequantise_flow(feature, TEST_BOUND)
    for t in range(len(MOTIONS)):
        assert _interior_medians(flow[t]) == pytest.approx((0.0, 0.0), abs=0.1 + HALF_STEP), f"pair {t}"
        assert float(np.percentile(np.abs(flow[t, :, 12:-12, 12:-12]), 90)) < 0.2, f"pair {t}"
    # ... while the plain flow of the same stack is the motion.
    plain = dequantise_flow(create_extractor("flow", {"bound": TEST_BOUND}).extract(frames), TEST_BOUND)
    assert _interior_medians(plain[3]) == pytest.approx(MOTIONS[3], abs=METHOD_TOLERANCE["dis_fast"] + HALF_STEP)


@pytest.mark.parametrize("method", ["dis_medium", "farneback"])
def test_warped_flow_keeps_an_object_s_own_motion_over_a_panning_camera(method: str) -> None:
    camera, motion = (2.0, -1.0), (5.0, 2.0)  # the object's own motion is (3, 3)
    size = 160
    frames, corners = _pan_with_object(size, camera, motion, 3)
    feature = create_extractor("warped_flow", {"method": method, "bound": TEST_BOUND}).extract(frames)
    flow = dequantise_flow(feature, TEST_BOUND)
    tolerance = METHOD_TOLERANCE[method] + HALF_STEP
    for t, (x, y) in enumerate(corners[:-1]):
        inside = flow[t, :, y + 12:y + 36, x + 12:x + 36]  # the object's middle, away from its edges
        got = (float(np.median(inside[0])), float(np.median(inside[1])))
        assert got == pytest.approx((motion[0] - camera[0], motion[1] - camera[1]), abs=tolerance), f"pair {t}"
        background = np.ones((size, size), bool)
        background[y - 12:y + 60, x - 12:x + 60] = False  # the object and its surroundings
        background[:12], background[-12:], background[:, :12], background[:, -12:] = False, False, False, False
        still = (float(np.median(flow[t, 0][background])), float(np.median(flow[t, 1][background])))
        assert still == pytest.approx((0.0, 0.0), abs=0.1 + HALF_STEP), f"pair {t}"


def test_framestack_is_the_grey_frames() -> None:
    frames = _random_frames(5, 20, 30)
    gray = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])
    extractor = create_extractor("framestack")
    np.testing.assert_array_equal(extractor.extract(frames), gray[:4])  # the first L of the L+1 frames
    feature = extractor.extract(gray)
    np.testing.assert_array_equal(feature, gray[:4])
    assert feature.dtype == np.uint8 and feature.flags.c_contiguous and not np.shares_memory(feature, gray)
    assert extractor.output_shape(gray.shape) == extractor.output_shape(frames.shape) == (4, 20, 30)


@pytest.mark.parametrize("kind", ["flow_bi", "warped_flow"])
@pytest.mark.parametrize("options,named", [
    ({"method": "foo"}, "method='foo'"),
    ({"bound": -1}, "bound=-1"),
    ({"bound": 0}, "bound=0"),
    ({"bound": "20"}, "bound='20'"),
])
def test_flow_family_options_are_checked(kind: str, options: dict[str, Any], named: str) -> None:
    with pytest.raises(ExtractorOptionError) as info:
        create_extractor(kind, options)
    assert named in str(info.value) and kind in str(info.value)


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "200", None])
def test_warped_flow_max_features_is_a_positive_integer(value: Any) -> None:
    with pytest.raises(ExtractorOptionError, match=rf"max_features={value!r}.*an integer >= 1"):
        create_extractor("warped_flow", {"max_features": value})
    assert create_extractor("warped_flow", {"max_features": np.int64(50)}).options["max_features"] == 50
    with pytest.raises(ExtractorOptionError, match="no option 'max_features'"):
        create_extractor("flow_bi", {"max_features": 50})
    with pytest.raises(ExtractorOptionError, match="no option 'bound'"):
        create_extractor("framestack", {"bound": 3})


# ------------------------------------------------------------------------------------------------
# Quantisation


@pytest.mark.parametrize("bound", [20.0, 8.0, 3.7])
def test_quantisation_round_trip(bound: float) -> None:
    values = np.random.default_rng(1).uniform(-1.5 * bound, 1.5 * bound, 100_000).astype(np.float32)
    codes = quantise(values, bound)
    assert codes.dtype == np.uint8
    back = dequantise(codes, bound)
    assert back.dtype == np.float32
    step = 2 * bound / 255
    assert np.abs(back - np.clip(values, -bound, bound)).max() <= step / 2 + 1e-5
    # Every code is reachable and reads back to itself.
    np.testing.assert_array_equal(quantise(dequantise(np.arange(256, dtype=np.uint8), bound), bound),
                                  np.arange(256))


def test_quantisation_fixed_points() -> None:
    bound = 20.0
    values = np.array([0.0, bound, -bound, 2 * bound, -1e9, bound / 255 * 0.99, -bound / 255 * 1.01])
    np.testing.assert_array_equal(quantise(values, bound), [128, 255, 0, 255, 0, 128, 127])
    # The documented rule: round half up of (f + b) * 255 / (2b).
    f = np.linspace(-bound, bound, 1001)
    expected = np.floor((f + bound) * 255 / (2 * bound) + 0.5).clip(0, 255)
    assert np.abs(quantise(f, bound).astype(int) - expected).max() <= 1  # float32 vs float64 at ties
    assert dequantise(np.uint8([128]), bound)[0] == pytest.approx(bound / 255)


def test_dequantise_flow_layouts() -> None:
    q = np.random.default_rng(2).integers(0, 256, (6, 4, 5), dtype=np.uint8)
    pairs = dequantise_flow(q, 10.0)
    assert pairs.shape == (3, 2, 4, 5) and pairs.dtype == np.float32
    np.testing.assert_array_equal(pairs[1, 0], dequantise(q[2], 10.0))  # x of pair 2
    np.testing.assert_array_equal(pairs[1, 1], dequantise(q[3], 10.0))  # y of pair 2
    assert dequantise_flow(q, 10.0, stacked=True).shape == (6, 4, 5)
    assert dequantise_flow(q[None], 10.0).shape == (1, 3, 2, 4, 5)
    with pytest.raises(ValueError, match="even channel count"):
        dequantise_flow(q[:5], 10.0)
    with pytest.raises(ValueError, match="uint8"):
        dequantise(q.astype(np.int16), 10.0)
    with pytest.raises(ValueError, match="bound"):
        quantise(q, 0)


# ------------------------------------------------------------------------------------------------
# Shapes, dtypes, contiguity


def _random_frames(count: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(count * height + width).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


SHAPE_CASES = ([("rgb", {}), ("framediff", {}), ("framestack", {}), ("flow_bi", {}), ("warped_flow", {})]
               + [("flow", {"method": m}) for m in ex.FLOW_METHODS])


@pytest.mark.parametrize("kind,options", SHAPE_CASES, ids=[f"{k}-{o.get('method', '')}" for k, o in SHAPE_CASES])
@pytest.mark.parametrize("length,height,width", [(5, 48, 80), (10, 37, 53)])
def test_shapes_dtypes_contiguity(kind: str, options: dict[str, Any], length: int, height: int, width: int) -> None:
    extractor = create_extractor(kind, options)
    frames = _random_frames(length + 1, height, width)
    feature = extractor.extract(frames)
    expected = {"rgb": (3, height, width), "framediff": (length, height, width),
                "framestack": (length, height, width), "flow": (2 * length, height, width),
                "flow_bi": (4 * length, height, width), "warped_flow": (2 * length, height, width)}[kind]
    assert feature.shape == expected == extractor.output_shape(frames.shape)
    assert feature.dtype == np.uint8
    assert feature.flags.c_contiguous


def test_non_contiguous_frames_are_accepted() -> None:
    frames = _random_frames(4, 40, 60)
    view = frames[:, :, ::-1]  # a negative-stride view, as a flipped decode might give
    for kind in BUILTIN:
        extractor = create_extractor(kind)
        np.testing.assert_array_equal(extractor.extract(view), extractor.extract(np.ascontiguousarray(view)))


@pytest.mark.parametrize("kind", BUILTIN)
def test_bad_frames_are_rejected(kind: str) -> None:
    extractor = create_extractor(kind)
    with pytest.raises(ValueError, match="uint8"):
        extractor.extract(np.zeros((3, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(L\+1, H, W, 3\)"):
        extractor.extract(np.zeros((3, 8, 8, 2), np.uint8))
    if extractor.input_format != "gray":  # a grey stack is only for the extractors that ask for one
        with pytest.raises(ValueError, match=r"\(L\+1, H, W, 3\)"):
            extractor.extract(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"\(L\+1, H, W, 3\)"):
        extractor.output_shape((3, 8, 8, 4))
    if kind != "rgb":  # one frame has no pair
        with pytest.raises(ValueError, match="L\\+1 >= 2"):
            extractor.extract(np.zeros((1, 8, 8, 3), np.uint8))


@pytest.mark.parametrize("length,index", [(5, 2), (10, 5), (1, 0), (2, 1)])
def test_rgb_is_the_documented_middle_frame(length: int, index: int) -> None:
    frames = _random_frames(length + 1, 20, 30)
    feature = create_extractor("rgb").extract(frames)
    assert ex.RgbExtractor.frame_index(length + 1) == index == length // 2
    np.testing.assert_array_equal(feature, frames[index].transpose(2, 0, 1))
    assert feature[0, 3, 4] == frames[index, 3, 4, 0]  # channel 0 is R: no BGR swap


def test_framediff() -> None:
    constant = np.full((6, 16, 24, 3), 77, np.uint8)
    assert np.all(create_extractor("framediff").extract(constant) == 128)

    frames = _random_frames(4, 16, 24)
    feature = create_extractor("framediff", {"bound": 64}).extract(frames)
    gray = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]).astype(np.float32)
    diff = np.clip(gray[1:] - gray[:-1], -64, 64)
    assert np.abs(dequantise(feature, 64.0) - diff).max() <= 64 / 255 + 1e-4
    # Later frame brighter -> above 128.
    brighter = np.stack([np.full((8, 8, 3), 100, np.uint8), np.full((8, 8, 3), 110, np.uint8)])
    assert np.all(create_extractor("framediff").extract(brighter) > 128)


def test_flow_to_rgb() -> None:
    flow = np.zeros((2, 8, 8), np.float32)
    flow[0, :, 4:] = 3.0  # right half moves right
    image = flow_to_rgb(flow)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert np.all(image[:, :4] == 0) and np.all(image[:, 4:].max(axis=2) == 255)
    assert flow_to_rgb(flow.transpose(1, 2, 0)).tolist() == image.tolist()


# ------------------------------------------------------------------------------------------------
# Registry


def test_builtin_kinds_and_table() -> None:
    assert set(BUILTIN) <= set(extractor_kinds())
    for kind in extractor_kinds():
        row = EXTRACTOR_TABLE[kind]
        assert row.kind == kind and row.replicas >= 0
        assert row.image in (ex.CPU_IMAGE, ex.GPU_IMAGE) or "/" in row.image
        assert (row.gpu > 0) == (row.image == ex.GPU_IMAGE) or row.image not in (ex.CPU_IMAGE, ex.GPU_IMAGE)
    assert extractor_class("flow").kind == "flow"
    assert create_extractor("flow").options == {"method": "dis_fast", "bound": 20.0}
    assert create_extractor("framediff").options == {"bound": 64.0}
    assert create_extractor("rgb").options == {}
    assert create_extractor("flow_bi").options == {"method": "dis_fast", "bound": 20.0}
    assert create_extractor("warped_flow").options == {"method": "dis_fast", "bound": 20.0, "max_features": 100}
    assert create_extractor("framestack").options == {}


def test_resolve_image_uses_settings() -> None:
    class FakeSettings:
        image_worker_cpu = "registry.example/cpu:1"
        image_worker_gpu = "registry.example/gpu:1"

    settings: Any = FakeSettings()
    assert ex.resolve_image(ex.CPU_IMAGE, settings) == "registry.example/cpu:1"
    assert ex.resolve_image(ex.GPU_IMAGE, settings) == "registry.example/gpu:1"
    assert ex.resolve_image("ghcr.io/third/party:2", settings) == "ghcr.io/third/party:2"


def test_unknown_kind_lists_known_kinds() -> None:
    with pytest.raises(UnknownExtractor) as info:
        create_extractor("optical_flux")
    message = str(info.value)
    assert "optical_flux" in message and all(kind in message for kind in BUILTIN)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("options,named", [
    ({"method": "foo"}, "method='foo'"),
    ({"bound": -1}, "bound=-1"),
    ({"bound": float("nan")}, "bound=nan"),
    ({"bound": "20"}, "bound='20'"),
    ({"bound": True}, "bound=True"),
    ({"mehtod": "tvl1"}, "'mehtod'"),
])
def test_bad_options_are_named(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ExtractorOptionError) as info:
        create_extractor("flow", options)
    message = str(info.value)
    assert named in message and "flow" in message
    # ... and says what is allowed.
    assert "dis_fast" in message or "> 0" in message or "bound, method" in message
    with pytest.raises(ValueError, match="no option 'bound'"):
        create_extractor("rgb", {"bound": 3})


class _Brightness(FeatureExtractor):
    kind = "brightness"
    description = "mean brightness of each frame, one channel per frame"
    option_specs = {"scale": ex.OptionSpec(1.0, positive_number=True)}

    def extract(self, frames: np.ndarray) -> np.ndarray:
        frames = self.check_frames(frames)
        means = frames.mean(axis=(1, 2, 3)) * self.options["scale"]
        return np.ascontiguousarray(np.clip(means, 0, 255).astype(np.uint8)[:, None, None])


def test_registering_a_new_extractor(clean_registry: None) -> None:
    assert "brightness" not in extractor_kinds()
    assert register_extractor(_Brightness) is _Brightness
    assert "brightness" in extractor_kinds()
    assert register_extractor(_Brightness) is _Brightness  # same class again: harmless

    extractor = create_extractor("brightness", {"scale": 0.5})
    frames = np.stack([np.full((4, 6, 3), v, np.uint8) for v in (10, 200, 100)])
    np.testing.assert_array_equal(extractor.extract(frames)[:, 0, 0], [5, 100, 50])
    assert extractor.output_shape(frames.shape) == (3, 1, 1)  # the default: measured on black frames
    assert EXTRACTOR_TABLE["brightness"] == ExtractorDeployment("brightness", ex.CPU_IMAGE, 1, "1", "1Gi", 0)
    # The master scales a row without touching the class.
    EXTRACTOR_TABLE["brightness"] = replace(EXTRACTOR_TABLE["brightness"], replicas=3)
    assert EXTRACTOR_TABLE["brightness"].replicas == 3


def test_duplicate_and_invalid_registrations_are_rejected(clean_registry: None) -> None:
    class OtherFlow(_Brightness):
        kind = "flow"

    with pytest.raises(ValueError, match="'flow' is already registered by essp.dataplane.extractors.FlowExtractor"):
        register_extractor(OtherFlow)
    assert extractor_class("flow") is ex.FlowExtractor

    register_extractor(_Brightness)

    class Brightness2(_Brightness):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_extractor(Brightness2)

    class BadName(_Brightness):
        kind = "Bad-Name"

    with pytest.raises(ValueError, match="'Bad-Name' is not valid"):
        register_extractor(BadName)

    class Incomplete(FeatureExtractor):
        kind = "incomplete"
        description = "no extract"

    with pytest.raises(TypeError, match="does not implement extract"):
        register_extractor(Incomplete)
    assert "incomplete" not in extractor_kinds()
    assert "incomplete" not in EXTRACTOR_TABLE

    with pytest.raises(ValueError, match="replicas"):
        ExtractorDeployment("x", ex.CPU_IMAGE, -1, "1", "1Gi")
    with pytest.raises(ValueError, match="memory='lots'"):
        ExtractorDeployment("x", ex.CPU_IMAGE, 1, "1", "lots")


PLUGIN = '''
import numpy as np
from essp.dataplane.extractors import FeatureExtractor, GPU_IMAGE, register_extractor


@register_extractor
class Redness(FeatureExtractor):
    kind = "redness"
    description = "red channel of the first frame"
    image = GPU_IMAGE
    replicas = 2
    gpu = 1

    def output_shape(self, frames_shape):
        return (1, frames_shape[1], frames_shape[2])

    def extract(self, frames):
        frames = self.check_frames(frames)
        return np.ascontiguousarray(frames[0, :, :, 0][None])
'''


def test_load_extractor_plugins(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, clean_registry: None) -> None:
    module = "essp_test_plugin_redness"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(ex.PLUGIN_MODULES_ENV, f" {module} ,, ")
    try:
        assert plugin_modules_from_env() == [module]
        load_extractor_plugins(plugin_modules_from_env())
        assert "redness" in extractor_kinds()
        assert EXTRACTOR_TABLE["redness"] == ExtractorDeployment("redness", ex.GPU_IMAGE, 2, "1", "1Gi", 1)
        frames = _random_frames(3, 5, 7)
        feature = create_extractor("redness").extract(frames)
        np.testing.assert_array_equal(feature, frames[0, :, :, 0][None])
        load_extractor_plugins(module)  # already imported: no duplicate-registration error
    finally:
        sys.modules.pop(module, None)

    with pytest.raises(ExtractorPluginError, match="'essp_no_such_plugin_xyz'.*ModuleNotFoundError"):
        load_extractor_plugins(["essp_no_such_plugin_xyz"])


def test_grey_extractors_give_the_same_feature_from_a_grey_stack() -> None:
    import cv2

    frames = _random_frames(4, 40, 60)
    gray = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])
    for kind in BUILTIN:
        extractor = create_extractor(kind)
        if extractor.input_format != "gray":
            continue
        np.testing.assert_array_equal(extractor.extract(gray), extractor.extract(frames))
        assert extractor.output_shape(gray.shape) == extractor.output_shape(frames.shape)


def test_the_decoder_stores_grey_only_when_no_extractor_needs_colour() -> None:
    from essp.dataplane.extractors import frames_format

    assert frames_format({"flow": {"method": "dis_fast"}}) == "gray"
    assert frames_format({"flow": {}, "framediff": {}}) == "gray"
    assert frames_format({"flow_bi": {}, "warped_flow": {}, "framestack": {}}) == "gray"
    assert frames_format({"rgb": {}, "flow": {}}) == "rgb24"
    assert frames_format({"not_registered_here": {}}) == "rgb24"  # a plugin kind: colour, which all accept
    assert frames_format({}) == "rgb24"


def test_the_decoder_stores_colour_only_for_the_frames_that_need_it() -> None:
    from essp.dataplane.extractors import frames_layout

    assert frames_layout({"flow": {}}, 11) == (True, [])
    assert frames_layout({"rgb": {}, "flow": {}}, 11) == (True, [5])  # grey stack + the middle frame
    assert frames_layout({"rgb": {}}, 11) == (False, [5])  # that frame alone
    assert frames_layout({"rgb": {}, "framediff": {}}, 4) == (True, [1])
    assert frames_layout({"rgb": {}, "not_registered_here": {}}, 11) == (False, None)  # a plugin: the colour stack
    assert frames_layout({}, 11) == (False, None)


def test_extractors_give_the_same_feature_from_a_grey_stack_and_colour_frames() -> None:
    from essp.dataplane.extractors import MixedFrames, frames_layout

    rng = np.random.default_rng(4)
    rgb_stack = rng.integers(0, 255, (11, 24, 32, 3), dtype=np.uint8)
    gray = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb_stack])
    _, at = frames_layout({"rgb": {}, "flow": {}}, 11)
    mixed = MixedFrames(11, gray, {i: rgb_stack[i] for i in at})
    rgb, flow = create_extractor("rgb", {}), create_extractor("flow", {"method": "dis_fast"})
    np.testing.assert_array_equal(rgb.extract_stored(mixed), rgb.extract(rgb_stack))
    np.testing.assert_array_equal(flow.extract_stored(mixed), flow.extract(gray))
    np.testing.assert_array_equal(rgb.extract_stored(MixedFrames(11, None, mixed.colour)), rgb.extract(rgb_stack))
    with pytest.raises(ValueError, match="needs colour frame 5 of 11"):
        rgb.extract_stored(MixedFrames(11, gray, {}))
    with pytest.raises(ValueError, match="no grey stack"):
        flow.extract_stored(MixedFrames(11, None, mixed.colour))
    with pytest.raises(ValueError, match="needs the whole colour stack"):
        _whole_stack_extractor().extract_stored(mixed)


def _whole_stack_extractor():
    from essp.dataplane.extractors import FeatureExtractor

    class Everything(FeatureExtractor):  # not registered: reads every frame in colour
        kind = "everything"
        description = "test"

        def extract(self, frames):  # noqa: ANN001, ANN202
            return np.ascontiguousarray(frames.transpose(0, 3, 1, 2).reshape(-1, *frames.shape[1:3]))

    return Everything()
