"""The real serving stack minus Triton: gunicorn + GeventGrpcWorker + TritonBackend, against the
fake Triton gRPC server in a subprocess. Checks that the worker class makes gRPC work under
gevent (no lock-up), that streams run concurrently in one worker, and that a client disconnect
cancels the gRPC call."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from testkit import AUTH, KEY, free_port
import requests
from gateway_fakes import wait_until

ROOT = Path(__file__).resolve().parents[2]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


@contextlib.contextmanager
def serving(work: Path, *, preload: bool = False, extra_env: dict | None = None, scheme: str = "http",
            workers: int = 1):
    """The fake Triton and gunicorn (one worker unless told) in front of it; yields (url, cancel
    log, gateway log, gunicorn's pid)."""
    cancel_log = work / "cancelled.txt"
    cancel_log.touch()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "unit")])}
    triton_port, http_port = free_port(), free_port()
    procs = []
    logs = []
    try:
        triton_log = open(work / "triton.log", "w")
        logs.append(triton_log)
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests/unit/gateway_fakes.py"), str(triton_port), str(cancel_log)],
            env=env, stdout=triton_log, stderr=subprocess.STDOUT,
        ))
        wait_for_port(triton_port, procs[0])
        gateway_log = open(work / "gateway.log", "w")
        logs.append(gateway_log)
        gunicorn = Path(sys.executable).with_name("gunicorn")
        procs.append(subprocess.Popen(
            [str(gunicorn), "-c", "python:gateway.gunicorn_conf", "-w", str(workers), "-b", f"127.0.0.1:{http_port}",
             *(["--preload"] if preload else []), "gateway:create_app()"],
            cwd=ROOT, stdout=gateway_log, stderr=subprocess.STDOUT,
            env={**env, "TRIDENT_API_KEY": KEY, "TRIDENT_TRITON_GRPC_URL": f"127.0.0.1:{triton_port}",
                 "TRIDENT_HEARTBEAT_INTERVAL": "0.1", "GATEWAY_DRAIN_TIMEOUT": "2",
                 "TRIDENT_SEND_TIMEOUT": "2", **(extra_env or {})},
        ))
        wait_for_port(http_port, procs[1])
        yield f"{scheme}://127.0.0.1:{http_port}", cancel_log, work / "gateway.log", procs[1].pid
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for f in logs:
            f.close()


