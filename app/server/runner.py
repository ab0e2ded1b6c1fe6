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


class BackgroundServer:
    """The whole of `tailor serve` on background threads: what the desktop app's "Serve to other apps" runs.

    `start` loads the model (seconds to minutes), so callers run it off the GUI thread; so is `stop`.
    """

    def __init__(self, engine, http: ServerThread, api_key: str | None):
        self.engine, self.http, self.api_key = engine, http, api_key

    @staticmethod
    def load_session(library, base: str = "auto", quant: str = "auto", progress=None):
        """The ChatSession `start` serves by default: `base` ('auto': the one most of the library's personas were
        trained on) held as `quant`."""
        from app.core.chat import ChatSession, base_for

        entries = [entry for entry in library.entries() if entry.ok]
        base, made_with_quant = base_for(entries, None if base == "auto" else base, None if quant == "auto" else quant)
        return ChatSession(base, quant if quant == "auto" else made_with_quant, progress=progress)

    @classmethod
    def start(cls, library, base: str = "auto", quant: str = "auto", host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
              api_key: str | None = None, progress=None, open_session=None) -> BackgroundServer:
        """Serve the ChatSession `open_session()` gives (the desktop app: the one its chat shares), by default a new
        one of `base` as `quant`; the address is bound first, so a port in use fails before anything loads."""
        from app.core.serving import ServingEngine
        from app.server.app import create_app

        check_exposure(host, api_key)
        sock = bind(host, port)
        try:
            session = open_session() if open_session else cls.load_session(library, base, quant, progress)
            engine = ServingEngine(session, library)
            engine.load_available(progress)
            engine.start()
            return cls(engine, ServerThread(create_app(engine, api_key), sock).start(), api_key)
        except BaseException:
            sock.close()
            raise

    @property
    def url(self) -> str:
        return self.http.url

    def model_names(self) -> list[str]:
        return self.engine.model_names()

    def stop(self) -> None:
        """Stop listening and decoding, and let go of both: whoever still refers to this object (the job that
        stopped it) must not keep the model alive, which the desktop app's chat may be sharing or wants freed."""
        self.http.stop()
        self.engine.close()
        self.http = self.engine = None
