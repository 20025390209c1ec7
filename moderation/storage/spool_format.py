"""The spool's record format, and a scan that finds every intact record around damaged ones.

Record: header `<4sBII` = magic b"MSPL", kind (1 policy, 2 decisions, 3 target), payload length,
crc32(kind byte + payload); then the payload, compact JSON (arrays as base64). A file written by
this version starts with a `target` record naming the database its decisions are meant for
(files of earlier versions have none). Readers skip records of kinds they do not know.

A damaged record (bad header, length or checksum) does not hide the records after it: the scan
resynchronises on the next magic whose header and checksum are valid. A false match needs the
magic, a known kind, a length inside the file and a matching crc32 at once.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from moderation.storage.db import json_dumps
from moderation.storage.errors import StorageError

MAGIC = b"MSPL"
HEADER = struct.Struct("<4sBII")
KINDS = {"policy": 1, "decisions": 2, "target": 3}
KIND_NAMES = {v: k for k, v in KINDS.items()}
MAX_RECORD_BYTES = 1 << 30  # a larger length field can only be garbage
_SEARCH_CHUNK = 1 << 20  # bytes read at a time while looking for the next record


class SpoolRecordError(StorageError):
    """A record whose checksum is right but whose payload is not what this version writes."""


def encode_record(kind: str, payload: dict[str, Any]) -> bytes:
    """Header and payload of one record."""
    body = json_dumps(payload).encode("utf-8")
    kind_byte = KINDS[kind]
    crc = zlib.crc32(body, zlib.crc32(bytes([kind_byte])))
    return HEADER.pack(MAGIC, kind_byte, len(body), crc) + body


@dataclass(frozen=True)
class SpoolRecord:
    """One intact record of a spool file: where it is, its kind and its payload bytes."""

    start: int
    end: int
    kind: str
    body: bytes

    def raw(self) -> bytes:
        """The record as stored (header and payload), to copy it elsewhere unchanged."""
        crc = zlib.crc32(self.body, zlib.crc32(bytes([KINDS[self.kind]])))
        return HEADER.pack(MAGIC, KINDS[self.kind], len(self.body), crc) + self.body

    def payload(self) -> dict[str, Any]:
        """The decoded payload; SpoolRecordError when it is not a JSON object."""
        try:
            data = json.loads(self.body.decode("utf-8"))  # we write UTF-8, never UTF-16
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SpoolRecordError(f"its payload is not JSON ({err})") from err
        if not isinstance(data, dict):
            raise SpoolRecordError(f"its payload is a JSON {type(data).__name__}, not an object")
        return data


def record_at(fd: int, offset: int, size: int) -> SpoolRecord | None:
    """The intact record that starts at `offset`, or None."""
    if offset + HEADER.size > size:
        return None
    magic, kind, length, crc = HEADER.unpack(os.pread(fd, HEADER.size, offset))
    if magic != MAGIC or kind not in KIND_NAMES or length > MAX_RECORD_BYTES:
        return None
    end = offset + HEADER.size + length
    if end > size:
        return None
    body = os.pread(fd, length, offset + HEADER.size)
    if zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
        return None
    return SpoolRecord(offset, end, KIND_NAMES[kind], body)


def _next_record(fd: int, start: int, size: int) -> SpoolRecord | None:
    """The first intact record that starts at or after `start`."""
    offset = start
    while offset + HEADER.size <= size:
        chunk = os.pread(fd, min(_SEARCH_CHUNK, size - offset), offset)
        at = chunk.find(MAGIC)
        while at != -1:
            found = record_at(fd, offset + at, size)
            if found is not None:
                return found
            at = chunk.find(MAGIC, at + 1)
        # The next chunk overlaps by a magic's length minus one, for a magic cut in two.
        offset += max(len(chunk) - (len(MAGIC) - 1), 1)
    return None


def scan(fd: int) -> Iterator[SpoolRecord]:
    """Every intact record of a file, in order; damaged bytes between them are skipped."""
    size = os.fstat(fd).st_size
    offset = 0
    while offset + HEADER.size <= size:
        record = record_at(fd, offset, size) or _next_record(fd, offset + 1, size)
        if record is None:
            return
        yield record
        offset = record.end


def is_torn_tail(fd: int, start: int, size: int) -> bool:
    """A crash leaves a prefix of the last record, or a full-length last record of junk/zeros."""
    if size - start < HEADER.size:
        return True
    magic, _, length, _ = HEADER.unpack(os.pread(fd, HEADER.size, start))
    if magic == MAGIC:
        return start + HEADER.size + length >= size
    return not os.pread(fd, size - start, start).strip(b"\0")