@pytest.fixture(scope="module", params=[False, True], ids=["no-preload", "preload"])
def stack(request, tmp_path_factory):
    with serving(tmp_path_factory.mktemp("gunicorn"), preload=request.param) as running:
        yield running


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory):
    """The same over HTTPS (GATEWAY_CERTFILE/GATEWAY_KEYFILE), with a self-signed certificate;
    yields the stack and the certificate's path."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (Debian: apt-get install -y openssl)")
    work = tmp_path_factory.mktemp("gunicorn-tls")
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with serving(work, extra_env={"GATEWAY_CERTFILE": str(cert), "GATEWAY_KEYFILE": str(key)},
                 scheme="https") as running:
        yield running, cert


def test_completion_stream_and_readiness(stack):
    url, _, _, _ = stack
    assert requests.get(url + "/readyz", timeout=10).status_code == 200
    response = requests.post(url + "/generate", json={"prompt": "Hi there"}, headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "Hello, world"
    response = requests.post(url + "/generate", json={"prompt": "Hi", "stream": True}, headers=AUTH, timeout=10)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.text.count("event: token") == 3 and "event: done" in response.text
    response = requests.post(url + "/generate", json={"prompt": "error-400", "stream": True}, headers=AUTH, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_gunicorns_control_socket_is_off(stack):
    """One fixed path in $HOME for every gunicorn of a host (docs in gateway.gunicorn_conf)."""
    url, _, gateway_log, _ = stack
    assert requests.get(url + "/readyz", timeout=10).status_code == 200  # the master has spawned its worker
    # gunicorn's master starts the control socket right after its workers (the same second)
    assert not wait_until(lambda: "Control socket listening" in gateway_log.read_text(), timeout=2), \
        gateway_log.read_text()


def test_concurrent_streams_heartbeat_and_disconnect_cancels(stack):
    url, cancel_log, gateway_log, _ = stack
    before = cancel_log.read_text().count("slow")
    n = 8
    got_heartbeat = []

    def client():
        with requests.post(url + "/generate", json={"prompt": "slow", "stream": True}, headers=AUTH,
                           stream=True, timeout=10) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines) == b"event: token"
            for line in lines:
                if line == b": keep-alive":
                    got_heartbeat.append(1)
                    break
        # leaving the with-block closes the connection: a client disconnect

    threads = [threading.Thread(target=client) for _ in range(n)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert len(got_heartbeat) == n, gateway_log.read_text()[-3000:]
    assert time.monotonic() - started < 10  # concurrent, not one after another
    # the gateway notices each disconnect on its next heartbeat write and cancels the gRPC call
    assert wait_until(lambda: cancel_log.read_text().count("slow") == before + n, timeout=5), (
        cancel_log.read_text(), gateway_log.read_text()[-3000:])
    # and the worker still answers
    response = requests.post(url + "/generate", json={"prompt": "Hi there"}, headers=AUTH, timeout=10)
    assert response.status_code == 200


def test_a_client_that_stops_reading_is_cut_off_after_the_send_timeout(stack):
    """A client that takes no more bytes (a frozen process: its kernel acknowledges with a zero
    window, so the connection never fails) once the kernel's buffers are full: the write that
    blocks ends after SEND_TIMEOUT (2 s here), the connection closes and the generation is
    cancelled. Without the timeout the worker waited on it for as long as the client lived."""
    url, cancel_log, gateway_log, _ = stack
    before = cancel_log.read_text().count("flood")
    body = json.dumps({"prompt": "flood", "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert sock.recv(12) == b"HTTP/1.1 200"  # admitted; from now on it reads nothing
        started = time.monotonic()
        assert wait_until(lambda: cancel_log.read_text().count("flood") == before + 1, timeout=20), (
            gateway_log.read_text()[-3000:])
        waited = time.monotonic() - started
        # not cut off before the timeout (2 s; the write that blocked began moments before the
        # client saw its status line)
        assert waited >= 1.5, waited
        assert "a client took no bytes of its response for 2.0 s; its connection is closed" in gateway_log.read_text()
        # its place is given back while the client still holds its end, unread
        assert wait_until(lambda: "trident_gateway_in_flight_requests 0.0" in requests.get(url + "/metrics", timeout=5).text)
    response = requests.post(url + "/generate", json={"prompt": "Hi there"}, headers=AUTH, timeout=10)
    assert response.status_code == 200


def http_request(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


def in_flight(url: str, verify: str | bool = True) -> int:
    text = requests.get(url + "/metrics", timeout=5, verify=verify).text
    return int(float(text.split("\ntrident_gateway_in_flight_requests ", 1)[1].split()[0]))


def test_a_pipelining_client_that_leaves_cancels_its_generation(stack):
    """A client that sends the start of its next request while its first (not streamed) is being
    generated, and then leaves: the watch saw bytes, not the end of the connection, and stopped
    watching, so the generation ran on for nobody. It now looks at the connection's TCP state
    again every second until the response ends."""
    url, cancel_log, gateway_log, _ = stack
    before = cancel_log.read_text().count("slow")
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(http_request({"prompt": "slow"}))
        assert wait_until(lambda: in_flight(url) == 1, timeout=5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the next request, early
        time.sleep(1.5)
        assert cancel_log.read_text().count("slow") == before  # still here: its generation runs on
    left = time.monotonic()
    assert wait_until(lambda: cancel_log.read_text().count("slow") == before + 1, timeout=10), (
        gateway_log.read_text()[-3000:])
    assert time.monotonic() - left < 3
    assert wait_until(lambda: in_flight(url) == 0, timeout=5)


@pytest.mark.parametrize("goodbye", ["fin", "close_notify, fin 1.5 s later", "reset"])
def test_a_tls_client_that_leaves_cancels_its_generation(tls_stack, goodbye):
    """Over HTTPS a client that leaves while its (not streamed) generation runs cancels it, as
    over plain HTTP: the watch asks the kernel for the connection's TCP state, which TLS does not
    hide. Before, TLS connections were not watched, and a non-streaming generation whose client
    had left ran to its end. A client may send its ``close_notify`` alert ahead of its FIN: the
    watch looks again every second until the FIN."""
    (url, cancel_log, gateway_log, _), cert = tls_stack
    before = cancel_log.read_text().count("slow")
    context = ssl.create_default_context(cafile=str(cert))
    raw = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        tls.sendall(http_request({"prompt": "slow"}))
        assert wait_until(lambda: in_flight(url, str(cert)) == 1, timeout=5)
        if goodbye == "reset":
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            tls.close()
        else:
            if goodbye.startswith("close_notify"):
                tls.settimeout(0.5)
                with contextlib.suppress(OSError):  # sent; the gateway's own close_notify never comes
                    tls.unwrap()
                time.sleep(1.5)
            # A FIN (a close with bytes unread, such as the server's TLS session tickets, would
            # send a reset instead)
            tls.shutdown(socket.SHUT_WR)
        left = time.monotonic()
        assert wait_until(lambda: cancel_log.read_text().count("slow") == before + 1, timeout=10), (
            gateway_log.read_text()[-3000:])
        assert time.monotonic() - left < 3
    finally:
        tls.close()
    assert wait_until(lambda: in_flight(url, str(cert)) == 0, timeout=5)


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def _connect(url: str) -> socket.socket:
    host, port = url.rsplit("/", 1)[-1].split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _answer(sock: socket.socket) -> bytes:
    """The status line of the answer, or b"" when the connection was closed without one."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


