"""A TCP proxy in front of PostgreSQL that tests can cut, to make the database go away and come back."""

import contextlib
import socket
import threading


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; `stop()` drops every connection and refuses new ones.

    Setting `stalled` makes it go silent instead: connections stay open but nothing gets through,
    as with a frozen database host or a network partition behind a load balancer. `cut_at` drops
    everything at one exact moment: when the client next sends a given statement.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self.stalled = threading.Event()
        self._cut_marker: bytes | None = None
        self._cut_after_sending = False

    def cut_at(self, marker: bytes, after_sending: bool = False) -> None:
        """Once: `stop()` as soon as the client sends data containing `marker` (a statement's text),
        before it reaches the database, or just after when `after_sending` (its answer never comes back)."""
        with self._lock:
            self._cut_marker, self._cut_after_sending = marker, after_sending

    def _cuts_here(self, data: bytes) -> bool | None:
        """None to forward as usual; else whether to forward `data` before the cut."""
        with self._lock:
            if self._cut_marker is None or self._cut_marker not in data:
                return None
            self._cut_marker = None
            return self._cut_after_sending

    def start(self) -> None:
        """Accept connections (on the same port as before, after a `stop`)."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Close the listener and every open connection, as a database that went away would."""
        if self._listener is not None:
            with contextlib.suppress(OSError):  # shutdown wakes the thread blocked in accept()
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._connections += [client, upstream]
            for source, sink, from_client in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(source, sink, from_client), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                forward_then_cut = self._cuts_here(data) if from_client else None
                if forward_then_cut is not None:
                    if forward_then_cut:
                        sink.sendall(data)
                    self.stop()
                    return
                if not self.stalled.is_set():
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
