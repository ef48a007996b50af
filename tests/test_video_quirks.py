"""Real videos with quirks, written by PyAV: AVI whose writer left repeated frames out (timestamps that
jump), a variable-rate MP4, a long video the probe must not decode whole, and files whose bytes are in
no allowed container (an HLS playlist, an SDP session) that FFmpeg must never be let to open URLs for."""

from __future__ import annotations

import io
import os
import socket
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from test_video import H, W, encode, index_frame, read_index

from essp.datasets.containers import ALLOWED_CONTAINERS, sniff_container
from essp.datasets.frames import NO_PROTOCOLS
from essp.datasets.ingest import ingest_directory
from essp.datasets.video import VideoError, decode_segment, probe_video

# Frames the writer kept (the others repeat the frame before and were left out), at 25 fps.
SHOWN = [0, 1, 2, 5, 6, 7, 10, 11, 12, 13, 14, 15, 16, 20, 21, 22, 23, 24, 25, 30, 31]


def held(shown: list[int], slots: int) -> list[int]:
    """What a player shows in each slot: the last frame kept at or before it."""
    return [max(s for s in shown if s <= i) for i in range(slots)]


def sparse_avi(path: Path, codec: str, shown: list[int] = SHOWN, gop: int = 8) -> bytes:
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height = W, H
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.codec_context.options = {"g": str(gop)}
        for i in shown:
            frame = av.VideoFrame.from_ndarray(index_frame(i), format="rgb24")
            frame.pts = i  # a pts that skips values: the AVI muxer leaves those chunks out
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path.read_bytes()


@pytest.fixture(scope="module", params=["mpeg4", "mjpeg"])
def sparse(request, tmp_path_factory) -> tuple[str, bytes]:
    name = f"sparse-{request.param}.avi"
    return name, sparse_avi(tmp_path_factory.mktemp("sparse") / name, request.param)


def test_sparse_avi_is_complete_and_its_timestamps_jump(sparse):
    name, data = sparse
    with av.open(io.BytesIO(data)) as container:
        stamps = [p.pts for p in container.demux(video=0) if p.size]
    assert stamps == SHOWN  # the file itself: chunks only for the frames kept
    info = probe_video(data, name)
    assert (info.frames, info.fps, info.width, info.height) == (SHOWN[-1] + 1, 25.0, W, H)


@pytest.mark.parametrize("count", [1, 4, 9])
def test_sparse_avi_segments_hold_the_frame_before_each_gap(sparse, count):
    name, data = sparse
    info = probe_video(data, name)
    expected = held(SHOWN, info.frames)
    for offset in range(info.frames - count + 1):
        for hints in ({}, {"fps": info.fps, "keyframe_interval": info.keyframe_interval}):
            segment = decode_segment(data, name, offset, count, **hints)
            assert [read_index(f) for f in segment] == expected[offset:offset + count], (offset, hints)


def test_sparse_avi_with_b_frames_keeps_display_order(tmp_path):
    """B-frames in a sparse AVI: frames leave the decoder in display order and take the chunk positions
    in order; no frame is lost or shown twice out of its place."""
    data = encode(tmp_path / "bf.avi", [index_frame(i) for i in SHOWN], fmt="avi", codec="mpeg4", bframes=2,
                  pts=SHOWN)
    info = probe_video(data, "bf.avi")
    assert info.frames == SHOWN[-1] + 1
    whole = [read_index(f) for f in decode_segment(data, "bf.avi", 0, info.frames)]
    assert sorted(set(whole)) == SHOWN and whole == sorted(whole)


def vfr_mp4(times_ms: list[int]) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.codec_context.options = {"g": "6", "bf": "0"}
        for k, t in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(index_frame(k), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def test_variable_rate_mp4_is_placed_by_its_timestamps_at_the_average_rate():
    """Frame times on a 10 ms grid, 20-80 ms apart: FFmpeg's nominal rate (100) is the grid, which would
    make 81 slots of 18 frames; the timeline runs at the average rate instead, each frame in the slot
    nearest its time, the first of two in one slot kept, an empty slot holding the frame before."""
    times = [0, 40, 60, 100, 180, 200, 240, 300, 310, 360, 440, 480, 520, 600, 640, 700, 720, 800]
    data = vfr_mp4(times)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        nominal, average = float(stream.guessed_rate), float(stream.average_rate)
    assert nominal == 100 and average == pytest.approx(len(times) / 0.84)
    info = probe_video(data, "vfr.mp4")
    assert info.fps == pytest.approx(average) and info.frames == round(0.8 * average) + 1
    slots: list[int | None] = [None] * info.frames
    for k, t in enumerate(times):
        slot = round(t / 1000 * average)
        if slots[slot] is None:
            slots[slot] = k
    expected = []
    for k in slots:
        expected.append(expected[-1] if k is None else k)
    for offset in range(info.frames - 5 + 1):
        assert [read_index(f) for f in decode_segment(data, "vfr.mp4", offset, 5)] == expected[offset:offset + 5]


VTEST = Path(os.environ.get("ESSP_VTEST_AVI", "/usr/share/doc/opencv-doc/examples/data/vtest.avi"))


@pytest.mark.skipif(not VTEST.is_file(), reason=f"{VTEST} not here (Debian's opencv-doc, or ESSP_VTEST_AVI)")
def test_opencvs_vtest_avi():
    """OpenCV's sample (msmpeg4 AVI, 10 fps): every chunk present, no gap; probes whole and decodes late."""
    data = VTEST.read_bytes()
    info = probe_video(data, "vtest.avi")
    assert (info.frames, info.fps, info.width, info.height, info.codec) == (795, 10.0, 768, 576, "msmpeg4")
    assert decode_segment(data, "vtest.avi", 700, 3, (96, 128)).shape == (3, 96, 128, 3)


def long_video(path: Path, fmt: str, frames: int, gop: int) -> bytes:
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.codec_context.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0",
                                        "preset": "ultrafast"}
        base = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        for i in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.roll(base, i, axis=1), format="rgb24")))
        container.mux(stream.encode(None))
    return path.read_bytes()


