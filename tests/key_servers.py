"""Key servers that misbehave for real: on a real socket, each connection answered in a thread of its own.

`HangingKeyServer` accepts and never answers, `TricklingKeyServer` sends a byte every half second forever,
`BodyKeyServer` sends whatever bytes and headers a test gives it (and may then hang). Each counts its
connections, notices when the client hangs up, and holds on until `release()` (or the end of its `with`).
"""

import contextlib
import socket
import threading
from types import TracebackType
from typing import Self

KEY_SET_PATH = "/api/auth/jwks"
# How often the accept loop and a hanging answer look up from waiting, to notice a release or a hang-up.
POLL_SECONDS = 0.1
MAX_REQUEST_HEAD_BYTES = 65_536
SOCKET_TIMEOUT_SECONDS = 30.0


class RawKeyServer:
    """A TCP server on 127.0.0.1 whose subclasses decide, in `answer`, what each connection gets."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self._listener.settimeout(POLL_SECONDS)
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self.request_paths: list[str] = []
        self.bytes_sent = 0
        self.released = threading.Event()  # set by the test: stop misbehaving and close every connection
        self.hung_up = threading.Event()  # set when a client closed its end while it was still being answered
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._accepting = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def base_url(self) -> str:
        """The base URL, standing in for Better Auth's (`BETTER_AUTH_URL`)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def jwks_url(self) -> str:
        """Where Better Auth would publish its keys on this server."""
        return f"{self.base_url}{KEY_SET_PATH}"

    def __enter__(self) -> Self:
        self._accepting.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
        self._accepting.join(timeout=SOCKET_TIMEOUT_SECONDS)

    def release(self) -> None:
        """Stop misbehaving: every connection still open is closed, and new ones are refused."""
        self.released.set()
        self._listener.close()
        with self._lock:
            connections, self._open = self._open, []
        for connection in connections:
            _close(connection)

    def answer(self, connection: socket.socket) -> None:
        """Answer one request, whose head has been read; the connection is closed afterwards."""
        raise NotImplementedError

    def send(self, connection: socket.socket, data: bytes) -> bool:
        """Send `data`; False (and `hung_up` set) when the client has gone."""
        try:
            connection.sendall(data)
        except OSError:
            self.hung_up.set()
            return False
        self.bytes_sent += len(data)
        return True

    def wait_for_release_or_hang_up(self, connection: socket.socket) -> None:
        """Hold the connection, saying nothing, until the test releases it or the client closes its end."""
        connection.settimeout(POLL_SECONDS)
        while not self.released.is_set():
            try:
                if connection.recv(1) == b"":
                    self.hung_up.set()
                    return
            except TimeoutError:
                continue
            except OSError:
                self.hung_up.set()
                return

    def _accept_loop(self) -> None:
        while not self.released.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._open.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            connection.settimeout(SOCKET_TIMEOUT_SECONDS)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST_HEAD_BYTES:
                chunk = connection.recv(4096)
                if not chunk:
                    return
                head += chunk
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            self.request_paths.append(request_line[1] if len(request_line) > 1 else "")
            self.answer(connection)
        except OSError:
            self.hung_up.set()
        finally:
            _close(connection)


class HangingKeyServer(RawKeyServer):
    """Accepts, reads the request, and never answers."""

    def answer(self, connection: socket.socket) -> None:
        """Say nothing until released."""
        self.wait_for_release_or_hang_up(connection)


class TricklingKeyServer(RawKeyServer):
    """Answers one byte every `interval` seconds, forever: in the headers, or in the body after prompt headers."""

    def __init__(self, during: str = "body", interval: float = 0.5) -> None:
        super().__init__()
        if during not in {"headers", "body"}:
            raise ValueError(during)
        self.during = during
        self.interval = interval

    def answer(self, connection: socket.socket) -> None:
        """A status line, then a header value or a JSON body that never ends (spaces are valid JSON padding)."""
        if self.during == "body":
            opening = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
            drip = b" "
        else:
            opening, drip = b"HTTP/1.1 200 OK\r\nX-Slowly: ", b"a"
        if not self.send(connection, opening):
            return
        while not self.released.wait(self.interval):
            if not self.send(connection, drip):
                return


class BodyKeyServer(RawKeyServer):
    """Answers 200 with `headers` and the chunks of `body`, then closes, or with `then_hang`, holds on silently."""

    def __init__(self, body: list[bytes], headers: dict[str, str] | None = None, then_hang: bool = False) -> None:
        super().__init__()
        self.body = body
        self.headers = headers if headers is not None else {"Content-Type": "application/json"}
        self.then_hang = then_hang

    def answer(self, connection: socket.socket) -> None:
        """The configured answer; without a Content-Length, the body ends when the connection closes."""
        head = "".join(f"{name}: {value}\r\n" for name, value in self.headers.items())
        if not self.send(connection, f"HTTP/1.1 200 OK\r\n{head}Connection: close\r\n\r\n".encode("latin-1")):
            return
        for chunk in self.body:
            if not self.send(connection, chunk):
                return
        if self.then_hang:
            self.wait_for_release_or_hang_up(connection)


def _close(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed, by the other side or by `release`
        connection.shutdown(socket.SHUT_RDWR)
    connection.close()
