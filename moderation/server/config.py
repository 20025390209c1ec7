"""What `moderation serve` was told: the policy, the database, batching and request limits."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32  # images per engine batch
    max_wait_ms: float = 10.0  # how long the oldest waiting image may wait for a fuller batch
    queue_limit: int = 256  # images waiting for the engine before new requests get 429
    max_body_mb: float = 20.0  # request bodies over this get 413
    max_images: int = 16  # images per request
    fetch_urls: frozenset[str] = field(default_factory=frozenset)  # hosts images may come from
    auth: bool = True  # False: --no-auth, loopback only

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`: where --no-auth may listen."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
