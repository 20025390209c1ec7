"""Decision ids: time-ordered UUIDs (version 7, RFC 9562) as text, from one generator.

An id starts with the Unix time in milliseconds, so ids sort in the order they were made: the
log's "oldest first" and `--limit` follow the id even when one batch's decisions share a time.
Within a process the ids are strictly increasing: ids made in the same millisecond (a batch, or
two batches in a row) count up from a random start, and a clock that steps back never makes an
id smaller than the last one.
"""

from __future__ import annotations

import os
import threading
import time

_VERSION = 0x7 << 76  # the version nibble of a 128-bit UUID
_VARIANT = 0b10 << 62  # RFC 9562 variant bits
_COUNTER_BITS = 74  # rand_a (12 bits) and rand_b (62 bits) hold the per-millisecond counter
# A new millisecond's counter starts below 2**72, leaving 3/4 of the space to count up in.
_START_BITS = 72

_lock = threading.Lock()
_last_ms = 0
_next = 0  # the next counter value in _last_ms


def _reserve(n: int) -> tuple[int, int]:
    """The millisecond and the first of n consecutive counter values, never used before."""
    global _last_ms, _next
    with _lock:
        now = time.time_ns() // 1_000_000
        if now > _last_ms:
            _last_ms, _next = now, int.from_bytes(os.urandom(9), "big") >> (72 - _START_BITS)
        if _next + n > 1 << _COUNTER_BITS:  # counted out this millisecond: borrow the next
            _last_ms += 1
            _next = 0
        first = _next
        _next += n
        return _last_ms, first


def _text(ms: int, counter: int) -> str:
    rand_a, rand_b = counter >> 62, counter & ((1 << 62) - 1)
    h = f"{(ms << 80) | _VERSION | (rand_a << 64) | _VARIANT | rand_b:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_decision_ids(n: int) -> list[str]:
    """n time-ordered UUIDs, each greater than every id this process made before."""
    if n <= 0:
        return []
    ms, first = _reserve(n)
    last = first + n - 1
    if first >> 48 != last >> 48:  # the count carries past the last 12 hex digits
        return [_text(ms, c) for c in range(first, last + 1)]
    prefix = _text(ms, first)[:-12]  # the same for the whole batch
    low = first & (1 << 48) - 1
    return [f"{prefix}{c:012x}" for c in range(low, low + n)]


def new_decision_id() -> str:
    """One time-ordered UUID (see `new_decision_ids`)."""
    return new_decision_ids(1)[0]