def test_a_first_request_that_comes_late_is_answered(stack):
    """gunicorn's gevent worker gave every request, a new connection's first included, its
    keepalive (2 s) to arrive, then closed the connection without a word: a stream of
    tests/e2e/test_scale.py got "Remote end closed connection without response". The first
    request gets GATEWAY_HEADER_TIMEOUT (30 s); an idle kept-alive connection still ends after
    keepalive."""
    url = stack[0]
    with _connect(url) as late, _connect(url) as trickled:
        trickled.sendall(HEALTHZ[:10])
        time.sleep(3)
        late.sendall(HEALTHZ)
        assert _answer(late) == b"HTTP/1.1 200 OK"
        trickled.sendall(HEALTHZ[10:])
        assert _answer(trickled) == b"HTTP/1.1 200 OK"
        late.recv(65536)  # the rest of the answer
        time.sleep(3)  # idle, after a request: gunicorn's keepalive (2 s) ends it
        assert late.recv(65536) == b""


def test_sigterm_closes_idle_connections_at_once(tmp_path):
    """A connection waiting for its first request (browsers and HTTP clients open them ahead)
    or its next one is closed when the worker drains, so it does not hold the worker's exit until
    gunicorn's graceful timeout."""
    with serving(tmp_path) as (url, _, gateway_log, pid):
        fresh, kept = _connect(url), _connect(url)
        kept.sendall(HEALTHZ)
        assert _answer(kept) == b"HTTP/1.1 200 OK"
        kept.recv(65536)
        os.kill(pid, 15)
        for sock in (fresh, kept):  # closed without an answer, long before GATEWAY_HEADER_TIMEOUT (30 s)
            sock.settimeout(10)
            assert sock.recv(4096) == b""
        assert wait_until(lambda: "Shutting down: Master" in gateway_log.read_text(), timeout=10)
        log = gateway_log.read_text()
        # at least the fresh one was waiting then; the other may still have been finishing its answer
        assert "idle connection(s)" in log and "graceful timeout" not in log, log
        fresh.close()
        kept.close()


def test_a_fresh_connection_sending_its_request_as_the_drain_starts_is_answered(tmp_path):
    """A client that has just connected is sending its first request: when SIGTERM comes first,
    that request is still answered (a 503 for a generation, the drain's retry) within the drain's
    1 s for a first request, not met with a closed connection. A kept-alive connection waiting
    for its next request is still closed at once."""
    with serving(tmp_path) as (url, _, gateway_log, pid):
        kept = _connect(url)
        kept.sendall(HEALTHZ)
        assert _answer(kept) == b"HTTP/1.1 200 OK"
        kept.recv(65536)
        fresh = _connect(url)
        time.sleep(0.5)  # accepted: its handler waits for the request line
        os.kill(pid, 15)
        time.sleep(0.3)
        fresh.sendall(http_request({"prompt": "Hi there"}))
        assert _answer(fresh).startswith(b"HTTP/1.1 503 "), gateway_log.read_text()[-2000:]
        kept.settimeout(10)
        assert kept.recv(4096) == b""
        fresh.close()
        kept.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_client_that_sends_nothing_is_closed_after_the_header_timeout(tmp_path, scheme):
    """Over HTTPS gevent waited for the TLS handshake as long as the client liked: a client that
    connected and sent nothing kept its connection, and a place in the worker's pool, forever."""
    env = {"GATEWAY_HEADER_TIMEOUT": "2"}
    if scheme == "https":
        if shutil.which("openssl") is None:
            pytest.skip("the openssl command is not installed (Debian: apt-get install -y openssl)")
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=localhost", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        env.update(GATEWAY_CERTFILE=str(cert), GATEWAY_KEYFILE=str(key))
    with serving(tmp_path, extra_env=env, scheme=scheme) as (url, _, _, _):
        with _connect(url) as silent:
            silent.settimeout(15)  # a socket.timeout here: the gateway kept it open
            assert silent.recv(4096) == b""  # closed by the gateway, without an answer


