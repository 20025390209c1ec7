"""Running the app under uvicorn: in the foreground (`moderation serve`) or in a thread (tests,
`moderation bench`)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def uvicorn_config(app: Any, host: str, port: int, **options: Any) -> uvicorn.Config:
    # access_log off: uvicorn would print the client's path unescaped; the app logs an escaped
    # line itself (logger moderation.server.access).
    return uvicorn.Config(
        app, host=host, port=port, access_log=False, timeout_graceful_shutdown=10, **options
    )


def serve_forever(app: Any, host: str, port: int, log_level: str = "info") -> None:
    uvicorn.Server(uvicorn_config(app, host, port, log_level=log_level)).run()


class ThreadedServer:
    """uvicorn on a loopback port in a background thread; `with ThreadedServer(app) as s:`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(
            uvicorn_config(app, self.host, self.port, log_level="warning", lifespan="on")
        )
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(30)
