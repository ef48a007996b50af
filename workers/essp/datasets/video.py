"""Probing and segment decoding of videos held in memory: nothing decoded is ever written to disk.

Frame ``i`` of a video is the frame shown ``i / fps`` after the first one, by the timeline of
:mod:`essp.datasets.frames` (presentation timestamps; in AVI, chunk positions; a slot no frame falls in
holds the frame before it, as a player shows it). :func:`probe_video` counts frames and
:func:`decode_segment` finds them by that same rule, so ``offset + count <= info.frames`` always decodes
for a video that probed fine.

Only containers with a per-frame index (MP4/MOV, Matroska/WebM, AVI) are seeked; the others (MPEG
program/transport streams, FLV, ...) are decoded from the start, because their timestamps after a
seek can be off by a frame. Frames without timestamps (raw streams), or whose timestamps run out of
display order, are counted from the start.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from essp.datasets.frames import MAX_FRAME_PIXELS as MAX_FRAME_PIXELS
from essp.datasets.frames import (
    Clock,
    Mode,
    NoTimestamps,
    decoded_frames,
    first_gop,
    first_gop_base,
    formats,
    open_video,
    stream_fps,
    timeline_mode,
    video_stream,
)
from essp.datasets.frames import VideoError as VideoError
from essp.datasets.frames import check_frame_size as check_frame_size

# How far before the target a retry seeks when the keyframe interval is unknown (x264's default GOP).
DEFAULT_SEEK_BACK = 250
# Containers whose seeks land on a keyframe by an index of every frame (FFmpeg's format names).
INDEXED_FORMATS = frozenset({"mov", "mp4", "matroska", "webm", "avi"})


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    width: int
    height: int
    codec: str
    keyframe_interval: int | None  # median distance in frames between keyframes; None with one keyframe
    duration_s: float
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# probing


def probe_video(data: bytes, name: str, *, stats: dict[str, int] | None = None) -> VideoInfo:
    """Frames, rate, size, codec and keyframe interval of a video, read from its bytes.

    Demuxes every packet (cheap, nothing decoded) and keeps only what the count needs: each packet's
    timestamp and flags, the first GOP's packets and the last GOP's. It decodes the first frame and the
    last GOP, never more, so a truncated or corrupt tail is found here rather than in the middle of an
    epoch, and a long video costs its demuxing and two GOPs (the frames are counted from the container's
    timestamps, or, without any, from its packets). `stats`, when given, gets "decoded" (frames out of the
    decoder) added to its count.
    """
    decoded = [0]
    try:
        return _probe(data, name, decoded)
    finally:
        if stats is not None:
            stats["decoded"] = stats.get("decoded", 0) + decoded[0]


def _probe(data: bytes, name: str, decoded: list[int]) -> VideoInfo:
    with open_video(data, name) as container:
        stream = video_stream(container, name, data)
        fps = stream_fps(stream, name)
        promised = stream.frames or 0
        scan = _Scan.of(container, stream)
        expected = max(promised, scan.packets)
        if not scan.head:
            if scan.demux_error or scan.cut or promised:
                raise VideoError(name, f"truncated: 0 of {expected} frames readable"
                                       + (f" ({scan.demux_error})" if scan.demux_error else ""))
            raise VideoError(name, "no frames: the video stream is empty")

        codec_name = stream.codec_context.name
        clock = Clock(stream, fps, first_gop_base(scan.head))
        mode = timeline_mode(container)
        try:
            first_index, first = _first_frame(stream, scan.head, clock, mode, name, decoded)
            if first_index != 0:
                raise VideoError(name, f"the first frame shown has index {first_index}, not 0 (timestamp "
                                       f"{first.pts}, first GOP's earliest {clock.start})")
            keyframes = sorted({clock.index(pts) for pts in scan.keyframe_pts if pts is not None})
            frames, tail_error = _probe_tail(stream, scan.tail, clock, mode, decoded)
        except NoTimestamps:  # positions in decode order stand in for frame indexes
            _, first = _first_frame(stream, scan.head, clock, "sequence", name, decoded)
            keyframes = scan.keyframe_at
            frames, tail_error = _probe_tail(stream, scan.tail, clock, "sequence", decoded)
            frames += scan.frames_before_tail
        width, height = first.width, first.height
        check_frame_size(width, height, name)  # a header may leave the size to the first frame

    missing = scan.cut or scan.demux_error or (promised and frames < promised)
    if missing or tail_error:
        cause = tail_error or scan.demux_error or ("last packet cut short" if scan.cut else None)
        raise VideoError(name, f"{'truncated' if missing else 'corrupt'}: {frames} of {max(expected, frames)} "
                               f"frames readable" + (f" ({cause})" if cause else ""))
    gaps = [b - a for a, b in zip(keyframes, keyframes[1:], strict=False)]
    return VideoInfo(frames=frames, fps=fps, width=width, height=height, codec=codec_name,
                     keyframe_interval=int(statistics.median(gaps)) if gaps else None,
                     duration_s=round(frames / fps, 6), size_bytes=len(data))


# The first packets a probe keeps to decode the first frame and find the first timestamp (the first GOP, up
# to this many: the earliest timestamp of a GOP is among its first packets, B-frames reorder a few).
HEAD_PACKETS = 256


@dataclass
class _Scan:
    """What the probe keeps of one pass over a stream's packets, up to the first one cut short (intact)."""

    head: list[av.Packet] = field(default_factory=list)  # the first GOP's (at most HEAD_PACKETS)
    tail: list[av.Packet] = field(default_factory=list)  # from the last keyframe on
    keyframe_pts: list[int | None] = field(default_factory=list)
    keyframe_at: list[int] = field(default_factory=list)  # positions of the keyframes among the packets
    frames_before_tail: int = 0  # packets with data before the tail
    packets: int = 0  # every packet demuxed, the ones after a cut included
    cut: bool = False  # a packet was cut short by the end of the file: it and what follows are lost
    demux_error: str | None = None

    @classmethod
    def of(cls, container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> _Scan:
        scan, intact, sized, head_done = cls(), 0, 0, False
        try:
            for packet in container.demux(stream):
                if not packet.size and packet.pts is None:  # the demuxer's final flush packet
                    continue
                scan.packets += 1
                if scan.cut or packet.is_corrupt:
                    scan.cut = True
                    continue
                if packet.is_keyframe:
                    scan.keyframe_pts.append(packet.pts)
                    scan.keyframe_at.append(intact)
                    head_done = head_done or len(scan.keyframe_at) == 2
                    scan.frames_before_tail = sized
                    scan.tail = []
                if not head_done and len(scan.head) < HEAD_PACKETS:
                    scan.head.append(packet)
                scan.tail.append(packet)
                intact += 1
                sized += bool(packet.size)
        except av.FFmpegError as exc:
            scan.demux_error = str(exc)
        if not any(p.size for p in scan.head):
            scan.head = []
        return scan


def _first_frame(stream: av.video.stream.VideoStream, packets: list[av.Packet], clock: Clock, mode: Mode,
                 name: str, decoded: list[int]) -> tuple[int, av.VideoFrame]:
    stream.codec_context.flush_buffers()
    codec_name = stream.codec_context.name
    try:
        found = next(decoded_frames(stream, iter(packets), clock, mode), None)
    except av.FFmpegError as exc:
        raise VideoError(name, f"first frame not decodable ({codec_name}): {exc}") from None
    if found is None:
        raise VideoError(name, f"no frame decodable ({codec_name}, {len(packets)} packets)")
    decoded[0] += 1
    return found


def _probe_tail(stream: av.video.stream.VideoStream, packets: list[av.Packet], clock: Clock,
                mode: Mode, decoded: list[int]) -> tuple[int, str | None]:
    """Decode the last GOP: (frames in the timeline, error or None); in "sequence" mode the frames of the
    GOP alone."""
    stream.codec_context.flush_buffers()  # as after a seek: the last GOP decodes on its own
    last = -1
    try:
        for index, _ in decoded_frames(stream, iter(packets), clock, mode):
            decoded[0] += 1
            last = max(last, index)
    except av.FFmpegError as exc:
        return last + 1, f"decode error after frame {last}: {exc}"
    return last + 1, None


# ---------------------------------------------------------------------------------------------
# segment decoding

# What decode_segment returns: "rgb24" (count, H, W, 3) RGB, "gray" (count, H, W) luma, for consumers that need
# no colour (optical flow), converted by swscale straight from the decoder's YUV.
PIX_FMTS = ("rgb24", "gray")
# The swscale filter for scaling: AREA, a box filter over each output pixel's footprint as cv2.INTER_AREA is. On
# 320x240 -> 224x224 (synthetic H.264) and 640x272 -> 224x224 (bikes.mp4), its luma differs from cv2.INTER_AREA's
# on the same full-size luma by 0.15 and 0.17 grey levels on average (BILINEAR 0.31/0.28, BICUBIC 0.63/0.29); the
# RGB of one swscale pass differs from the former rgb24-then-cv2.INTER_AREA path by 1.3 and 0.85 levels on average,
# most of it at sharp colour edges, where chroma is now scaled from its own (half-size) planes.
_INTERPOLATION = "AREA"
# swscale's own threads (PyAV >= 17; its default is one per CPU): one. Decodes run one per process, and at
# these sizes slice threads cost CPU and save none.
_SWS_OPTIONS: dict[str, int] = {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}


def decode_segment(data: bytes, name: str, offset: int, count: int, size: tuple[int, int] | None = None,
                   *, fps: float | None = None, keyframe_interval: int | None = None, pix_fmt: str = "rgb24",
                   stats: dict[str, int] | None = None, colour: dict[int, np.ndarray] | None = None,
                   colour_at: Sequence[int] = ()) -> np.ndarray:
    """Frames ``offset .. offset+count-1`` as uint8: shape (count, H, W, 3) RGB, or (count, H, W) with
    ``pix_fmt="gray"``: the decoder's luma at full range, exactly (cv2's RGB2GRAY of the RGB reads ~1.5
    levels darker, from swscale's fast YUV->RGB).

    `size` is (height, width) to scale to; scaling and colour conversion are one swscale pass (AREA, the
    box filter of cv2.INTER_AREA). `fps` and `keyframe_interval` are the probe's (the manifest's) values;
    without them the container's rate and a default seek-back apply. `stats`, when given, gets "decoded"
    (frames out of the decoder, up to the last one used), "used" (`count`, once the segment is whole) and
    "opens" (containers opened) added to its counts, so a caller can tell decoded frames per frame used.
    `colour_at` (positions in the segment) with a `colour` dict: those frames are also converted to RGB,
    (H, W, 3) each, into `colour[position]` (from the same decoded frame: a grey stack for one stream and
    the one colour frame another takes cost one decode).

    One container serves the call: its first GOP gives the base timestamp, then it seeks to the keyframe at
    or before the first frame and decodes forward, converting only the frames used and stopping at the last.
    When the seek lands after the first frame (an index keyed by decode time, as AVI's, or an inexact one),
    it seeks to the keyframe before the one it landed on, then 2 keyframe intervals further back, then
    decodes from the start; a keyframe that lands late is seen in its packet, before anything is decoded.
    """
    if offset < 0 or count < 1:
        raise VideoError(name, f"bad segment: offset {offset}, count {count} (need offset >= 0, count >= 1)")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise VideoError(name, f"bad resize target {size!r}: expected (height, width), both >= 1")
    if pix_fmt not in PIX_FMTS:
        raise VideoError(name, f"bad pixel format {pix_fmt!r}: expected one of {', '.join(map(repr, PIX_FMTS))}")
    at = tuple(sorted(set(int(i) for i in colour_at)))
    if at and (colour is None or at[0] < 0 or at[-1] >= count):
        raise VideoError(name, f"bad colour frames {list(colour_at)}: need a dict for them and positions in "
                               f"0..{count - 1}")
    want = _Wanted(name, offset, count, size, pix_fmt, at, colour if at else None)
    tally = _Tally()
    try:
        segment = _decode(data, want, fps, keyframe_interval, tally)
        tally.used = count
        return segment
    finally:
        if stats is not None:
            for key, value in asdict(tally).items():
                stats[key] = stats.get(key, 0) + value


@dataclass(frozen=True)
class _Wanted:
    """What decode_segment was asked for."""

    name: str
    offset: int
    count: int
    size: tuple[int, int] | None
    pix_fmt: str
    colour_at: tuple[int, ...] = ()
    colour: dict[int, np.ndarray] | None = field(default=None, compare=False)  # where colour_at's frames go

    @property
    def span(self) -> str:
        return f"frames {self.offset}..{self.offset + self.count - 1}"


@dataclass
class _Tally:
    """The work a decode_segment call did (its `stats`)."""

    decoded: int = 0
    used: int = 0
    opens: int = 0


def _decode(data: bytes, want: _Wanted, fps: float | None, keyframe_interval: int | None,
            tally: _Tally) -> np.ndarray:
    """The segment, from one container when it can; a second one only to decode from the start after seeks
    that all landed late, or in "sequence" mode after timestamps turned out unusable."""
    name = want.name
    segment, from_start, timestamps = None, False, True
    with open_video(data, name) as container:
        tally.opens += 1
        stream = video_stream(container, name, data)
        rate = fps or stream_fps(stream, name)
        packets = container.demux(stream)
        head = first_gop(packets)  # kept: decoding from the start replays them, then `packets` goes on
        base = first_gop_base(head)
        # No timestamp in the first GOP: nothing can be placed or seeked by time, count from the start.
        mode: Mode = timeline_mode(container) if base is not None else "sequence"
        clock = Clock(stream, rate, base)
        indexed = not INDEXED_FORMATS.isdisjoint(formats(container))
        try:
            if mode != "sequence" and indexed and want.offset > 0:
                back = 2 * (keyframe_interval or DEFAULT_SEEK_BACK)
                segment = _decode_seeking(container, stream, clock, mode, want, back, tally)
            else:
                from_start = True
                segment = _decode_from(stream, itertools.chain(head, packets), clock, mode, want, tally,
                                       seeked=False)
        except NoTimestamps:
            timestamps = False
    if segment is None and timestamps and not from_start:
        try:
            with open_video(data, name) as container:
                tally.opens += 1
                stream = video_stream(container, name, data)
                segment = _decode_from(stream, container.demux(stream), Clock(stream, rate, base), mode, want,
                                       tally, seeked=False)
        except NoTimestamps:
            timestamps = False
    if segment is None and not timestamps:
        with open_video(data, name) as container:
            tally.opens += 1
            stream = video_stream(container, name, data)
            segment = _decode_from(stream, container.demux(stream), Clock(stream, rate, None), "sequence", want,
                                   tally, seeked=False)
    if segment is None:
        raise VideoError(name, f"asked {want.span}: the first decodable frame comes after frame {want.offset}")
    return segment


def _decode_seeking(container: av.container.InputContainer, stream: av.video.stream.VideoStream, clock: Clock,
                    mode: Mode, want: _Wanted, back: int, tally: _Tally) -> np.ndarray | None:
    """Seek and decode; None when every seek landed after the first frame (the caller decodes from the start).

    The first seek aims halfway between the first frame and the next: where the index is keyed by
    presentation time (MP4, Matroska), it lands on the keyframe at or before the first frame, and at
    that frame itself when it is a keyframe, so nothing before that keyframe is decoded."""
    targets: list[int | None] = [clock.pts(want.offset + 0.5), None]  # None: just before the keyframe landed on
    if want.offset - back > 0:
        targets.append(clock.pts(want.offset - back - 0.5))
    landed: av.Packet | None = None
    for target in targets:
        if target is None:
            stamps = [] if landed is None else [t for t in (landed.pts, landed.dts) if t is not None]
            if not stamps:
                continue
            target = min(stamps) - 1
        try:
            container.seek(target, stream=stream, backward=True, any_frame=False)
        except av.FFmpegError:
            return None  # not seekable here: the caller decodes from the start
        packets = container.demux(stream)
        landed = next(packets, None)
        if landed is None:
            continue
        stamp = _stamp(landed, mode) if landed.is_keyframe and landed.size else None
        if stamp is not None and (clock.index(stamp) > want.offset or _off_grid(clock, stamp, want.offset)):
            continue  # landed after the first frame: decided without decoding
        segment = _decode_from(stream, itertools.chain([landed], packets), clock, mode, want, tally, seeked=True)
        if segment is not None:
            return segment
    return None


def _off_grid(clock: Clock, stamp: int, offset: int) -> bool:
    """A keyframe in the first frame's slot but off its time (a variable-rate stream): a frame before it may
    share the slot, and the first one there is the one shown, so the decode starts further back."""
    return offset > 0 and clock.index(stamp) == offset and abs(clock.position(stamp) - offset) > 1e-6


def _stamp(packet: av.Packet, mode: Mode) -> int | None:
    """The timestamp that places a keyframe packet: its pts, or in "chunks" mode the dts when it has none."""
    return packet.pts if mode == "pts" or packet.pts is not None else packet.dts


class _Segment:
    """The output array, filled slot by slot (allocated once the first frame's size is known). Each frame
    is scaled and converted in one swscale pass, by one reformatter (its context is set up once)."""

    def __init__(self, want: _Wanted) -> None:
        self.count, self.size, self.pix_fmt = want.count, want.size, want.pix_fmt
        self.colour_at, self.colour = want.colour_at, want.colour
        self.array: np.ndarray | None = None
        self.filled = 0
        self.reformatter = VideoReformatter()
        self._last: av.VideoFrame | None = None

    def put(self, frame: av.VideoFrame) -> None:
        if self.array is None:
            height, width = self.size or (frame.height, frame.width)
            shape = (height, width, 3) if self.pix_fmt == "rgb24" else (height, width)
            self.array = np.empty((self.count, *shape), np.uint8)
        height, width = self.array.shape[1:3]  # the target size, or the first frame's on a resolution change
        converted = self.reformatter.reformat(frame, width, height, self.pix_fmt, interpolation=_INTERPOLATION,
                                              **_SWS_OPTIONS)
        self.array[self.filled] = converted.to_ndarray()
        self._colour(frame)
        self._last = frame
        self.filled += 1

    def repeat(self) -> None:
        assert self.array is not None and self._last is not None
        self.array[self.filled] = self.array[self.filled - 1]
        self._colour(self._last)
        self.filled += 1

    def _colour(self, frame: av.VideoFrame) -> None:
        if self.filled in self.colour_at:
            assert self.array is not None and self.colour is not None
            height, width = self.array.shape[1:3]
            self.colour[self.filled] = self.reformatter.reformat(
                frame, width, height, "rgb24", interpolation=_INTERPOLATION, **_SWS_OPTIONS).to_ndarray()


def _decode_from(stream: av.video.stream.VideoStream, packets: Iterable[av.Packet], clock: Clock, mode: Mode,
                 want: _Wanted, tally: _Tally, *, seeked: bool) -> np.ndarray | None:
    """Decode the segment from `packets` (those after a seek, or all from the start); None when the first
    frame decoded is already past `offset` (the caller retries further back). Frames before `offset` are
    never converted, and decoding stops at the last frame of the segment."""
    offset, count = want.offset, want.count
    segment = _Segment(want)
    before: av.VideoFrame | None = None  # the last frame before `offset`, held over a gap
    last = None
    try:
        for index, frame in decoded_frames(stream, packets, clock, mode):
            tally.decoded += 1
            if last is None and index > offset:
                return None
            last = index
            if index < offset:
                before = frame
                continue
            slot = index - offset
            if slot < segment.filled:  # a duplicate timestamp: keep the first frame shown
                continue
            if segment.filled == 0 and slot > 0:
                if before is None:
                    return None
                segment.put(before)
            while segment.filled < min(slot, count):  # a gap in the timeline holds the frame before
                segment.repeat()
            if slot < count:
                segment.put(frame)
            if segment.filled == count:
                assert segment.array is not None
                return segment.array
    except av.FFmpegError as exc:
        at = 0 if last is None else last + 1
        raise VideoError(want.name, f"asked {want.span}: decode error at frame {at}: {exc}") from None
    if last is None and seeked:
        return None  # the seek went past the last frame: retry further back
    raise VideoError(want.name, f"asked {want.span}, only {0 if last is None else last + 1} frames decodable")
