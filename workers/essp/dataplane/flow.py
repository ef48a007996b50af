"""The optical-flow algorithms behind the flow-family extractors (``flow``, ``flow_bi``, ``warped_flow``) and
the camera-motion estimate of warped flow. Pure compute on grey frames (OpenCV and NumPy only); the extractor
classes, which register, are in :mod:`essp.dataplane.extractors`, which re-exports :data:`FLOW_METHODS`."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

FLOW_METHODS = ("dis_ultrafast", "dis_fast", "dis_medium", "farneback", "tvl1")
_DIS_PRESETS = {
    "dis_ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "dis_fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "dis_medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
# Farneback: the parameters of OpenCV's own sample (pyramid halves 3 times, 15 px window).
_FARNEBACK = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2,
              "flags": 0}
# TV-L1: OpenCV's defaults (5 scales 0.8 apart, 5 warps, 30 inner x 10 outer iterations). Cheaper
# settings were measured and rejected: 3 warps (-30% time) misses a 5 px shift on 64x64 by 1.4 px,
# 3 scales (-20%) misses 6 px shifts by 2-4 px. TV-L1 is the accurate reference, not the fast path.

# Camera motion (warped flow): corners tracked from frame t to t+1 by pyramidal Lucas-Kanade, a homography
# fitted to the tracks by RANSAC. Fewer tracks or inliers than MIN_MATCHES: no reliable estimate, identity.
# Corners closer to the border than half the LK window are not tracked: their window reads replicated border
# pixels, which biased a 3 px shift's homography (128x128) by 0.20 px at the frame's corners (0.07 without them).
MIN_MATCHES = 12
RANSAC_THRESHOLD_PX = 1.0
_CORNERS = {"qualityLevel": 0.01, "minDistance": 7, "blockSize": 7}
# LK with a 15 px window on 3 pyramid levels follows shifts of ~25 px (7 px at quarter resolution); at 224x224
# its 100 tracks take 0.7 ms, a 21 px window on 4 levels twice that for no better homography on shifts <= 8 px.
_LK = {"winSize": (15, 15), "maxLevel": 2,
       "criteria": (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01)}


def flow_algorithm(method: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A function (gray t, gray t+1) -> float32 (H, W, 2) flow; the OpenCV object is made once here."""
    if method in _DIS_PRESETS:
        dis = cv2.DISOpticalFlow_create(_DIS_PRESETS[method])
        finest_scale = dis.getFinestScale()

        def dis_flow(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
            # DIS lowers its finest scale for a frame too small for the preset and never raises it
            # again: after one small frame the instance would run ~15x slower (and give different
            # flow) on every later frame. Restore the preset's scale before each pair.
            dis.setFinestScale(finest_scale)
            return dis.calc(prev, nxt, None)

        return dis_flow
    if method == "farneback":
        return lambda prev, nxt: cv2.calcOpticalFlowFarneback(prev, nxt, None, **_FARNEBACK)
    if method == "tvl1":
        tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
        return lambda prev, nxt: tvl1.calc(prev, nxt, None)
    raise ValueError(f"flow method {method!r} is not one of {', '.join(FLOW_METHODS)}")


def camera_motion(prev: np.ndarray, nxt: np.ndarray, max_features: int) -> np.ndarray:
    """The homography H (3x3 float64) that maps a point of grey frame ``prev`` to where the camera's
    motion puts it in ``nxt`` (``x_nxt ~ H x_prev``): up to ``max_features`` Shi-Tomasi corners of
    ``prev`` tracked into ``nxt`` by pyramidal Lucas-Kanade, H fitted by RANSAC (1 px), so that what moves
    on its own (a small object) is left out as outliers. The identity when there are fewer than
    :data:`MIN_MATCHES` tracks or inliers (a flat frame, a cut)."""
    identity = np.eye(3)
    margin = _LK["winSize"][0] // 2
    mask = None
    if min(prev.shape[:2]) > 4 * margin:  # a frame too small to leave a margin uses all of it
        mask = np.zeros(prev.shape[:2], np.uint8)
        mask[margin:-margin, margin:-margin] = 255
    corners = cv2.goodFeaturesToTrack(prev, max_features, mask=mask, **_CORNERS)
    if corners is None or len(corners) < MIN_MATCHES:
        return identity
    tracked, status, _ = cv2.calcOpticalFlowPyrLK(prev, nxt, corners, None, **_LK)
    found = status.ravel() == 1
    if int(found.sum()) < MIN_MATCHES:
        return identity
    homography, inliers = cv2.findHomography(corners[found], tracked[found], cv2.RANSAC, RANSAC_THRESHOLD_PX)
    if homography is None or inliers is None or int(inliers.sum()) < MIN_MATCHES:
        return identity
    return homography


def stabilise(nxt: np.ndarray, homography: np.ndarray) -> np.ndarray:
    """``nxt`` warped back onto the previous frame by the inverse of ``homography`` (:func:`camera_motion`):
    pixel x of the result is ``nxt`` at ``H x``, so the camera's motion is gone; the border is replicated."""
    height, width = nxt.shape[:2]
    return cv2.warpPerspective(nxt, homography, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_REPLICATE)