def test_a_keepalive_of_0_stops_the_gateway_at_start_up():
    """gunicorn reads requests without any time bound when keepalive is 0 (no header timeout
    either): GATEWAY_KEEPALIVE below 1 is refused."""
    gunicorn = Path(sys.executable).with_name("gunicorn")
    result = subprocess.run([str(gunicorn), "-c", "python:gateway.gunicorn_conf", "--check-config", "gateway:create_app()"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "GATEWAY_KEEPALIVE": "0", "TRIDENT_API_KEY": KEY})
    assert result.returncode != 0
    assert "GATEWAY_KEEPALIVE must be at least 1 (seconds), got 0" in result.stdout + result.stderr


def raw_http(url: str, request: bytes) -> bytes:
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize(("stray", "status"), [(b"\xff\xfe", 401), (b"\xc3\xa9", 401), (b"\x01", 400),
                                               (b"\x00", 400), (b"\x7f", 400)])
def test_a_key_with_stray_bytes_gets_the_json_envelope_and_is_never_echoed(stack, stray, status):
    """An Authorization header with stray bytes (a key pasted with a character too many): bytes
    HTTP allows in a field value reach the app (401: unknown key); others gunicorn refuses before
    the app runs (400). Either way the answer is the JSON envelope, and neither it nor the log
    quotes the header: it carries a key."""
    url, _, gateway_log, _ = stack
    secret = b"sk-" + stray + KEY.encode()
    raw = raw_http(url, b"POST /generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
                   + secret + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()) and b"Content-Type: application/json" in head, raw[:300]
    assert b"X-Request-ID: " in head
    error = json.loads(body)["error"]
    assert error["code"] == status and error["type"] in ("invalid_request_error", "authentication_error")
    assert KEY.encode() not in raw
    time.sleep(0.2)
    assert KEY.encode() not in gateway_log.read_bytes()


