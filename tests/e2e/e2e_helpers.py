"""Helpers for end-to-end tests (imported by name: pytest puts this folder on sys.path)."""
import json
import os

from testkit import free_port  # noqa: F401  (re-exported for the e2e tests)

API_KEY = "test-key-" + os.urandom(6).hex()
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def open_generate(url: str, data: bytes, *, content_length: int | None = None, timeout: float = 30):
    """POST /generate with the test key on a plain socket: the head (Content-Length
    ``content_length``, by default ``len(data)``) and ``data``. Returns the socket, the response
    unread: for clients that hang up, stall or read it their own way."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(url)
    length = len(data) if content_length is None else content_length
    sock = socket.create_connection((where.hostname, where.port), timeout=timeout)
    sock.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Authorization: Bearer {API_KEY}\r\nContent-Length: {length}\r\n\r\n".encode() + data)
    return sock


def post(client, path="/generate", **body):
    return client.post(client.base_url + path, json=body, timeout=120)


def sse_events(response):
    """Parse an SSE response into (event, data) pairs; comments (heartbeats) are skipped."""
    events, event, data = [], None, []
    for raw in response.iter_lines(decode_unicode=False):
        line = raw.decode("utf-8")
        if not line:
            if event or data:
                events.append((event or "message", json.loads("\n".join(data))))
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    return events


ENGINE_METRICS = {
    "generated": "trident_engine_generated_tokens_total",
    "cancelled": "trident_engine_requests_cancelled_total",
    "prefilled": "trident_engine_requests_prefilled_total",
    "steps": "trident_engine_decode_steps_total",
    "active": "trident_engine_active_requests",
    "waiting": "trident_engine_waiting_requests",
}


def engine_metrics(triton) -> dict:
    """The CPU engine's counters, read from Triton's Prometheus metrics endpoint."""
    import requests

    text = requests.get(f"http://localhost:{triton.ports.metrics}/metrics", timeout=10).text
    values = {}
    for key, metric in ENGINE_METRICS.items():
        total = 0.0
        for line in text.splitlines():
            if line.startswith(metric + "{") or line.startswith(metric + " "):
                total += float(line.rsplit(" ", 1)[1])
        values[key] = total
    return values


def scrape(url: str, **kwargs) -> dict[tuple, float]:
    """/metrics as {(sample name, sorted label pairs): value}; needs no key."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    r = requests.get(url + "/metrics", timeout=30, **kwargs)
    assert r.status_code == 200, r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def log_lines(gateway) -> list[dict]:
    """The gateway's JSON log lines."""
    lines = []
    for raw in gateway.log_path.read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            try:
                lines.append(json.loads(raw))
            except ValueError:
                pass
    return lines


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.1):
    import time

    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a gunicorn master's workers), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue  # gone meanwhile
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the field after the state
                found.append(int(entry))
    return found


def worker_holding(gateway, client_port: int) -> int | None:
    """The gateway worker (pid) that holds the accepted end of the connection from
    ``client_port`` to the gateway, from /proc: each worker accepts on its own socket."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
                if local == gateway.port and remote == client_port:
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in child_pids(gateway.process.pid):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                return pid
        except OSError:
            continue
    return None
