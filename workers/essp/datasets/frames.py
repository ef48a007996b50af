"""Opening a video held in memory and placing its frames on the timeline: what the probe
(:func:`essp.datasets.video.probe_video`) and the segment decode (:func:`essp.datasets.video.decode_segment`)
share, so that both count frames by one rule.

Opening: the container's format is chosen from the file's own bytes against an allow-list
(:data:`essp.datasets.containers.ALLOWED_CONTAINERS`) and given to FFmpeg, which then never probes the
bytes against its other demuxers, and no protocol is allowed (:data:`NO_PROTOCOLS`): the bytes come
from memory, so nothing a file says (an HLS playlist's segment URLs, an SDP session's RTP ports, an
MP4's external data references) can make FFmpeg open a URL, a socket or another file.

The timeline: frame ``i`` is the frame shown at ``i / fps``, where ``fps`` is the stream's nominal rate
(FFmpeg's ``r_frame_rate`` guess, else its average rate): ``i = round((t - t0) * fps)`` for a frame
shown at time ``t`` (``t0``: the first frame shown). A slot no frame falls in holds the frame before it,
as a player shows it (a writer that leaves repeated frames out, a dropped frame, the long frames of a
variable-rate video); of two frames that fall in one slot the first is kept. The time of a frame is:

* "pts": its presentation timestamp (MP4/MOV, Matroska/WebM, MPEG-PS/TS, ...);
* "chunks": in AVI, the position of its chunk in the stream (AVI has no presentation timestamps, one
  chunk a frame, and a writer leaves a repeated frame out as an empty chunk or as an index entry that
  skips a position; the demuxer's pts counts those positions, and for MPEG-4 with B-frames it restores
  display positions). The keyframe a decode starts from gives its index from its timestamp, the chunks
  after it their positions relative to it; frames come out of the decoder in display order and each
  takes the lowest position not yet taken (so B-frames in AVI come out right too; H.264 in AVI, whose
  positions are in decode order, is placed right where no frame was left out);
* "sequence": no usable timestamps at all (raw streams; timestamps out of display order): frames are
  counted from the start of the stream.
"""

from __future__ import annotations

import heapq
import io
from collections.abc import Iterable, Iterator
from typing import Literal

import av

from essp.datasets.containers import (
    ALLOWED_CONTAINERS,
    avi_fourcc,
    container_diagnosis,
    describe_bytes,
    sniff_container,
)
from essp.errors import EsspError

# FFmpeg options of every open: no protocol at all (the name matches none). Input comes from memory through
# PyAV's own I/O, which uses no protocol; anything a demuxer would open besides it is refused.
NO_PROTOCOLS = {"protocol_whitelist": "none"}