def test_a_burst_of_new_connections_does_not_hold_back_a_running_stream(stack):
    """Events of running streams are not queued behind the admission of a whole burst of new
    connections: the worker accepts at most 4 connections per turn of its event loop
    (gateway.worker.FewAcceptsPerTurnServer), and the relay loop runs once a turn
    (gateway.triton_relay._HubSelector), so each step of a call waits behind at most that many
    admissions. With gevent's default (up to 100 accepts a turn) the stream's first token came
    after 99 of the burst's 120 replies (every connection accepted in that turn had been parsed,
    authenticated and validated first); with 10 a turn and the relay loop in a greenlet, after
    29-49 (the call's start, its admission and its first token each wait a turn); with 4, after
    7-15.

    Once the worker's gRPC channel is connected, the worker is stopped while one stream and then
    120 requests that fail validation (400s, answered during admission) connect, so that all of
    them wait in the listening backlog (under Linux's default limit of 128 before 5.4), in that
    order; then it continues. Order of arrival at the client, not time, is checked."""
    import signal

    url, _, gateway_log, master = stack
    host, port = url.rsplit("/", 1)[-1].split(":")
    workers = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert len(workers) == 1, workers
    worker = int(workers[0])

    def request(body: dict) -> bytes:
        data = json.dumps(body).encode()
        return (f"POST /generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data

    # The worker's gRPC channel is connected before the burst (its first call connects it).
    assert requests.post(url + "/generate", json={"prompt": "Hi there"}, headers=AUTH, timeout=10).status_code == 200
    quick = 120
    socks: list[socket.socket] = []
    os.kill(worker, signal.SIGSTOP)
    try:
        stat = Path(f"/proc/{worker}/stat")
        assert wait_until(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "T", timeout=5)
        for body in [{"prompt": "Hi there", "stream": True}] + [{"prompt": "x", "max_new_tokens": -1}] * quick:
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(request(body))
            socks.append(sock)
    finally:
        os.kill(worker, signal.SIGCONT)
    try:
        data, arrival, unfinished = _read_all(socks, stream=socks[0])
    finally:
        for sock in socks:
            sock.close()
    stream = socks[0]
    assert not unfinished, f"{unfinished} replies unfinished\n" + gateway_log.read_text()[-3000:]
    assert data[stream].startswith(b"HTTP/1.1 200 ") and b"event: done" in data[stream], data[stream][:500]
    assert all(data[s].startswith(b"HTTP/1.1 400 ") for s in socks[1:]), [data[s][:100] for s in socks[1:4]]
    before = arrival[stream]  # quick replies that arrived before the stream's first token
    assert before < quick // 3, f"the stream's first token came after {before} of {quick} admissions"


def _read_all(socks: list[socket.socket], stream: socket.socket) -> tuple[dict, dict, int]:
    """Every socket read to its end (30 s at most), in one thread: the bytes of each, the order in
    which each reply first showed what is checked (any byte; the stream: its first token), and
    how many did not end."""
    import selectors

    data = {sock: b"" for sock in socks}
    arrival: dict[socket.socket, int] = {}
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        open_ = len(socks)
        while open_ and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                sock = key.fileobj
                chunk = sock.recv(65536)
                data[sock] += chunk
                if sock not in arrival and (b"event: token" in data[sock] if sock is stream else data[sock]):
                    arrival[sock] = len(arrival)
                if not chunk:
                    sel.unregister(sock)
                    open_ -= 1
    return data, arrival, open_


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).ok
    except requests.ConnectionError:
        return False


def test_replaced_workers_leave_their_totals_but_no_metrics_files(tmp_path):
    """gunicorn replaces a worker that dies (here killed with SIGKILL, four times over). Each
    one's counters and histograms are folded into the archives by the master
    (gateway.metrics_files): /metrics keeps every request counted, and the folder holds the live
    worker's files and the archives only (before, two files stayed per dead worker and every
    scrape read them all)."""
    import signal

    from prometheus_client.parser import text_string_to_metric_families

    folder = tmp_path / "metrics"
    with serving(tmp_path, extra_env={"PROMETHEUS_MULTIPROC_DIR": str(folder)}) as (url, _, gateway_log, master):
        children = Path(f"/proc/{master}/task/{master}/children")
        dead: list[int] = []
        for _ in range(4):
            for _ in range(3):
                reply = requests.post(url + "/generate", json={"prompt": "Hi there"}, headers=AUTH, timeout=10)
                assert reply.status_code == 200, reply.text
            (worker,) = map(int, children.read_text().split())
            os.kill(worker, signal.SIGKILL)
            dead.append(worker)
            assert wait_until(lambda: children.read_text().split() not in ([], [str(worker)]), timeout=30), \
                gateway_log.read_text()[-2000:]
            # each worker listens on its own socket (reuse_port): the new one answers once booted
            assert wait_until(lambda: _answers(url + "/healthz"), timeout=30), gateway_log.read_text()[-2000:]
        text = requests.get(url + "/metrics", timeout=5).text
        (live,) = map(int, children.read_text().split())
        names = {p.name for p in folder.glob("*.db")}
    counted = {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == "trident_gateway_requests_total"}
    assert counted[(("endpoint", "/generate"), ("status", "200"))] == 12
    assert not {n for n in names for pid in dead if n.endswith(f"_{pid}.db")}, sorted(names)
    assert names <= {"counter_archive.db", "histogram_archive.db", f"counter_{live}.db", f"histogram_{live}.db",
                     f"gauge_livesum_{live}.db"}, sorted(names)


def test_more_than_one_worker_without_listener_migration_is_warned_of(tmp_path):
    from gateway.worker import migration_warning

    switch = tmp_path / "tcp_migrate_req"
    switch.write_text("0\n")
    assert "tcp_migrate_req is 0" in migration_warning(2, switch)
    assert migration_warning(1, switch) is None  # one worker is replaced only as the server stops
    switch.write_text("1\n")
    assert migration_warning(4, switch) is None
    assert migration_warning(4, tmp_path / "absent") is None  # a kernel without it: nothing to say


