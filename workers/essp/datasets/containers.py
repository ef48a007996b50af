"""What a video file's own bytes say about it, before FFmpeg does: why an MP4/MOV or AVI will not open
(a truncated file, a missing index), and the FourCC an AVI declares. Used for :class:`essp.datasets.video.VideoError`'s
reasons."""

from __future__ import annotations

import struct


def container_diagnosis(data: bytes) -> str | None:
    """Why an MP4/MOV or AVI file would not open or shows no stream, from its own structure; None
    when the structure looks whole (or the format is another one)."""
    if data[:4] == b"RIFF" and len(data) >= 12:
        declared = struct.unpack("<I", data[4:8])[0] + 8
        if declared > len(data):
            return f"truncated AVI: the RIFF header declares {declared} bytes, the file has {len(data)}"
        return None
    if data[4:8] != b"ftyp":
        return None
    pos, found, cut = 0, set(), None
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1 and pos + 16 <= len(data):
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        elif size == 0:
            size = len(data) - pos
        if size < 8:
            return f"corrupt MP4: box at byte {pos} declares {size} bytes"
        if pos + size > len(data):
            cut = (kind.decode("latin-1"), len(data) - pos, size)
            break
        found.add(kind)
        pos += size
    if b"moov" in found:
        return None
    where = f"the file ends {cut[1]} bytes into a {cut[2]}-byte '{cut[0]}' box" if cut else "no 'moov' box"
    if cut and cut[0] == "moov":
        return f"moov atom cut short (truncated? {where})"
    return f"moov atom not found (truncated? {where})"


def avi_fourcc(data: bytes) -> str:
    """The video FourCC of an AVI header, for the error message (PyAV hides it when no decoder exists)."""
    at = data.find(b"strh", 0, 65536)
    if data[:4] != b"RIFF" or at < 0 or data[at + 8:at + 12] != b"vids":
        return ""
    return f" (FourCC {data[at + 12:at + 16].decode('latin-1')!r})"


# The containers ESSP opens, by the FFmpeg demuxer that reads them: a video's format is chosen from its own
# bytes (and, for a raw stream, its extension) and FFmpeg is told it, so that FFmpeg never probes a file
# against its hundreds of demuxers (playlists, SDP sessions, concat scripts among them, which open URLs).
ALLOWED_CONTAINERS = {
    "mov": "MP4/MOV", "avi": "AVI", "matroska": "Matroska/WebM", "mpegts": "MPEG-TS", "mpeg": "MPEG-PS",
    "mpegvideo": "MPEG video", "flv": "FLV", "asf": "ASF/WMV", "ogg": "Ogg", "h264": "raw H.264",
    "hevc": "raw H.265",
}
# MP4/MOV top-level boxes a file may start with (QuickTime files older than 'ftyp' start with others).
_MOV_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")
_ASF = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")
_HEVC_EXTENSIONS = (".h265", ".265", ".hevc")


def sniff_container(data: bytes, name: str) -> str | None:
    """The FFmpeg demuxer (a key of :data:`ALLOWED_CONTAINERS`) for these bytes, or None when they are in no
    allowed container. `name` (a path or URI) decides only between raw H.264 and H.265."""
    if data[4:8] in _MOV_BOXES:
        return "mov"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if data[:3] == b"FLV":
        return "flv"
    if data[:16] == _ASF:
        return "asf"
    if data[:4] == b"OggS":
        return "ogg"
    for size, at in ((188, 0), (192, 4)):  # MPEG-TS, and M2TS (a 4-byte timestamp before each packet)
        syncs = [data[i:i + 1] for i in range(at, min(len(data), at + 3 * size), size)]
        if len(syncs) >= 2 and set(syncs) == {b"\x47"}:
            return "mpegts"
    if data[:4] == b"\x00\x00\x01\xba":
        return "mpeg"
    if data[:4] == b"\x00\x00\x01\xb3":
        return "mpegvideo"
    start = 4 if data[:4] == b"\x00\x00\x00\x01" else 3 if data[:3] == b"\x00\x00\x01" else 0
    if start and len(data) > start:  # an Annex B start code: a raw H.264 or H.265 stream
        return "hevc" if name.lower().endswith(_HEVC_EXTENSIONS) else "h264"
    return None


def describe_bytes(data: bytes) -> str:
    """What bytes that are in no allowed container look like, for the error message."""
    head = data[:4096]
    for magic, kind in ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                        (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "gzip data"),
                        (b"ID3", "MP3 audio"), (b"fLaC", "FLAC audio")):
        if head.startswith(magic):
            return kind
    if data[:4] == b"RIFF":
        return f"a RIFF file of type {data[8:12].decode('latin-1')!r}, not AVI"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        stripped = text.lstrip("\ufeff \r\n\t")
        for start, kind in (("#EXTM3U", "an HLS/M3U playlist"), ("ffconcat", "an FFmpeg concat script"),
                            ("v=0", "an SDP session description"), ("<?xml", "XML"), ("<MPD", "a DASH manifest")):
            if stripped.startswith(start):
                return f"text: {kind}"
        return "text"
    return "binary data"
