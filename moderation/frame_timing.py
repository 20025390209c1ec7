"""How long each frame of an animation is shown, read from the file's structure, not decoded.

GIF, APNG and WebP frames are composited onto the whole canvas, and Pillow decodes every frame
before the one it seeks to: reading durations through Pillow would decode the whole animation
once just to choose which frames to judge, then again to judge them. These readers walk the
container instead (GIF graphic control extensions, APNG `fcTL` chunks, WebP `ANMF` chunks), so
an animation's frames are decoded once. None means "cannot tell": the caller then asks Pillow.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

MAX_FRAMES_READ = 100_000  # a container claiming more is not walked (the caller refuses it)


def durations_ms(path: str | Path, image_format: str | None) -> list[int] | None:
    """Each frame's display time in ms, in Pillow's frame order, or None."""
    readers = {"GIF": _gif, "PNG": _apng, "WEBP": _webp}
    reader = readers.get(image_format or "")
    if reader is None:
        return None
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return reader(data)
    except (OSError, ValueError, IndexError, struct.error):
        return None


def _sub_blocks_end(data, pos: int) -> int:
    """The position after a GIF data sub-block sequence that starts at `pos`."""
    while True:
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos


def _gif(data) -> list[int] | None:
    if data[:3] != b"GIF":
        return None
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    durations: list[int] = []
    delay = 0
    while pos < len(data) and len(durations) < MAX_FRAMES_READ:
        block = data[pos]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: a graphic control extension holds the next frame's delay
            label = data[pos + 1]
            if label == 0xF9 and data[pos + 2] >= 4:
                delay = struct.unpack_from("<H", data, pos + 4)[0] * 10
            pos = _sub_blocks_end(data, pos + 2)
        elif block == 0x2C:  # image descriptor, local colour table, LZW code size, image data
            local = data[pos + 9]
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
            pos = _sub_blocks_end(data, pos + 1)
            durations.append(delay)  # like Pillow, a frame without its own GCE keeps the last
        else:
            return None
    return durations or None


def _apng(data) -> list[int] | None:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    pos, durations, seen_idat, default_separate = 8, [], False, False
    while pos + 8 <= len(data) and len(durations) < MAX_FRAMES_READ:
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = pos + 8
        if kind == b"fcTL":
            if seen_idat and not durations:
                default_separate = True  # the IDAT image is not part of the animation
            number, den = struct.unpack_from(">HH", data, body + 20)
            durations.append(int(number * 1000 / (den or 100)))
        elif kind == b"IDAT":
            seen_idat = True
        elif kind == b"IEND":
            break
        pos = body + length + 4
    if not durations:
        return None
    # Pillow counts a default image that is not an animation frame as frame 0 (shown 0 ms).
    return [0, *durations] if default_separate else durations


def _webp(data) -> list[int] | None:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    pos, durations = 12, []
    while pos + 8 <= len(data) and len(durations) < MAX_FRAMES_READ:
        kind, length = struct.unpack_from("<4sI", data, pos)
        if kind == b"ANMF":
            low, high = struct.unpack_from("<HB", data, pos + 8 + 12)
            durations.append(low | high << 16)
        pos += 8 + length + (length & 1)
    return durations or None
