"""The monitoring HTTP server: ``/`` status page, ``/health`` and ``/metrics``.

A standard-library ThreadingHTTPServer in a daemon thread: read-only, GET and HEAD only, no
authentication (bind it to loopback or a management network; see ``[http]``). A failing page
answers 500 and is logged; it never touches the DICOM side of the node.
"""

from __future__ import annotations

import json
import logging
import threading
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
                 status_page: Callable[[], str]) -> None:
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
            self._httpd: ThreadingHTTPServer | None = ThreadingHTTPServer(
                (host, port), _handler(self.routes))
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
        event(log, "http.started", host=self.host, port=self.port,
              paths="/,/health,/metrics")

    def stop(self) -> None:
        if self._httpd is not None:
            if self._thread is not None:  # shutdown() waits for a serve_forever() to end
                self._httpd.shutdown()
                self._thread.join(10)
            self._httpd.server_close()
            self._httpd = None
            event(log, "http.stopped")


def _handler(routes: dict[str, Route]) -> type[BaseHTTPRequestHandler]:
    """The request handler class serving ``routes`` (GET and HEAD only)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "mammo-node"

        def do_GET(self) -> None:  # noqa: N802
            self._answer(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
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
