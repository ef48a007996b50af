"""A test-only extractor plugin (loaded by workers through ESSP_EXTRACTOR_MODULES): the rgb middle frame,
except that about a quarter of the samples make OpenCV raise its own error (cv2.error), as a real
extractor does on input it cannot handle."""

from __future__ import annotations

import zlib

import cv2
import numpy as np

from essp.dataplane.extractors import FeatureExtractor, register_extractor


@register_extractor
class FlakyExtractor(FeatureExtractor):
    kind = "flaky"
    description = "test only: the middle frame, or cv2.error for about a quarter of the samples"

    def extract(self, frames: np.ndarray) -> np.ndarray:
        frames = self.check_frames(frames)
        if zlib.crc32(frames.tobytes()) % 4 == 0:
            cv2.resize(np.zeros((0, 0), np.uint8), (4, 4))  # raises cv2.error
        return np.ascontiguousarray(frames[frames.shape[0] // 2].transpose(2, 0, 1))
