"""Running the app: bind, serve with uvicorn, shut down gracefully on SIGTERM / Ctrl-C.

uvicorn's shutdown sequence does what issue #18 asks: on SIGTERM it closes the listening socket (no
new connections), lets in-flight responses finish -- streams included -- for up to
`timeout_graceful_shutdown` seconds, cancels what is left (whose engine requests are then cancelled,
app.py), and runs the lifespan shutdown, which stops the engine thread (scheduler.py). One thing is
changed: uvicorn re-raises the signal it caught once it has stopped (Server.capture_signals), so a
SIGTERM'd server would die *of* SIGTERM (exit status 143). A server that drained cleanly on SIGTERM
has done what was asked; here it exits 0. Ctrl-C keeps the shell's convention (130, via cli/main.py).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
from typing import Any, Iterator

from haipai_lightning.config import ConfigError


def bind(host: str, port: int) -> socket.socket:
    """A bound TCP socket (port 0: a free one); ConfigError if the address is unusable."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r} does not resolve ({e.strerror}); e.g. --host 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart without TIME_WAIT
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port "
                          "(0 picks a free one)") from None
    return sock


def run(app: Any, sock: socket.socket, shutdown_timeout: float = 10.0, log_level: str = "info",
        access_log: bool = False) -> None:
    """Serve `app` on the bound socket until SIGTERM / SIGINT; returns after a graceful shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):  # drained on SIGTERM: exit 0 instead of dying of the signal
                    captured[:] = [s for s in captured if s != signal.SIGTERM]

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout,
                            access_log=access_log)
    server = Server(config)
    server.run(sockets=[sock])
    if not server.started:  # uvicorn logged why (e.g. the app's startup failed)
        sys.exit(1)