def test_gunicorn_warns_when_it_starts(tmp_path):
    """The warning reaches the operator: gunicorn's log, once, when it starts with 2 workers and
    the switch at 0 (here, when it can be set to 0 for the test)."""
    with listener_migration("0"), serving(tmp_path, workers=2) as (url, _, gateway_log, _):
        assert wait_until(lambda: _answers(url + "/healthz"), timeout=30)
        assert gateway_log.read_text().count("net.ipv4.tcp_migrate_req is 0") == 1


def test_an_old_worker_of_two_stops_listening_only_once_a_new_ones_socket_listens():
    """A reload of two workers: both old ones are told to stop as the new ones start. Two sockets
    listening on the port may be the two old ones: one stopping must not close its socket until a
    third (a new worker's) listens, or both old ones close before either new one listens and the
    port refuses connections meanwhile (the wait was for any second socket)."""
    import gevent

    from gateway.worker import FewAcceptsPerTurnServer

    import gevent.socket

    def listener(port: int = 0) -> socket.socket:
        sock = gevent.socket.socket()  # as gunicorn's gevent worker's listeners (non-blocking)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(16)
        return sock

    old = listener()
    port = old.getsockname()[1]
    sibling = listener(port)  # the other old worker's
    server = FewAcceptsPerTurnServer(old, handle=lambda client, address: client.close())
    server.start()
    try:
        stopping = gevent.spawn(server.stop_listening, 2)
        gevent.sleep(0.3)
        assert not server.closed and not stopping.dead  # two listen: both may be old ones
        new = listener(port)  # a new worker's
        stopping.join(0.5)
        assert stopping.dead and server.closed
        new.close()
    finally:
        server.close()
        sibling.close()


@contextlib.contextmanager
def listener_migration(value: str):
    """``net.ipv4.tcp_migrate_req`` set to ``value`` for a test (skipped where it cannot be);
    put back after."""
    from gateway.worker import MIGRATE_REQ

    try:
        before = MIGRATE_REQ.read_text().strip()
        MIGRATE_REQ.write_text(value)
    except OSError as exc:
        pytest.skip(f"net.ipv4.tcp_migrate_req cannot be set here: {exc}")
    try:
        yield
    finally:
        MIGRATE_REQ.write_text(before)


@pytest.fixture
def migrating_listeners():
    """As the documented deployment has it (docs/operations.md)."""
    with listener_migration("1"):
        yield


def test_reloads_under_load_lose_no_connection(tmp_path, migrating_listeners):
    """Three reloads (SIGHUP: new workers start, the old ones drain) while 8 clients send short
    requests on fresh connections: every request is answered, 200 or the drain's 503 (a retry).
    Each worker has its own listening socket (reuse_port). Before, an old worker kept accepting
    for up to a second after SIGTERM (about 17 503s a reload), and connections accepted just
    before its socket closed were reset (1 or 2 in 3 reloads): gunicorn's handler reads the
    listener's address first, EBADF on a closed socket (gateway.worker.NamedListener); the old
    worker now stops listening as soon as a new one listens (FewAcceptsPerTurnServer.stop_listening).
    What still arrives as an old socket closes the kernel moves to a new one (tcp_migrate_req);
    without that, a reset in 2 of about 17 runs of this test."""
    import collections
    import signal

    with serving(tmp_path, workers=2) as (url, _, gateway_log, master):
        assert wait_until(lambda: _answers(url + "/healthz"), timeout=30)
        outcomes: collections.Counter = collections.Counter()
        stop = time.monotonic() + 10

        def client() -> None:
            while time.monotonic() < stop:
                try:
                    reply = requests.post(url + "/generate", json={"prompt": "Hi there"},
                                          headers={**AUTH, "Connection": "close"}, timeout=10)
                    outcomes[reply.status_code if reply.status_code == 200 else reply.text[:120]] += 1
                except requests.RequestException as exc:
                    outcomes[type(exc).__name__ + ": " + str(exc)[-80:]] += 1

        clients = [threading.Thread(target=client) for _ in range(8)]
        for thread in clients:
            thread.start()
        for _ in range(3):
            time.sleep(2.5)
            os.kill(master, signal.SIGHUP)
        for thread in clients:
            thread.join()
    drained = '{"error":{"message":"The gateway is shutting down; retry the request","type":"service_unavailable"'
    assert outcomes[200] > 100, outcomes
    assert all(k == 200 or k.startswith(drained) for k in outcomes), outcomes
    assert "Socket error processing request" not in gateway_log.read_text()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    from testkit import running_redis

    with running_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


