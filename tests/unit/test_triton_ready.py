"""TritonServer.wait_ready: ready means Triton answers ready over HTTP *and* its metrics port
listens. Triton starts its metrics service last, tens of milliseconds after HTTP answers ready;
a test that scraped /metrics right after start() returned was refused (a fresh-clone e2e run)."""
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trident.child_process import free_port
from trident.triton_launcher import TritonPorts, TritonServer, TritonStartError


class _Ready(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_ready():
    server = ThreadingHTTPServer(("localhost", 0), _Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _server(tmp_path, http_port, metrics_port):
    return TritonServer(model_repository=tmp_path, work_dir=tmp_path,
                        ports=TritonPorts(http=http_port, grpc=free_port(), metrics=metrics_port))


def test_wait_ready_waits_for_the_metrics_port(tmp_path, http_ready):
    metrics_port = free_port()
    server = _server(tmp_path, http_ready, metrics_port)
    assert server.is_ready() and not server.metrics_listening()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def open_metrics_later():
        time.sleep(1.0)
        listener.bind(("localhost", metrics_port))
        listener.listen()

    opener = threading.Thread(target=open_metrics_later)
    started = time.monotonic()
    opener.start()
    try:
        server.wait_ready(timeout=10)
        assert time.monotonic() - started >= 1.0  # not on HTTP's ready alone
        assert server.metrics_listening()
    finally:
        opener.join()
        listener.close()


def test_a_metrics_port_that_never_listens_is_not_ready(tmp_path, http_ready):
    server = _server(tmp_path, http_ready, free_port())
    with pytest.raises(TritonStartError, match="not ready after"):
        server.wait_ready(timeout=1.5)
