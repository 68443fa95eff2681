"""The monitoring HTTP server: ``/`` status page, ``/health`` and ``/metrics``.

A standard-library ThreadingHTTPServer in a daemon thread: read-only, GET and HEAD only, no
authentication (bind it to loopback or a management network; see ``[http]``). A failing page
answers 500 and is logged; it never touches the DICOM side of the node.

Bounded, so that a slow or hostile client (slowloris) cannot hold threads: at most
``http.max_connections`` at once (beyond: 503 and close, in the accept loop), ``http.idle_timeout``
seconds of silence per read, and ``http.request_timeout`` for the whole exchange (request and
response; one reaper thread shuts connections past their deadline). One request per connection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from node import metrics
from node.log import event

log = logging.getLogger("node.httpd")

#: path -> () -> (status, content type, body)
Route = Callable[[], tuple[int, str, bytes]]


class MonitoringServer:
    def __init__(self, host: str, port: int, *, health: Callable[[], tuple[bool, dict[str, Any]]],
                 status_page: Callable[[], str], request_timeout: float = 10.0,
                 idle_timeout: float = 5.0, max_connections: int = 32) -> None:
        self.host, self.port = host, port
        self.routes: dict[str, Route] = {
            "/": lambda: (200, "text/html; charset=utf-8", status_page().encode()),
            "/health": lambda: self._health(health),
            "/metrics": lambda: (200, metrics.CONTENT_TYPE, metrics.render()),
        }
        self._thread: threading.Thread | None = None
        # Bound here, not in start(): a port in use stops start-up with a clear message before
        # the DICOM listener opens.
        try:
            self._httpd: _BoundedServer | None = _BoundedServer(
                (host, port), _handler(self.routes, idle_timeout), request_timeout,
                max_connections)
        except OSError as exc:
            raise OSError(f"[http] cannot listen on {host}:{port}: {exc.strerror or exc}"
                          ) from exc
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]

    @staticmethod
    def _health(check: Callable[[], tuple[bool, dict[str, Any]]]) -> tuple[int, str, bytes]:
        ok, report = check()
        return (200 if ok else 503, "application/json",
                json.dumps(report, indent=2).encode())

    def start(self) -> None:
        if self._httpd is None:
            raise RuntimeError("the monitoring server was stopped")
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="httpd",
                                        daemon=True)
        self._thread.start()
        self._httpd.start_reaper()
        event(log, "http.started", host=self.host, port=self.port,
              paths="/,/health,/metrics")

    def stop(self) -> None:
        if self._httpd is not None:
            if self._thread is not None:  # shutdown() waits for a serve_forever() to end
                self._httpd.shutdown()
                self._thread.join(10)
            self._httpd.stop_reaper()
            self._httpd.server_close()
            self._httpd = None
            event(log, "http.stopped")


_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
         b"Content-Length: 22\r\nConnection: close\r\n\r\ntoo many connections\r\n")


class _BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a connection cap and a deadline per connection."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 request_timeout: float, max_connections: int) -> None:
        super().__init__(address, handler)
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._deadlines: dict[int, tuple[socket.socket, float]] = {}
        self._reaper_stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._last_busy_log = 0.0

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            busy = len(self._deadlines) >= self.max_connections
            if not busy:
                self._deadlines[id(request)] = (request, time.monotonic() +
                                                self.request_timeout)
        if busy:  # answered in the accept loop without blocking, then closed
            metrics.http_connection_cut("over_limit")
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(_BUSY)
            self.shutdown_request(request)
            now = time.monotonic()
            if now - self._last_busy_log > 10:
                self._last_busy_log = now
                event(log, "http.refused", logging.WARNING, peer=client_address[0],
                      reason=f"http.max_connections = {self.max_connections} open")
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._deadlines.pop(id(request), None)

    def start_reaper(self) -> None:
        self._reaper = threading.Thread(target=self._reap, name="httpd-reaper", daemon=True)
        self._reaper.start()

    def stop_reaper(self) -> None:
        self._reaper_stop.set()

    def _reap(self) -> None:
        step = min(0.5, self.request_timeout / 4)
        while not self._reaper_stop.wait(step):
            now = time.monotonic()
            with self._lock:
                late = [sock for sock, deadline in self._deadlines.values() if deadline < now]
            for sock in late:
                metrics.http_connection_cut("request_timeout")
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _handler(routes: dict[str, Route], idle_timeout: float = 5.0
             ) -> type[BaseHTTPRequestHandler]:
    """The request handler class serving ``routes`` (GET and HEAD only)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "mammo-node"
        timeout = idle_timeout  # seconds of silence per read (socketserver sets it on setup)

        def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
            if format.startswith("Request timed out"):  # the idle timeout closed it
                metrics.http_connection_cut("idle_timeout")
            self.log_message(format, *args)

        def do_GET(self) -> None:
            self._answer(head=False)

        def do_HEAD(self) -> None:
            self._answer(head=True)

        def _answer(self, head: bool) -> None:
            path = self.path.split("?", 1)[0]
            route = routes.get(path)
            if route is None:
                status, ctype, body = 404, "text/plain; charset=utf-8", b"not found\n"
            else:
                try:
                    status, ctype, body = route()
                except Exception as exc:
                    log.exception("http.error path=%s", path)
                    status, ctype = 500, "text/plain; charset=utf-8"
                    body = f"internal error: {type(exc).__name__}\n".encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("http.request peer=%s %s", self.address_string(), format % args)

    return Handler
