"""Feature extractors behind an open registry (the paper's §3.3).

An extractor turns one decoded frame stack, uint8 RGB of shape ``(L+1, H, W, 3)``, into one
feature array: uint8, C-contiguous, channels first. Its registry name (``kind``) is also the name
of the stream the feature is delivered on: the payload goes to Redis under
``<prefix>:<run>:feat:<kind>:<sample>`` and the notice to Kafka ``<prefix>.<run>.e<epoch>.ready.<kind>``
(see :mod:`essp.contract`). Adding an extractor is a registration, not a change in the pipeline:

    @register_extractor
    class Brightness(FeatureExtractor):
        kind = "brightness"
        description = "mean brightness of every frame"
        def output_shape(self, frames_shape): ...
        def extract(self, frames): ...

The class attributes ``image``, ``replicas``, ``cpu``, ``memory`` and ``gpu`` become the master's
table entry (:data:`EXTRACTOR_TABLE`, extractor -> image -> replicas). Third-party extractors live in
plugin modules named by ``ESSP_EXTRACTOR_MODULES`` and are imported by
:func:`load_extractor_plugins`. See docs/extractors.md.

Quantisation (flow and frame differences) follows the two-stream convention: a signed value ``f`` is
clipped to ``[-bound, bound]`` and stored as ``q = floor((f + bound) * 255 / (2 * bound) + 0.5)``,
i.e. ``(f + bound) * 255 / (2 * bound)`` rounded half up, computed as
``floor(f * 127.5 / bound + 128)`` in float32 so that zero maps to exactly 128. ``-bound`` -> 0,
``+bound`` -> 255. :func:`dequantise` returns ``(q - 127.5) * bound / 127.5``: the step is
``2 * bound / 255`` and the round trip is within half a step of the clipped value (code 128, the
code of zero, reads back as ``+bound / 255``: an even number of levels has no exact zero).

This module never sets OpenCV's thread count: the worker process does that once (one thread per
process, workers scale out by processes). Extractor instances hold OpenCV algorithm objects and are
not thread-safe: use one instance per thread.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import cv2
import numpy as np

from essp.contract import STREAM_PATTERN

# The features' uint8 coding (essp.dataplane.coding), also this module's API: users import them from here.
from essp.dataplane.coding import dequantise as dequantise
from essp.dataplane.coding import dequantise_flow as dequantise_flow
from essp.dataplane.coding import flow_to_rgb as flow_to_rgb
from essp.dataplane.coding import quantise as quantise
from essp.dataplane.flow import FLOW_METHODS as FLOW_METHODS
from essp.dataplane.flow import camera_motion, flow_algorithm, stabilise
from essp.errors import EsspError
from essp.registry import Registry

if TYPE_CHECKING:
    from essp.settings import Settings

# Comma-separated module names whose import registers third-party extractors.
PLUGIN_MODULES_ENV = "ESSP_EXTRACTOR_MODULES"
# Logical image names of the table; resolve_image() maps them to the configured references.
CPU_IMAGE = "essp/worker-cpu"
GPU_IMAGE = "essp/worker-gpu"
DEFAULT_FLOW_BOUND = 20.0
DEFAULT_FRAMEDIFF_BOUND = 64.0

_CPU_QUANTITY = re.compile(r"^(\d+(\.\d+)?|\d+m)$")
_MEMORY_QUANTITY = re.compile(r"^\d+(\.\d+)?([KMGTPE]i?)?$")


class UnknownExtractor(EsspError, ValueError):
    """A kind that no registered extractor has."""


class ExtractorOptionError(EsspError, ValueError):
    """An option an extractor does not have, or a value it does not accept."""


class ExtractorPluginError(EsspError):
    """A plugin module named in ESSP_EXTRACTOR_MODULES that cannot be imported."""


# --------------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class OptionSpec:
    """One option of an extractor: its default and what it accepts."""

    default: Any
    choices: tuple[str, ...] | None = None  # a string option: one of these
    positive_number: bool = False  # a float option: finite and > 0
    positive_integer: bool = False  # an int option: >= 1
    help: str = ""

    def allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.positive_number:
            return "a finite number > 0"
        if self.positive_integer:
            return "an integer >= 1"
        return "any JSON value"

    def normalise(self, value: Any) -> Any:
        """The value as stored in ``options``; raises ValueError (without the option's name)."""
        if self.choices is not None:
            if not isinstance(value, str) or value not in self.choices:
                raise ValueError(self.allowed())
            return value
        if self.positive_number:
            # bool is an int to Python, but `bound=True` is surely a mistake.
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(self.allowed())
            if not math.isfinite(value) or value <= 0:
                raise ValueError(self.allowed())
            return float(value)
        if self.positive_integer:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(self.allowed())
            return int(value)
        return value


# --------------------------------------------------------------------------------------------------
# The extractor base class and the registry


@dataclass(frozen=True)
class ExtractorDeployment:
    """One row of the master's table: which image runs an extractor, how many replicas, what resources.

    ``image`` is a logical name (``essp/worker-cpu``, ``essp/worker-gpu``; see :func:`resolve_image`)
    or a full image reference for a third-party image; ``cpu`` and ``memory`` are Kubernetes
    quantities per replica ("500m", "1", "1Gi").
    """

    kind: str
    image: str
    replicas: int
    cpu: str
    memory: str
    gpu: int = 0

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        if not self.image:
            raise ValueError(f"extractor {self.kind!r}: the deployment needs an image")
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 0:
            raise ValueError(f"extractor {self.kind!r}: replicas={self.replicas!r} must be an integer >= 0")
        if not _CPU_QUANTITY.match(self.cpu):
            raise ValueError(f"extractor {self.kind!r}: cpu={self.cpu!r} is not a Kubernetes CPU quantity "
                             "(e.g. '500m', '1', '1.5')")
        if not _MEMORY_QUANTITY.match(self.memory):
            raise ValueError(f"extractor {self.kind!r}: memory={self.memory!r} is not a Kubernetes memory "
                             "quantity (e.g. '512Mi', '1Gi')")
        if isinstance(self.gpu, bool) or not isinstance(self.gpu, int) or self.gpu < 0:
            raise ValueError(f"extractor {self.kind!r}: gpu={self.gpu!r} must be an integer >= 0")


@dataclass(frozen=True)
class MixedFrames:
    """A sample's frames as the decode worker stores them when its streams need colour in a few frames only
    (:func:`frames_layout`): the grey stack, for the streams that look at luma (None when none of the
    sample's streams does), and the colour frames some stream takes, by position in the L+1 (``count``)."""

    count: int
    gray: np.ndarray | None  # (count, H, W) uint8
    colour: dict[int, np.ndarray]  # position -> (H, W, 3) uint8 RGB


class FeatureExtractor(ABC):
    """Turns a frame stack (L+1, H, W, 3) uint8 RGB into a uint8 C-contiguous channels-first feature.

    An extractor that only looks at luma sets ``input_format = "gray"``: it then also accepts a grey stack
    (L+1, H, W), which is what the decode worker stores when no extractor of the sample needs colour (a
    third of the bytes, and the decoder's own Y plane scaled: no colour conversion at all)."""

    kind: ClassVar[str]  # registry name and stream name
    description: ClassVar[str]
    input_format: ClassVar[str] = "rgb24"  # "rgb24" or "gray": the least the extractor needs
    option_specs: ClassVar[Mapping[str, OptionSpec]] = {}
    min_frames: ClassVar[int] = 2  # L+1 >= 2: every stack has at least one frame pair
    # The master's table entry for this kind (see ExtractorDeployment).
    image: ClassVar[str] = CPU_IMAGE
    replicas: ClassVar[int] = 1
    cpu: ClassVar[str] = "1"
    memory: ClassVar[str] = "1Gi"
    gpu: ClassVar[int] = 0

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_specs))
        if unknown:
            allowed = ", ".join(sorted(self.option_specs)) or "none"
            name = unknown[0]
            raise ExtractorOptionError(
                f"extractor {self.kind!r} has no option {name!r} (given {name}={options[name]!r}); "
                f"its options are: {allowed}")
        normalised: dict[str, Any] = {}
        for name, spec in self.option_specs.items():
            value = options.get(name, spec.default)
            try:
                normalised[name] = spec.normalise(value)
            except ValueError as exc:
                raise ExtractorOptionError(
                    f"extractor {self.kind!r}: option {name}={value!r} is not valid; allowed: {exc}") from None
        self._options = normalised
        self._shape_cache: dict[tuple[int, ...], tuple[int, ...]] = {}

    @property
    def options(self) -> dict[str, Any]:
        """The normalised options, defaults filled in (a copy; JSON-serialisable)."""
        return dict(self._options)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"{type(self).__name__}({args})"

    @classmethod
    def deployment(cls) -> ExtractorDeployment:
        """This class's default row of :data:`EXTRACTOR_TABLE`."""
        return ExtractorDeployment(kind=cls.kind, image=cls.image, replicas=cls.replicas, cpu=cls.cpu,
                                   memory=cls.memory, gpu=cls.gpu)

    def check_frames_shape(self, frames_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Validate ``(L+1, H, W, 3)`` (or ``(L+1, H, W)`` for a grey extractor) and return ``(L, H, W)``."""
        shape = tuple(frames_shape)
        gray_ok = self.input_format == "gray" and len(shape) == 3
        if (not (gray_ok or (len(shape) == 4 and shape[3] == 3)) or shape[0] < self.min_frames
                or shape[1] < 1 or shape[2] < 1):
            grey = " or (L+1, H, W) grey" if self.input_format == "gray" else ""
            raise ValueError(f"extractor {self.kind!r}: frames must have shape (L+1, H, W, 3){grey} with "
                             f"L+1 >= {self.min_frames}, got {shape}")
        return shape[0] - 1, shape[1], shape[2]

    def check_frames(self, frames: np.ndarray) -> np.ndarray:
        """Validate a frame stack (uint8, (L+1, H, W, 3)) and return it C-contiguous."""
        if not isinstance(frames, np.ndarray):
            raise ValueError(f"extractor {self.kind!r}: frames must be a numpy array, got {type(frames).__name__}")
        if frames.dtype != np.uint8:
            raise ValueError(f"extractor {self.kind!r}: frames must be uint8 RGB, got dtype {frames.dtype}")
        self.check_frames_shape(frames.shape)
        return np.ascontiguousarray(frames)

    def output_shape(self, frames_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``extract()``'s result for frames of ``frames_shape`` (L+1, H, W, 3).

        This default runs ``extract`` once on black frames of that shape and remembers the answer;
        the built-in extractors compute it directly.
        """
        shape = tuple(int(n) for n in frames_shape)
        self.check_frames_shape(shape)
        if shape not in self._shape_cache:
            self._shape_cache[shape] = tuple(self.extract(np.zeros(shape, np.uint8)).shape)
        return self._shape_cache[shape]

    @abstractmethod
    def extract(self, frames: np.ndarray) -> np.ndarray:
        """frames: uint8 RGB (L+1, H, W, 3) -> uint8 C-contiguous feature, channels first."""

    @classmethod
    def colour_frames(cls, count: int) -> list[int] | None:
        """The positions (of ``count`` = L+1 frames) this extractor reads in colour: none for a grey
        extractor, all (None) by default. An extractor that takes a few colour frames names them and
        implements :meth:`extract_colour`: the decode worker then stores only those in colour."""
        return [] if cls.input_format == "gray" else None

    def extract_colour(self, count: int, colour: Mapping[int, np.ndarray]) -> np.ndarray:
        """The feature from the colour frames :meth:`colour_frames` names (position -> (H, W, 3))."""
        raise ValueError(f"extractor {self.kind!r} needs the whole colour stack, not frames {sorted(colour)}")

    def extract_stored(self, frames: np.ndarray | MixedFrames) -> np.ndarray:
        """The feature from what the decode worker stored: a stack, or :class:`MixedFrames`."""
        if isinstance(frames, np.ndarray):
            return self.extract(frames)
        if self.input_format == "gray":
            if frames.gray is None:
                raise ValueError(f"extractor {self.kind!r}: the stored frames hold no grey stack")
            return self.extract(frames.gray)
        return self.extract_colour(frames.count, frames.colour)


# The open registry of extractors (the paper's section 3.3), by kind.
EXTRACTORS: Registry[type[FeatureExtractor]] = Registry("extractor kind", unknown=UnknownExtractor)
# The master's table extractor -> image -> replicas. One row per registered kind, filled in by
# register_extractor from the class attributes; the master may replace rows (dataclasses.replace) to
# scale an extractor without touching its class.
EXTRACTOR_TABLE: dict[str, ExtractorDeployment] = {}


def _check_kind(kind: object) -> str:
    if not isinstance(kind, str) or not STREAM_PATTERN.match(kind):
        raise ValueError(f"extractor kind {kind!r} is not valid: it is also a stream name (part of Kafka "
                         "topics and Redis keys), so use 1-32 lower-case letters, digits or '_', starting "
                         "with a letter")
    return kind


def register_extractor(cls: type[FeatureExtractor]) -> type[FeatureExtractor]:
    """Class decorator: make ``cls`` available under ``cls.kind`` and add its row to EXTRACTOR_TABLE."""
    if not (isinstance(cls, type) and issubclass(cls, FeatureExtractor)):
        raise TypeError(f"register_extractor expects a FeatureExtractor subclass, got {cls!r}")
    kind = _check_kind(getattr(cls, "kind", None))
    if not isinstance(getattr(cls, "description", None), str):
        raise ValueError(f"extractor class {cls.__qualname__} ({kind!r}) needs a `description` string")
    if getattr(cls, "__abstractmethods__", None):
        raise TypeError(f"extractor class {cls.__qualname__} ({kind!r}) does not implement "
                        f"{', '.join(sorted(cls.__abstractmethods__))}")
    if kind in EXTRACTORS and EXTRACTORS.get(kind) is cls:  # importing the same module twice is harmless
        return cls
    deployment = cls.deployment()
    try:
        EXTRACTORS.add(kind, cls)
    except ValueError as exc:
        raise ValueError(f"{exc}; cannot register {cls.__module__}.{cls.__qualname__} under the same name") from None
    EXTRACTOR_TABLE[kind] = deployment
    return cls


def unregister_extractor(kind: str) -> None:
    """Remove a kind from the registry and the table (tests, plugin reloads)."""
    extractor_class(kind)
    EXTRACTORS.remove(kind)
    EXTRACTOR_TABLE.pop(kind, None)


def extractor_kinds() -> list[str]:
    """The registered kinds, sorted."""
    return sorted(EXTRACTORS)


def extractor_class(kind: str) -> type[FeatureExtractor]:
    try:
        return EXTRACTORS.get(kind)
    except UnknownExtractor as exc:
        raise UnknownExtractor(f"{exc} (third-party extractors register when their module is named in "
                               f"{PLUGIN_MODULES_ENV})") from None


def create_extractor(kind: str, options: dict[str, Any] | None = None) -> FeatureExtractor:
    """An instance of the extractor registered as ``kind`` with ``options`` (validated)."""
    if options is not None and not isinstance(options, Mapping):
        raise ExtractorOptionError(f"extractor {kind!r}: options must be a mapping, got {type(options).__name__}")
    return extractor_class(kind)(**dict(options or {}))


def plugin_modules_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """Module names listed (comma-separated) in ESSP_EXTRACTOR_MODULES."""
    value = (os.environ if environ is None else environ).get(PLUGIN_MODULES_ENV, "")
    return [name.strip() for name in value.split(",") if name.strip()]


def load_extractor_plugins(modules: Iterable[str]) -> None:
    """Import ``modules`` so that the extractors they define register themselves.

    A single string is read as a comma-separated list (the form of ESSP_EXTRACTOR_MODULES).
    """
    names = modules.split(",") if isinstance(modules, str) else list(modules)
    for name in (n.strip() for n in names):
        if not name:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # an import can fail in any way; say which plugin and why
            raise ExtractorPluginError(f"extractor plugin module {name!r} (from {PLUGIN_MODULES_ENV} or the "
                                       f"worker's options) could not be imported: {type(exc).__name__}: {exc}"
                                       ) from exc


def resolve_image(image: str, settings: Settings) -> str:
    """The image reference to run: the logical built-in names map to the configured images."""
    return {CPU_IMAGE: settings.image_worker_cpu, GPU_IMAGE: settings.image_worker_gpu}.get(image, image)


# --------------------------------------------------------------------------------------------------
# Built-in extractors


def _gray(frames: np.ndarray) -> list[np.ndarray] | np.ndarray:
    if frames.ndim == 3:  # already grey (the decoder's luma)
        return frames
    return [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]


def frames_format(features: Mapping[str, Any]) -> str:
    """The frame format a decode worker stores for a sample feeding these extractors: "gray" when none
    of them needs colour, else "rgb24". A kind not registered here (a plugin only the extractor
    workers load) gets colour, which every extractor accepts."""
    gray, colour = frames_layout(features, 2)  # whether any frame is wanted in colour does not depend on L
    return "gray" if gray and colour == [] else "rgb24"


def frames_layout(features: Mapping[str, Any], count: int) -> tuple[bool, list[int] | None]:
    """What a decode worker stores for a sample of ``count`` (= L+1) frames feeding these extractors:
    (a grey stack?, the positions wanted in colour), or (False, None) for the whole colour stack, which
    every extractor accepts (a kind not registered here, a plugin only the extractor workers load, or
    one that reads every frame in colour). With rgb + flow: the grey stack and the rgb stream's one colour
    frame, from the same decode, instead of L+1 colour frames (a third of the bytes each, and no colour
    conversion of the other L)."""
    if not features:
        return False, None
    gray, colour = False, set()
    for kind in features:
        try:
            cls = extractor_class(kind)
        except EsspError:
            return False, None
        wanted = cls.colour_frames(count)
        if wanted is None:
            return False, None
        gray = gray or cls.input_format == "gray"
        colour.update(wanted)
    return gray, sorted(colour)


@register_extractor
class RgbExtractor(FeatureExtractor):
    """The spatial stream's input: one RGB frame of the stack."""

    kind = "rgb"
    description = "middle frame (index L//2 of the L+1 frames) as (3, H, W) uint8 RGB"
    min_frames = 1
    replicas = 1
    cpu = "500m"
    memory = "512Mi"

    @staticmethod
    def frame_index(frames_count: int) -> int:
        """Index of the frame taken from L+1 frames: L//2, the first frame of the middle flow pair
        (for odd L+1 the exact middle; for even L+1 the earlier of the two middle frames)."""
        return (frames_count - 1) // 2

    def output_shape(self, frames_shape: tuple[int, ...]) -> tuple[int, ...]:
        _, height, width = self.check_frames_shape(frames_shape)
        return (3, height, width)

    def extract(self, frames: np.ndarray) -> np.ndarray:
        frames = self.check_frames(frames)
        return np.ascontiguousarray(frames[self.frame_index(frames.shape[0])].transpose(2, 0, 1))

    @classmethod
    def colour_frames(cls, count: int) -> list[int] | None:
        return [cls.frame_index(count)]

    def extract_colour(self, count: int, colour: Mapping[int, np.ndarray]) -> np.ndarray:
        index = self.frame_index(count)
        frame = colour.get(index)
        if frame is None or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"extractor 'rgb': needs colour frame {index} of {count} as (H, W, 3) uint8, "
                             f"got {sorted(colour)}")
        return np.ascontiguousarray(frame.transpose(2, 0, 1))


