"""A synthetic labelled video dataset whose classes are told apart by motion.

Each video shows a textured object over a textured background; the class is the object's motion
(translation in one of four directions, rotation either way, zoom in or out, horizontal or vertical
oscillation, ...). Appearance carries a weak, overlapping class cue (the object's shape and colour
are drawn from class-dependent distributions), so an RGB-only model learns above chance but a
motion (optical flow) stream is needed to do well. Clips of one group share their object (shape,
tint, texture), as UCF-101's groups share the actor; backgrounds are drawn per clip from one
distribution for every class, so they carry no class cue; the train/test split is by group.

Written as H.264 MP4 with a fixed keyframe interval in UCF-101's layout (class folders, classInd.txt,
trainlist01.txt, testlist01.txt), so `essp dataset ingest` reads it like the real dataset.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np
from av.video.reformatter import Interpolation

# Each class is one named motion; `classes=N` takes the first N.
MOTIONS: tuple[str, ...] = (
    "TranslateLeft", "TranslateRight", "TranslateUp", "TranslateDown", "RotateCW", "RotateCCW",
    "ZoomIn", "ZoomOut", "OscillateHorizontal", "OscillateVertical",
)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "hexagon", "star", "cross", "ring")
# Probability that an object takes its class's preferred shape (otherwise any shape, uniformly).
SHAPE_CUE = 0.5
# Spread of the object's hue around its class's hue, as a fraction of the colour wheel.
HUE_SPREAD = 0.06


class SynthParamError(ValueError):
    """A bad parameter of :func:`synthesize`; `param` names it (the CLI turns it into its option)."""

    def __init__(self, param: str, message: str) -> None:
        self.param = param
        self.message = message
        super().__init__(f"{param}: {message}")


@dataclass(frozen=True)
class SynthResult:
    out_dir: Path
    classes: list[str]
    train: list[str]  # paths relative to out_dir, "Class/v_Class_g01_c01.mp4"
    test: list[str]
    videos: int


def _validate(classes: int, videos_per_class: int, frames: int, height: int, width: int, fps: int, keyint: int,
              test_fraction: float) -> None:
    if not 2 <= classes <= len(MOTIONS):
        raise SynthParamError("classes", f"must be between 2 and {len(MOTIONS)}, got {classes}")
    if videos_per_class < 2:
        raise SynthParamError("videos_per_class", f"must be at least 2 (one train, one test), got {videos_per_class}")
    if frames < 2:
        raise SynthParamError("frames", f"must be at least 2, got {frames}")
    for param, value in (("height", height), ("width", width)):
        # yuv420p halves the chroma planes: odd sizes cannot be encoded.
        if value < 16 or value % 2:
            raise SynthParamError(param, f"must be an even number >= 16, got {value}")
    if fps < 1:
        raise SynthParamError("fps", f"must be at least 1, got {fps}")
    if keyint < 1:
        raise SynthParamError("keyint", f"must be at least 1, got {keyint}")
    if not 0 < test_fraction < 1:
        raise SynthParamError("test_fraction", f"must be between 0 and 1 (exclusive), got {test_fraction}")


def _texture(rng: np.random.Generator, height: int, width: int, colours: np.ndarray) -> np.ndarray:
    """Noise blurred at two random scales, mapped between random colours: float32 (H, W, 3) in 0..255."""
    field = np.zeros((height, width), np.float32)
    for weight, (low, high) in ((1.0, (2.0, 8.0)), (0.5, (0.6, 2.0))):
        noise = rng.standard_normal((height, width)).astype(np.float32)
        field += weight * cv2.GaussianBlur(noise, (0, 0), float(rng.uniform(low, high)))
    field -= field.min()
    field /= max(float(field.max()), 1e-6)
    # Piecewise-linear map through the colours: contrast structure that optical flow can follow.
    stops = np.linspace(0.0, 1.0, len(colours))
    out = np.empty((height, width, 3), np.float32)
    for channel in range(3):
        out[..., channel] = np.interp(field, stops, colours[:, channel])
    return out


def _hsv_colour(hue: float, saturation: float, value: float) -> np.ndarray:
    pixel = np.array([[[hue * 180.0, saturation * 255.0, value * 255.0]]], np.float32)
    return cv2.cvtColor(pixel.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _shape_mask(shape: str, size: int) -> np.ndarray:
    """A float32 (size, size) mask in 0..1 of the shape, centred, anti-aliased."""
    mask = np.zeros((size, size), np.uint8)
    c, r = size / 2, size * 0.46
    shift = 4  # sub-pixel (fixed point) coordinates: smooth edges
    f = 1 << shift

    def poly(points: list[tuple[float, float]]) -> None:
        pts = np.array([[(c + x * r) * f, (c + y * r) * f] for x, y in points], np.int32)
        cv2.fillPoly(mask, [pts], 255, cv2.LINE_AA, shift)

    def regular(n: int, start: float = -math.pi / 2) -> list[tuple[float, float]]:
        return [(math.cos(start + 2 * math.pi * k / n), math.sin(start + 2 * math.pi * k / n)) for k in range(n)]

    if shape == "circle":
        cv2.circle(mask, (int(c * f), int(c * f)), int(r * f), 255, -1, cv2.LINE_AA, shift)
    elif shape == "ring":
        cv2.circle(mask, (int(c * f), int(c * f)), int(r * 0.8 * f), 255, int(r * 0.4), cv2.LINE_AA, shift)
    elif shape == "square":
        poly([(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)])
    elif shape == "triangle":
        poly(regular(3))
    elif shape == "diamond":
        poly([(0, -1), (0.7, 0), (0, 1), (-0.7, 0)])
    elif shape == "hexagon":
        poly(regular(6))
    elif shape == "star":
        outer, inner = regular(5), regular(5, -math.pi / 2 + math.pi / 5)
        poly([p for pair in zip(outer, [(x * 0.45, y * 0.45) for x, y in inner], strict=True) for p in pair])
    elif shape == "cross":
        poly([(-0.3, -1), (0.3, -1), (0.3, 1), (-0.3, 1)])
        poly([(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)])
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask.astype(np.float32) / 255.0


def _trajectory(motion: str, rng: np.random.Generator, frames: int, height: int,
                width: int) -> list[tuple[float, float, float, float]]:
    """(centre x, centre y, angle in degrees, scale) per frame, random within the class's ranges."""
    t = np.arange(frames, dtype=np.float64)
    span = max(frames - 1, 1)
    cx = width / 2 + rng.uniform(-0.1, 0.1) * width
    cy = height / 2 + rng.uniform(-0.1, 0.1) * height
    angle0 = float(rng.uniform(0, 360))  # orientation at rest carries no class information
    scale = np.full(frames, rng.uniform(0.8, 1.1))
    angle = np.full(frames, angle0)
    x, y = np.full(frames, cx), np.full(frames, cy)
    if motion.startswith("Translate"):
        dx, dy = {"Left": (-1, 0), "Right": (1, 0), "Up": (0, -1), "Down": (0, 1)}[motion[len("Translate"):]]
        travel = rng.uniform(0.35, 0.6) * (width if dx else height)  # the path is centred on the frame
        along = (t / span - 0.5) * travel
        x, y = cx + dx * along, cy + dy * along
    elif motion.startswith("Rotate"):
        step = rng.uniform(3.0, 8.0) * (1 if motion == "RotateCCW" else -1)  # OpenCV: positive is CCW
        angle = angle0 + step * t
    elif motion.startswith("Zoom"):
        small, factor = rng.uniform(0.45, 0.65), rng.uniform(1.8, 2.4)
        ratio = t / span if motion == "ZoomIn" else 1 - t / span
        scale = small * factor ** ratio
    elif motion.startswith("Oscillate"):
        amplitude = rng.uniform(0.15, 0.25) * (width if motion.endswith("Horizontal") else height)
        period, phase = rng.uniform(10.0, 20.0), rng.uniform(0, 2 * math.pi)
        wave = amplitude * np.sin(2 * math.pi * t / period + phase)
        if motion.endswith("Horizontal"):
            x = cx + wave
        else:
            y = cy + wave
    else:
        raise ValueError(f"unknown motion {motion!r}")
    return [(float(x[i]), float(y[i]), float(angle[i]), float(scale[i])) for i in range(frames)]