@pytest.mark.parametrize("fmt, name", [("mp4", "long.mp4"), ("h264", "long.h264")])
def test_a_long_video_is_probed_from_its_first_frame_and_last_gop(tmp_path, fmt, name):
    """3000 frames, a keyframe every 50: the probe decodes the first frame and the last GOP, also for a raw
    stream without timestamps (counted from its packets, not by decoding every frame)."""
    data = long_video(tmp_path / name, fmt, 3000, 50)
    stats: dict[str, int] = {}
    info = probe_video(data, name, stats=stats)
    assert info.frames == 3000 and info.keyframe_interval == 50
    assert stats == {"decoded": 1 + 50}
    segment = decode_segment(data, name, 2990, 10)  # the count is right: the last frames decode
    assert segment.shape == (10, 32, 32, 3)


# ---------------------------------------------------------------------------------------------
# the container allow-list, and no protocol


def udp_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_playlist_named_mp4_is_refused_and_names_what_it_is():
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nhttp://127.0.0.1:9/seg0.ts\n#EXT-X-ENDLIST\n"
    for attempt in (lambda: probe_video(playlist, "s3://videos/v_1.mp4"),
                    lambda: decode_segment(playlist, "s3://videos/v_1.mp4", 0, 1)):
        with pytest.raises(VideoError, match=r"^video s3://videos/v_1\.mp4: not a video: no container format "
                                             r"recognised \(text: an HLS/M3U playlist, 87 bytes; ESSP opens MP4/MOV, "
                                             r"AVI, Matroska/WebM, "):
            attempt()


def test_an_sdp_session_named_mp4_opens_no_socket():
    """FFmpeg's own probe takes an SDP description for what it is and listens on its RTP port (and waits
    there for packets); ESSP refuses it from its bytes, at once."""
    port = 40000 + os.getpid() % 20000 // 2 * 2
    sdp = (f"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           f"m=video {port} RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n").encode()
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            probe_video(sdp, "cam.mp4")
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(0.5)
    listening = not udp_port_free(port)
    thread.join(10)
    assert not listening, f"the probe listens on UDP port {port}"
    assert outcome and isinstance(outcome[0], VideoError), outcome
    assert "text: an SDP session description" in str(outcome[0])


def test_no_protocol_is_allowed_even_to_a_demuxer_that_wants_one():
    """The options of every open: a demuxer that opens URLs (SDP here, forced) is refused its protocols."""
    sdp = b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=video 5004 RTP/AVP 96\r\n"
    with pytest.raises(av.FFmpegError):
        av.open(io.BytesIO(sdp), format="sdp", options=NO_PROTOCOLS, timeout=5)


CONTAINERS = {  # file name: (muxer, codec), one of each container the allow-list names but the raw H.265
    "v.mov": ("mov", "mpeg4"), "v.3gp": ("3gp", "mpeg4"), "v.webm": ("webm", "libvpx"), "v.flv": ("flv", "flv"),
    "v.wmv": ("asf", "wmv2"), "v.ogv": ("ogg", "libvpx"), "v.mpg": ("mpeg", "mpeg1video"),
    "v.m2v": ("mpeg2video", "mpeg2video"), "v.ts": ("mpegts", "mpeg2video"), "v.264": ("h264", "libx264"),
}


@pytest.mark.parametrize("name", sorted(CONTAINERS))
def test_each_allowed_container_opens_with_the_format_of_its_bytes(tmp_path, name):
    muxer, codec = CONTAINERS[name]
    data = encode(tmp_path / name, [index_frame(i) for i in range(12)], fmt=muxer, codec=codec, gop=4)
    assert sniff_container(data, name) in ALLOWED_CONTAINERS
    info = probe_video(data, name)
    assert (info.width, info.height) == (W, H) and info.frames >= 11
    assert [read_index(f) for f in decode_segment(data, name, 2, 3)] == [2, 3, 4]


def test_quirky_videos_ingest_as_complete(settings, sparse, tmp_path):
    name, data = sparse
    root = tmp_path / "quirks"
    (root / "Walk").mkdir(parents=True)
    (root / "Run").mkdir()
    (root / "Walk" / f"v_Walk_g01_c01_{name}").write_bytes(data)
    (root / "Run" / "v_Run_g01_c01.mp4").write_bytes(
        vfr_mp4([0, 40, 60, 100, 180, 200, 240, 300, 310, 360, 440, 480, 520, 600, 640, 700, 720, 800]))
    manifest, _ = ingest_directory(settings, root, "quirks")
    assert manifest.quarantined == []
    frames = {v.id: (v.frames, round(v.fps, 2)) for v in manifest.videos}
    assert frames == {f"Walk/v_Walk_g01_c01_{name.rsplit('.', 1)[0]}": (SHOWN[-1] + 1, 25.0),
                      "Run/v_Run_g01_c01": (18, 21.43)}