@register_extractor
class FlowExtractor(FeatureExtractor):
    """The temporal stream's input: dense optical flow of the L consecutive frame pairs.

    The flow family (``flow_bi``, ``warped_flow``) subclasses it: a subclass yields other (H, W, 2) fields
    from :meth:`fields` (``fields_per_pair`` per frame pair), quantised and stacked the same way."""

    kind = "flow"
    input_format = "gray"
    description = ("optical flow of the L frame pairs (t -> t+1, grayscale) as (2L, H, W) uint8 stacked "
                   "x1, y1, x2, y2, ..., quantised around 128 within ±bound pixels")
    option_specs = {
        "method": OptionSpec("dis_fast", choices=FLOW_METHODS, help="OpenCV optical flow algorithm"),
        "bound": OptionSpec(DEFAULT_FLOW_BOUND, positive_number=True,
                            help="flow in pixels is clipped to ±bound before quantisation"),
    }
    fields_per_pair: ClassVar[int] = 1  # (H, W, 2) flow fields per frame pair: 2 * fields_per_pair * L channels
    replicas = 4  # the costly stage: most of the CPU of an epoch goes here
    cpu = "1"
    memory = "1Gi"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._flow = flow_algorithm(self._options["method"])

    @property
    def bound(self) -> float:
        return self._options["bound"]

    def output_shape(self, frames_shape: tuple[int, ...]) -> tuple[int, ...]:
        length, height, width = self.check_frames_shape(frames_shape)
        return (2 * self.fields_per_pair * length, height, width)

    def fields(self, gray: list[np.ndarray] | np.ndarray) -> Iterator[np.ndarray]:
        """The float32 (H, W, 2) fields of a grey stack in channel order: here the flow t -> t+1 of each pair."""
        for prev, nxt in zip(gray[:-1], gray[1:], strict=True):
            yield self._flow(prev, nxt)

    def flow_pairs(self, frames: np.ndarray) -> np.ndarray:
        """Unquantised flow, float32 (L * fields_per_pair, H, W, 2): for ``flow`` ``[t, y, x]`` is where pixel
        (x, y) of frame t went in frame t+1, so content moving right gives positive x and moving down positive y."""
        return np.stack(list(self.fields(_gray(self.check_frames(frames)))))

    def extract(self, frames: np.ndarray) -> np.ndarray:
        frames = self.check_frames(frames)
        out = np.empty(self.output_shape(frames.shape), np.uint8)
        for index, field in enumerate(self.fields(_gray(frames))):
            # (H, W, 2) -> channels 2i (x) and 2i+1 (y)
            out[2 * index:2 * index + 2] = quantise(field, self.bound).transpose(2, 0, 1)
        return out