def render_clip(class_index: int, classes: int, group: int, clip: int, *, frames: int, height: int, width: int,
                seed: int) -> np.ndarray:
    """The frames of one clip, uint8 RGB (frames, H, W, 3); the same arguments give the same frames."""
    motion = MOTIONS[class_index]
    # Clips of one group share the object, its shape, tint and texture (UCF-101's groups share the
    # actor), so no test clip's object was seen in training. The background is drawn per clip from a
    # distribution that is the same for every class: it carries no class cue, and a model that
    # memorises the training backgrounds (easy with a few videos) meets test backgrounds of the same
    # kind rather than ones far outside what it saw.
    actor = np.random.default_rng([seed, class_index, group, 0])
    rng = np.random.default_rng([seed, class_index, group, clip, 1])
    # Greyish backgrounds (each stop a grey level with a slight cast): the object's tint is the
    # saturated colour of the frame.
    grey = rng.uniform(40, 215, (3, 1))
    background = _texture(rng, height, width, grey + rng.uniform(-12, 12, (3, 3)))

    size = int(0.45 * min(height, width)) | 1  # odd: the texture has a centre pixel to turn about
    shape = (SHAPES[class_index % len(SHAPES)] if actor.random() < SHAPE_CUE
             else SHAPES[actor.integers(len(SHAPES))])
    hue = (class_index / classes + actor.normal(0, HUE_SPREAD)) % 1.0
    tint = _hsv_colour(hue, actor.uniform(0.5, 1.0), actor.uniform(0.6, 1.0))
    texture = _texture(actor, size, size, np.stack([0.5 * tint, tint, (tint + 255) / 2, 0.75 * tint]))
    mask = _shape_mask(shape, size)

    out = np.empty((frames, height, width, 3), np.uint8)
    for i, (x, y, angle, scale) in enumerate(_trajectory(motion, rng, frames, height, width)):
        warp = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
        warp[:, 2] += (x - size / 2, y - size / 2)
        obj = cv2.warpAffine(texture, warp, (width, height), flags=cv2.INTER_LINEAR)
        alpha = cv2.warpAffine(mask, warp, (width, height), flags=cv2.INTER_LINEAR)[..., None]
        out[i] = np.clip(background + alpha * (obj - background) + 0.5, 0, 255)
    return out