class VideoError(EsspError):
    """A video that cannot be probed or decoded; the message names the video and the cause."""

    def __init__(self, video: str, reason: str) -> None:
        self.video = video
        self.reason = reason
        super().__init__(f"video {video}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # survives pickling (process pools)
        return type(self), (self.video, self.reason)


class NoTimestamps(Exception):
    """Frames carry no usable pts (none, or out of display order): count them from the start."""


def open_video(data: bytes, name: str) -> av.container.InputContainer:
    """The container of a video's bytes, opened with the format its bytes show and no protocol allowed."""
    if not data:
        raise VideoError(name, "empty file (0 bytes)")
    fmt = sniff_container(data, name)
    if fmt is None:
        allowed = ", ".join(dict.fromkeys(ALLOWED_CONTAINERS.values()))
        raise VideoError(name, f"not a video: no container format recognised ({describe_bytes(data)}, {len(data)} "
                               f"bytes; ESSP opens {allowed})")
    try:
        return av.open(io.BytesIO(data), mode="r", format=fmt, options=NO_PROTOCOLS)
    except av.FFmpegError as exc:
        reason = container_diagnosis(data)
        if reason:
            raise VideoError(name, reason) from None
        if isinstance(exc, av.EOFError):
            raise VideoError(name, "the container ends before any frame (truncated, or no frames)") from None
        if isinstance(exc, av.InvalidDataError):
            raise VideoError(name, f"not a video: its bytes start like {ALLOWED_CONTAINERS[fmt]} but FFmpeg's "
                                   f"{fmt} demuxer cannot read them ({len(data)} bytes)") from None
        raise VideoError(name, f"container error ({ALLOWED_CONTAINERS[fmt]}): {exc}") from None


def video_stream(container: av.container.InputContainer, name: str, data: bytes) -> av.video.stream.VideoStream:
    if not container.streams.video:
        # A cut-off MP4 header can open with no stream at all: say why rather than "no video stream".
        reason = container_diagnosis(data)
        if reason:
            raise VideoError(name, reason)
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
        raise VideoError(name, f"not a video: no video stream in the {container.format.name} container "
                               f"(streams: {kinds})")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # PyAV gives no decoder context for a codec FFmpeg cannot decode
        raise VideoError(name, f"unsupported codec{avi_fourcc(data)}: this FFmpeg build has no decoder for it")
    check_frame_size(stream.codec_context.width, stream.codec_context.height, name)
    return stream


# The largest frame ESSP decodes (8K UHD). One decoded frame of a larger video takes over 100 MB in RGB and a
# stack holds L+1 of them before they are scaled down: such a video is refused before anything is decoded.
MAX_FRAME_PIXELS = 7680 * 4320


def check_frame_size(width: int, height: int, name: str) -> None:
    """Refuse frames larger than :data:`MAX_FRAME_PIXELS` (the container's header says their size)."""
    if width * height > MAX_FRAME_PIXELS:
        raise VideoError(name, f"frames of {width}x{height} ({width * height / 1e6:.2f} megapixels) are larger than "
                               f"ESSP decodes ({MAX_FRAME_PIXELS / 1e6:.2f} megapixels, 7680x4320): refused before "
                               "decoding")


def stream_fps(stream: av.video.stream.VideoStream, name: str) -> float:
    """The rate of the timeline: FFmpeg's guess of the nominal rate (the lowest rate on whose grid the first
    frames' timestamps fall), else the average rate; and the average rate when the guess is over twice it,
    a variable-rate stream on a fine clock (phones), which would otherwise be resampled to that clock."""
    guessed, average = stream.guessed_rate, stream.average_rate
    if guessed and average and average > 0 and guessed > VARIABLE_RATE_RATIO * average:
        return float(average)
    rate = guessed or average or stream.base_rate
    if not rate or rate <= 0:
        raise VideoError(name, "frame rate unknown (container gives none)")
    return float(rate)


# A nominal rate over this many times the average one marks a variable-rate stream (see stream_fps). A writer
# that leaves repeated frames out of an MP4 keeps over half of them for this to tell it from one.
VARIABLE_RATE_RATIO = 2


def formats(container: av.container.InputContainer) -> set[str]:
    return set(container.format.name.split(","))


def first_gop(packets: Iterable[av.Packet]) -> list[av.Packet]:
    """The packets up to and including the second keyframe (all of them with one keyframe): what
    :func:`first_gop_base` reads. An iterator of packets goes on after them."""
    head, keyframes = [], 0
    for packet in packets:
        head.append(packet)
        keyframes += packet.is_keyframe
        if keyframes == 2:
            break
    return head


def first_gop_base(packets: Iterable[av.Packet]) -> int | None:
    """The smallest pts before the second keyframe (in decode order): the first frame shown."""
    base, keyframes = None, 0
    for packet in packets:
        if packet.is_keyframe:
            keyframes += 1
            if keyframes == 2:
                break
        # Packets an MP4 edit list cuts away are decoded but never shown.
        if packet.pts is not None and packet.size and not packet.is_discard:
            base = packet.pts if base is None else min(base, packet.pts)
    return base


class Clock:
    """Frame index of a timestamp: round((pts - base) * time_base * fps)."""

    def __init__(self, stream: av.video.stream.VideoStream, fps: float, base: int | None) -> None:
        self.start = base or 0
        self.time_base = float(stream.time_base) if stream.time_base and base is not None else None
        self.fps = fps

    def index(self, pts: int | None) -> int:
        return int(round(self.position(pts)))

    def position(self, pts: int | None) -> float:
        """Where a timestamp falls on the timeline, in frames (a fraction between two slots)."""
        if pts is None or self.time_base is None:
            raise NoTimestamps()
        return (pts - self.start) * self.time_base * self.fps

    def pts(self, position: float) -> int:
        """The timestamp of a (fractional) frame position, e.g. ``index + 0.5``: halfway to the next frame."""
        if self.time_base is None:
            raise NoTimestamps()
        return self.start + max(0, int(position / (self.fps * self.time_base)))


# How frames get their index: see the module's docstring.
Mode = Literal["pts", "chunks", "sequence"]


def timeline_mode(container: av.container.InputContainer) -> Mode:
    return "chunks" if "avi" in formats(container) else "pts"


def decoded_frames(stream: av.video.stream.VideoStream, packets: Iterable[av.Packet], clock: Clock,
                   mode: Mode) -> Iterator[tuple[int, av.VideoFrame]]:
    """(frame index, frame) in display order for the frames decoded from `packets`.

    Zero-size packets never reach the decoder: to FFmpeg an empty packet means end of stream, yet
    AVI stores a dropped frame as an empty chunk and the demuxer ends with one."""
    codec = stream.codec_context
    if mode == "pts":
        last = None
        for packet in _with_drain(packets):
            if packet is not None and not packet.size:
                continue
            for frame in codec.decode(packet):
                index = clock.index(frame.pts)
                if last is not None and index < last:
                    raise NoTimestamps()  # out of display order: the timestamps cannot be trusted
                last = index
                yield index, frame
        return
    if mode == "sequence":
        count = 0
        for packet in _with_drain(packets):
            if packet is not None and not packet.size:
                continue
            for frame in codec.decode(packet):
                yield count, frame
                count += 1
        return
    yield from _chunk_frames(codec, packets, clock)


def _chunk_frames(codec: av.CodecContext, packets: Iterable[av.Packet], clock: Clock,
                  ) -> Iterator[tuple[int, av.VideoFrame]]:
    """AVI: each frame at the position of a chunk (see the module's docstring)."""
    anchor: tuple[int, int] | None = None  # (index, stamp) of the keyframe the decode starts from
    next_slot = 0
    pending: list[int] = []  # positions of the chunks sent to the decoder whose frames have not come out
    last = -1
    for packet in _with_drain(packets):
        if packet is not None:
            stamp = packet.pts if packet.pts is not None else packet.dts
            if anchor is None:
                if not packet.size or not packet.is_keyframe or stamp is None:
                    continue  # a decode starts at a keyframe; anything before it cannot be placed
                anchor = (clock.index(stamp), stamp)
            # Skipped positions are frames the writer left out; without a stamp, the next position.
            slot = next_slot if stamp is None else anchor[0] + stamp - anchor[1]
            next_slot = slot + 1
            if not packet.size:
                continue
            if slot >= anchor[0]:  # frames shown before the keyframe need the GOP before: the decoder drops them
                heapq.heappush(pending, slot)
        for frame in codec.decode(packet):
            last = heapq.heappop(pending) if pending else last + 1
            yield last, frame


def _with_drain(packets: Iterable[av.Packet]) -> Iterator[av.Packet | None]:
    yield from packets
    yield None  # drains the decoder's delayed frames