@register_extractor
class BiFlowExtractor(FlowExtractor):
    """Bi-directional flow: the forward stack of ``flow`` followed by the backward stack (t+1 -> t)."""

    kind = "flow_bi"
    description = ("optical flow of the L frame pairs forward (t -> t+1) then backward (t+1 -> t) as (4L, H, W) "
                   "uint8 stacked x1, y1, ..., xL, yL, x1', y1', ..., xL', yL', quantised as flow")
    fields_per_pair = 2
    replicas = 8  # twice the work of flow (2x its 4)

    def fields(self, gray: list[np.ndarray] | np.ndarray) -> Iterator[np.ndarray]:
        yield from super().fields(gray)
        for prev, nxt in zip(gray[:-1], gray[1:], strict=True):
            yield self._flow(nxt, prev)


@register_extractor
class WarpedFlowExtractor(FlowExtractor):
    """Warped optical flow (TSN, Wang et al. 2016): the flow left once the camera's motion is taken out."""

    kind = "warped_flow"
    description = ("optical flow of the L frame pairs after the camera motion (a RANSAC homography of tracked "
                   "corners) is warped out of frame t+1, as (2L, H, W) uint8 stacked as flow")
    option_specs = {
        **FlowExtractor.option_specs,
        "max_features": OptionSpec(100, positive_integer=True,
                                   help="corners tracked per pair to estimate the camera's homography"),
    }
    replicas = 10  # 2.4x the work of flow: +1.4 ms a pair at 224x224 for the homography and the warp

    def fields(self, gray: list[np.ndarray] | np.ndarray) -> Iterator[np.ndarray]:
        for prev, nxt in zip(gray[:-1], gray[1:], strict=True):
            yield self._flow(prev, stabilise(nxt, camera_motion(prev, nxt, self._options["max_features"])))


