"""Does closing a listening socket of a reuse_port group reset connections on this machine?

The gateway's workers each listen on their own socket of one port (SO_REUSEPORT, gateway.gunicorn_conf);
a reload closes the old workers' sockets. Linux resets the connections still waiting in a closing
socket (or in their handshake) unless ``net.ipv4.tcp_migrate_req`` is 1, which moves them to
another socket of the port (docs/operations.md). This reproduces that on loopback: two listeners
of one port, clients connecting as fast as they can, one listener replaced every ``--interval``
seconds (it takes what waits in it, as the gateway's worker does, then closes). It prints the
connections reset per close under this network namespace's current setting; it changes no
setting.

    python scripts/listener_migration_check.py --seconds 20
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from pathlib import Path

SWITCH = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def _listener(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


def _answer(conn: socket.socket) -> None:
    try:
        conn.recv(16)
        conn.sendall(b"ok")
    except OSError:
        pass
    finally:
        conn.close()


def _accept_until(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.05)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except socket.timeout:
            continue
        except OSError:
            return
        conn.settimeout(5)
        _answer(conn)


def measure(seconds: float, interval: float, clients: int) -> dict[str, int]:
    """Connections answered, reset and failed otherwise, and listener closes, in ``seconds``."""
    steady = _listener()
    port = steady.getsockname()[1]
    forever = threading.Event()
    threading.Thread(target=_accept_until, args=(steady, forever), daemon=True).start()
    counts = {"answered": 0, "reset": 0, "failed": 0, "closes": 0}
    lock = threading.Lock()
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                    conn.sendall(b"x")
                    outcome = "answered" if conn.recv(16) == b"ok" else "failed"
            except ConnectionResetError:
                outcome = "reset"
            except OSError:
                outcome = "failed"
            with lock:
                counts[outcome] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        replaced = _listener(port)
        stop = threading.Event()
        worker = threading.Thread(target=_accept_until, args=(replaced, stop))
        worker.start()
        time.sleep(interval)
        stop.set()
        worker.join()
        replaced.setblocking(False)
        while True:  # what waits in it, then the close
            try:
                conn, _ = replaced.accept()
            except (BlockingIOError, OSError):
                break
            conn.setblocking(True)
            conn.settimeout(5)
            _answer(conn)
        replaced.close()
        counts["closes"] += 1
    done.set()
    for thread in threads:
        thread.join(10)
    forever.set()
    steady.close()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds each replaced listener lives")
    parser.add_argument("--clients", type=int, default=6)
    args = parser.parse_args()
    try:
        setting = SWITCH.read_text().strip()
    except OSError:
        setting = "absent"
    counts = measure(args.seconds, args.interval, args.clients)
    print(f"net.ipv4.tcp_migrate_req={setting}: {counts['closes']} listener closes, {counts['answered']} connections "
          f"answered, {counts['reset']} reset, {counts['failed']} failed otherwise")


if __name__ == "__main__":
    main()
