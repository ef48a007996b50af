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