class _GreyPlanes(FeatureExtractor):
    """The base of the cheap grey streams with one (H, W) plane per frame pair: (L, H, W) uint8."""

    input_format = "gray"
    replicas = 1
    cpu = "500m"
    memory = "512Mi"

    def output_shape(self, frames_shape: tuple[int, ...]) -> tuple[int, ...]:
        length, height, width = self.check_frames_shape(frames_shape)
        return (length, height, width)


@register_extractor
class FrameDiffExtractor(_GreyPlanes):
    """A cheap motion stream: differences of consecutive grayscale frames."""

    kind = "framediff"
    description = ("differences gray(t+1) - gray(t) of the L frame pairs as (L, H, W) uint8, quantised "
                   "around 128 within ±bound gray levels")
    option_specs = {
        "bound": OptionSpec(DEFAULT_FRAMEDIFF_BOUND, positive_number=True,
                            help="differences in gray levels are clipped to ±bound before quantisation"),
    }

    def extract(self, frames: np.ndarray) -> np.ndarray:
        frames = self.check_frames(frames)
        gray = np.asarray(_gray(frames)).astype(np.int16)
        return np.ascontiguousarray(quantise(np.diff(gray, axis=0), self._options["bound"]))


@register_extractor
class FrameStackExtractor(_GreyPlanes):
    """The paper's frame stack: the grey frames themselves."""

    kind = "framestack"
    description = "the first L of the L+1 frames in grayscale as (L, H, W) uint8"

    def extract(self, frames: np.ndarray) -> np.ndarray:
        frames = self.check_frames(frames)
        return np.array(_gray(frames[:-1]), dtype=np.uint8)  # a copy, never a view of the input
