"""How the features are coded as uint8 (flow and frame differences: signed values quantised around 128,
clipped to a bound) and back, and a picture of a flow field. Re-exported by essp.dataplane.extractors."""

from __future__ import annotations

import math
import numbers

import cv2
import numpy as np


def quantise(values: np.ndarray, bound: float) -> np.ndarray:
    """Signed values -> uint8 codes around 128: clip to ±bound, ``floor(f * 127.5 / bound + 128)``.

    NaN (which no built-in method produces) would have no defined code; it is read as 0 motion.
    """
    _check_bound(bound)
    scaled = np.asarray(values, dtype=np.float32) * np.float32(127.5 / bound) + np.float32(128.0)
    # Clipping to [0, 255] before truncation is the same as clipping f to ±bound first: +bound gives
    # 255.5 (-> 255), -bound gives 0.5 (-> 0); truncation of non-negative values is floor.
    nan = np.isnan(scaled)
    if nan.any():  # (np.nan_to_num would cost 5x the whole quantisation)
        scaled[nan] = 128.0
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return scaled.astype(np.uint8)


def dequantise(codes: np.ndarray, bound: float) -> np.ndarray:
    """uint8 codes -> float32 values: ``(q - 127.5) * bound / 127.5`` (within half a step of the input)."""
    _check_bound(bound)
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise ValueError(f"quantised codes must be uint8, got dtype {codes.dtype}")
    return (codes.astype(np.float32) - np.float32(127.5)) * np.float32(bound / 127.5)


def dequantise_flow(q: np.ndarray, bound: float, *, stacked: bool = False) -> np.ndarray:
    """The ``flow`` feature (2L, H, W) uint8 -> float32 pixels per frame.

    Returns (L, 2, H, W) with ``[t, 0]`` the x and ``[t, 1]`` the y component of the flow from frame
    t to frame t+1, or (2L, H, W) in the stored order x1, y1, x2, y2, ... with ``stacked=True``.
    A leading batch axis is allowed: (N, 2L, H, W) -> (N, L, 2, H, W).
    """
    q = np.asarray(q)
    if q.ndim not in (3, 4) or q.shape[-3] % 2:
        raise ValueError(f"flow feature must be (2L, H, W) or (N, 2L, H, W) with an even channel count, "
                         f"got shape {q.shape}")
    flow = dequantise(q, bound)
    if stacked:
        return flow
    *lead, channels, height, width = flow.shape
    return flow.reshape(*lead, channels // 2, 2, height, width)


def _check_bound(bound: float) -> None:
    if isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not math.isfinite(bound) or bound <= 0:
        raise ValueError(f"quantisation bound {bound!r} is not valid: it must be a finite number > 0")


def flow_to_rgb(flow: np.ndarray, max_magnitude: float | None = None) -> np.ndarray:
    """A flow field as an image (the usual HSV colour wheel): hue = direction, brightness = speed.

    ``flow`` is float (H, W, 2) or (2, H, W), in pixels (dequantise first). Brightness is scaled so
    that ``max_magnitude`` (default: the largest magnitude present) is full. Returns uint8 RGB (H, W, 3).
    """
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim == 3 and flow.shape[0] == 2 and flow.shape[-1] != 2:
        flow = flow.transpose(1, 2, 0)
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise ValueError(f"flow must be (H, W, 2) or (2, H, W), got shape {flow.shape}")
    magnitude, angle = cv2.cartToPolar(np.ascontiguousarray(flow[..., 0]), np.ascontiguousarray(flow[..., 1]),
                                       angleInDegrees=True)
    top = float(magnitude.max()) if max_magnitude is None else float(max_magnitude)
    hsv = np.empty(flow.shape[:2] + (3,), np.uint8)
    hsv[..., 0] = (angle / 2).astype(np.uint8)  # OpenCV's 8-bit hue runs 0..179
    hsv[..., 1] = 255
    hsv[..., 2] = np.clip(magnitude * (255.0 / top if top > 0 else 0.0), 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
