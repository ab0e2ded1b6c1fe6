"""Running the app under uvicorn: in the foreground (`tailor serve`) or on a background thread (desktop app, tests).

The listening socket is bound before any model loads, so a refused address or a port in use is reported at once.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

from app.core.errors import TailorError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8321
START_TIMEOUT_S = 30


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this computer without a key: anyone on the network could use the models."""
    if not is_loopback(host) and not api_key:
        raise TailorError(f"Refusing to listen on {host} without an API key: anyone who can reach this computer "
                          "could use your personas.",
                          f"Add --api-key KEY (clients then send 'Authorization: Bearer KEY'), or use --host {DEFAULT_HOST}.")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), ready for uvicorn to listen on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise TailorError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}.",
                          "Pick another --port (another program may be using this one) or another --host.") from None
    return sock


def url_for(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_server(app, log_level: str = "info"):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))


class ServerThread:
    """uvicorn serving `app` on `sock` from a daemon thread; `start()` returns once it accepts connections."""

    def __init__(self, app, sock: socket.socket, log_level: str = "warning"):
        self.sock = sock
        self.url = url_for(sock)
        self._server = uvicorn_server(app, log_level)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="tailor-http",
                                        daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise TailorError(f"The server on {self.url} did not start; the log says why.")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()