_BITEXACT = Interpolation.BILINEAR | Interpolation.BITEXACT


def write_mp4(path: Path, frames: np.ndarray, *, fps: int, keyint: int) -> None:
    """H.264 MP4, yuv420p, a keyframe exactly every `keyint` frames, moov first (faststart).

    Written to a temporary name and renamed, so an interrupted run leaves no half-written video.
    """
    partial = path.with_name(path.name + ".partial")
    height, width = frames.shape[1:3]
    try:
        with av.open(str(partial), "w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            # sc_threshold=0: no extra keyframes at "scene cuts", so the interval stays fixed. asm=0:
            # x264's assembly made the bytes of the same frames differ now and then on a busy machine
            # (never with the C code); veryfast keeps the C code quick.
            stream.codec_context.options = {"g": str(keyint), "keyint_min": str(keyint), "sc_threshold": "0",
                                            "preset": "veryfast", "crf": "18", "threads": "1",
                                            "x264-params": "asm=0"}
            for frame in frames:
                yuv = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(
                    format="yuv420p", interpolation=_BITEXACT, threads=1)  # the same on every CPU
                container.mux(stream.encode(yuv))
            container.mux(stream.encode(None))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def synthesize(out_dir: Path, *, classes: int = 6, videos_per_class: int = 10, frames: int = 48, height: int = 112,
               width: int = 112, fps: int = 25, keyint: int = 12, seed: int = 0, test_fraction: float = 0.3,
               progress: Callable[[int, int], None] | None = None) -> SynthResult:
    """Write the dataset under `out_dir` (UCF-101 layout) and return its classes and split lists.

    Videos are numbered in groups of two clips (one per group when a class has fewer than 4); the
    first round(groups * test_fraction) groups of each class are the test split, at least one and
    never all, so every class is in both splits.
    """
    _validate(classes, videos_per_class, frames, height, width, fps, keyint, test_fraction)
    out_dir = Path(out_dir)
    names = list(MOTIONS[:classes])
    per_group = 2 if videos_per_class >= 4 else 1
    groups = math.ceil(videos_per_class / per_group)
    test_groups = min(max(round(groups * test_fraction), 1), groups - 1)
    train: list[str] = []
    test: list[str] = []
    total = classes * videos_per_class
    done = 0
    for class_index, name in enumerate(names):
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        for k in range(videos_per_class):
            group, clip = k // per_group + 1, k % per_group + 1
            rel = f"{name}/v_{name}_g{group:02d}_c{clip:02d}.mp4"
            clip_frames = render_clip(class_index, classes, group, clip, frames=frames, height=height,
                                      width=width, seed=seed)
            write_mp4(out_dir / rel, clip_frames, fps=fps, keyint=keyint)
            (test if group <= test_groups else train).append(rel)
            done += 1
            if progress:
                progress(done, total)
    (out_dir / "classInd.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(names, 1)))
    labels = {n: i for i, n in enumerate(names, 1)}
    (out_dir / "trainlist01.txt").write_text("".join(f"{r} {labels[r.split('/')[0]]}\n" for r in train))
    (out_dir / "testlist01.txt").write_text("".join(f"{r}\n" for r in test))
    return SynthResult(out_dir=out_dir, classes=names, train=train, test=test, videos=total)
