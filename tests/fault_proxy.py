"""A fault-injecting HTTP proxy for tests: 127.0.0.1, one thread per connection.

Put it in front of a real server (e.g. :class:`mlflow_server.MlflowServer`) and point the
client at :attr:`FaultProxy.url`. Modes (:meth:`FaultProxy.set_mode`), for every new request:

* ``forward`` — pass the request to the upstream server and its answer back;
* ``refuse``  — accept the connection and close it at once, unanswered (the request never
  reaches the server);
* ``hang``    — accept the connection and never answer (a black-holed server), until
  :meth:`stop` or another mode releases it.

Rules for single requests (:meth:`fail_request`): the Nth request whose ``METHOD path``
contains a given text is refused (never reaches the server) or *dropped* (forwarded, the
server's answer read and thrown away: it reached the server, the client never hears back),
optionally switching the proxy to another mode right after (the server "died").
:meth:`on_request` runs a function just before the Nth matching request is forwarded
(another client acting on the server at that very moment: a race, made deterministic).

Every request is sent upstream with ``Connection: close`` (one request per connection, so
each one passes the rules) and the ``Host`` header of the upstream (servers that check
their allowed hosts accept it). Requests seen are recorded in :attr:`FaultProxy.log`
(``(method, path, action)``). Loops are bounded by socket timeouts; :meth:`stop` closes every
socket and joins the threads.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

HOST = "127.0.0.1"
_HEAD_MAX = 1 << 16
_IO_TIMEOUT = 30.0


@dataclass
class _Rule:
    match: str
    nth: int
    action: str  # "refuse" | "drop" | "call"
    then: str | None
    fn: Callable[[], object] | None = None
    seen: int = 0
    fired: bool = False


class FaultProxy:
    """A proxy to ``upstream_port`` on 127.0.0.1 (module docstring)."""

    def __init__(self, upstream_port: int, mode: str = "forward") -> None:
        self.upstream = (HOST, int(upstream_port))
        self.mode = mode
        self.rules: list[_Rule] = []
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._release = threading.Event()  # set: hanging connections give up (closed unanswered)
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind((HOST, 0))
        self._srv.listen(64)
        self._srv.settimeout(0.2)
        self.port = int(self._srv.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    # ------------------------------------------------------------------ control

    def start(self) -> FaultProxy:
        self._acceptor.start()
        return self

    def set_mode(self, mode: str) -> None:
        if mode not in ("forward", "refuse", "hang"):
            raise ValueError(f"unknown mode {mode!r}")
        with self._lock:
            if self.mode == "hang" and mode != "hang":
                self._release.set()  # let the hanging connections go
            self.mode = mode
            if mode == "hang":
                self._release.clear()

    def fail_request(self, match: str, *, nth: int = 1, action: str = "refuse", then: str | None = None) -> None:
        """Refuse (``action="refuse"``) or drop the answer of (``"drop"``) the ``nth`` request
        whose ``"METHOD path"`` contains ``match``; then switch to mode ``then`` (if given)."""
        if action not in ("refuse", "drop"):
            raise ValueError(f"unknown action {action!r}")
        with self._lock:
            self.rules.append(_Rule(match, nth, action, then))

    def on_request(self, match: str, fn: Callable[[], object], *, nth: int = 1) -> None:
        """Call ``fn()`` right before the ``nth`` request matching ``match`` is forwarded."""
        with self._lock:
            self.rules.append(_Rule(match, nth, "call", None, fn))

    def fired(self) -> bool:
        """Whether every rule has fired."""
        with self._lock:
            return all(r.fired for r in self.rules)

    def stop(self) -> None:
        self._stop.set()
        self._release.set()
        try:
            self._srv.close()
        except OSError:
            pass
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _close(s)
        if self._acceptor.is_alive():
            self._acceptor.join(timeout=5)
        for t in list(self._threads):
            t.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(_IO_TIMEOUT)
            with self._lock:
                self._socks.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()]
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _decide(self, method: str, path: str) -> str:
        fn = None
        with self._lock:
            key = f"{method} {path}"
            for r in self.rules:
                if not r.fired and r.match in key:
                    r.seen += 1
                    if r.seen == r.nth:
                        r.fired = True
                        if r.action != "call":
                            return f"{r.action}:{r.then or ''}"
                        fn = r.fn
                        break
            mode = self.mode
        if fn is not None:
            fn()  # outside the lock: it may talk to the server through this proxy too
            return "forward"
        return mode

    def _switch(self, then: str) -> None:
        if then:
            self.set_mode(then)

    def _serve(self, conn: socket.socket) -> None:
        up: socket.socket | None = None
        try:
            head, rest = _read_head(conn)
            if head is None:
                return
            method, path = _request_line(head)
            action = self._decide(method, path)
            self.log.append((method, path, action))
            if action == "hang":
                self._release.wait()  # released by stop() or a mode change; closed unanswered
                return
            if action == "refuse" or action.startswith("refuse:"):
                self._switch(action.partition(":")[2])
                return
            up = socket.create_connection(self.upstream, timeout=_IO_TIMEOUT)
            with self._lock:
                self._socks.add(up)
            up.sendall(_rewrite(head, self.upstream) + rest)
            pump = threading.Thread(target=_pump, args=(conn, up), daemon=True)  # the request body
            pump.start()
            if action.startswith("drop:"):
                while up.recv(65536):  # the server answers (Connection: close); nobody hears it
                    pass
                self._switch(action.partition(":")[2])
                return
            _pump(up, conn)
            pump.join(timeout=_IO_TIMEOUT)
        except OSError:
            pass
        finally:
            for s in (conn, up):
                if s is not None:
                    _close(s)
                    with self._lock:
                        self._socks.discard(s)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


def _read_head(conn: socket.socket) -> tuple[bytes | None, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk or len(buf) > _HEAD_MAX:
            return None, b""
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _request_line(head: bytes) -> tuple[str, str]:
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    return (parts[0], parts[1]) if len(parts) >= 2 else ("?", "?")


def _rewrite(head: bytes, upstream: tuple[str, int]) -> bytes:
    """``Connection: close`` and the upstream's ``Host``."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    out = [lines[0]]
    for line in lines[1:]:
        name = line.split(b":", 1)[0].strip().lower()
        if name in (b"connection", b"host", b"keep-alive"):
            continue
        out.append(line)
    out += [f"Host: {upstream[0]}:{upstream[1]}".encode(), b"Connection: close"]
    return b"\r\n".join(out) + b"\r\n\r\n"


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` → ``dst`` until ``src`` ends (or either fails)."""
    try:
        while True:
            chunk = src.recv(65536)
            if not chunk:
                break
            dst.sendall(chunk)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