def _background_env(work: Path, redis_url: str) -> dict:
    """A chat template that renders a message's text alone (so that input "slow" is the fake
    Triton's "slow" prompt) and a Redis store, which outlives the gateway."""
    from openai_fixtures import tokenizer_dir

    template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    return {"TRIDENT_TOKENIZER_DIR": str(tokenizer_dir(work / "tokenizer", template)),
            "TRIDENT_RESPONSES_STORE": redis_url}


def _stored_status(redis_url: str, response_id: str, *, settle: bool = False) -> dict:
    """The stored response, as the other gateways sharing the store read it."""
    from gateway import background
    from gateway.response_store import RedisStore

    store = RedisStore(redis_url, 60, 2)
    record = store.get("default", response_id)
    if settle:
        record = background.settled(store, "default", response_id, record)
    return record["response"]


def test_sigterm_lets_a_background_response_run_until_the_drains_end_then_fails_it(tmp_path, redis_url):
    """The generation outlives its request: SIGTERM's drain gives it GATEWAY_DRAIN_TIMEOUT (4 s
    here), as it gives an open stream, then cancels it and stores it failed; the worker waits for
    that before it exits."""
    env = {**_background_env(tmp_path, redis_url), "GATEWAY_DRAIN_TIMEOUT": "4"}
    with serving(tmp_path, extra_env=env) as (url, cancel_log, gateway_log, pid):
        created = requests.post(url + "/v1/responses", json={"input": "slow", "background": True}, headers=AUTH,
                                timeout=10)
        assert created.status_code == 200 and created.json()["status"] == "queued", created.text
        response_id = created.json()["id"]
        assert wait_until(lambda: requests.get(f"{url}/v1/responses/{response_id}", headers=AUTH,
                                               timeout=5).json()["status"] == "in_progress", timeout=5)
        assert in_flight(url) == 1  # its request ended; its place is held
        os.kill(pid, 15)
        time.sleep(1.0)
        assert _stored_status(redis_url, response_id)["status"] == "in_progress"  # it runs on through the drain
        assert wait_until(lambda: "Shutting down: Master" in gateway_log.read_text(), timeout=20)
        failed = _stored_status(redis_url, response_id)
        assert failed["status"] == "failed" and failed["error"]["code"] == "service_unavailable", failed
        assert "slow " in cancel_log.read_text()  # its generation was cancelled in Triton
        log = gateway_log.read_text()
        assert "1 background response(s) still running" in log and "graceful timeout" not in log, log[-3000:]


def test_a_background_response_of_a_killed_gateway_is_failed_once_its_lease_lapses(tmp_path, redis_url):
    """SIGKILL: nothing stores the end; the run's lease lapses (LEASE_SECONDS), a read notes it,
    and ORPHAN_GRACE later the response reads failed, instead of in progress until the record
    expires."""
    from gateway import background

    with serving(tmp_path, extra_env=_background_env(tmp_path, redis_url)) as (url, cancel_log, _, pid):
        created = requests.post(url + "/v1/responses", json={"input": "slow", "background": True}, headers=AUTH,
                                timeout=10)
        response_id = created.json()["id"]
        assert wait_until(lambda: _stored_status(redis_url, response_id)["status"] == "in_progress", timeout=5)
        for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
            os.kill(int(child), 9)  # the worker, then its arbiter
        os.kill(pid, 9)
        killed = time.monotonic()
        assert _stored_status(redis_url, response_id, settle=True)["status"] == "in_progress"
        assert wait_until(lambda: _stored_status(redis_url, response_id, settle=True)["status"] == "failed",
                          timeout=background.LEASE_SECONDS + background.ORPHAN_GRACE + 3)
        assert time.monotonic() - killed >= background.ORPHAN_GRACE  # not at once, nor at the lapse
        assert _stored_status(redis_url, response_id)["error"] == background.ORPHANED
        assert wait_until(lambda: "slow grpc-cancel" in cancel_log.read_text(), timeout=5)  # Triton saw it go
