"""Decompression bombs built in-process, in bytes: a huge canvas and many tiny frames (GIF,
APNG, WebP), and many huge pages (TIFF). Each file is small; decoding it naively is not."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def gif_bomb(side: int, frames: int) -> bytes:
    """A side x side canvas and `frames` 1x1 frames shown 100 ms each."""
    out = [b"GIF89a", struct.pack("<HHBBB", side, side, 0x80, 0, 0), b"\x00\x00\x00\xff\xff\xff"]
    out.append(b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00")  # loop forever
    for _ in range(frames):
        out.append(b"\x21\xf9\x04\x00" + struct.pack("<H", 10) + b"\x00\x00")  # 100 ms
        out.append(b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0))
        # LZW, minimum code size 2: clear (4), pixel 0, end (5) in 3-bit codes.
        out.append(b"\x02\x02\x44\x01\x00")
    out.append(b"\x3b")
    return b"".join(out)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def apng_bomb(side: int, frames: int) -> bytes:
    """A side x side greyscale first frame (all black) and `frames - 1` 1x1 frames."""
    rows = zlib.compress(bytes(side * (side + 1)), 9)
    seq = 0

    def fctl(w: int, h: int) -> bytes:
        nonlocal seq
        body = struct.pack(">IIIIIHHBB", seq, w, h, 0, 0, 1, 10, 0, 0)
        seq += 1
        return _chunk(b"fcTL", body)

    out = [
        b"\x89PNG\r\n\x1a\n",
        _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)),
    ]
    out += [_chunk(b"acTL", struct.pack(">II", frames, 0)), fctl(side, side), _chunk(b"IDAT", rows)]
    for _ in range(frames - 1):
        control = fctl(1, 1)
        data = _chunk(b"fdAT", struct.pack(">I", seq) + zlib.compress(b"\x00\x00"))
        seq += 1
        out += [control, data]
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


def _riff_chunk(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("<I", len(body)) + body + (b"\x00" if len(body) & 1 else b"")


def webp_bomb(side: int, frames: int) -> bytes:
    """A side x side animated WebP canvas and `frames` 1x1 lossless frames of 100 ms."""
    tiny = io.BytesIO()
    Image.new("RGBA", (1, 1), (0, 0, 0, 255)).save(tiny, format="WEBP", lossless=True)
    data = tiny.getvalue()
    assert data[12:16] == b"VP8L", "Pillow wrote a lossless WebP without a VP8L chunk"
    vp8l = data[12:]  # the frame's own chunk, header included
    size = struct.pack("<I", side - 1)[:3]
    out = [_riff_chunk(b"VP8X", bytes([0x12, 0, 0, 0]) + size + size)]  # animation + alpha
    out.append(_riff_chunk(b"ANIM", b"\xff\xff\xff\xff\x00\x00"))
    frame = b"\x00" * 6 + b"\x00" * 6 + struct.pack("<I", 100)[:3] + b"\x00"
    out += [_riff_chunk(b"ANMF", frame + vp8l) for _ in range(frames)]
    body = b"WEBP" + b"".join(out)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tiff_bomb(side: int, pages: int) -> bytes:
    """`pages` blank side x side bilevel pages, Group 4 compressed."""
    page = Image.new("1", (side, side), 1)
    out = io.BytesIO()
    page.save(
        out, format="TIFF", compression="group4", save_all=True, append_images=[page] * (pages - 1)
    )
    return out.getvalue()
