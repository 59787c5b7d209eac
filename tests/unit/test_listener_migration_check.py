"""scripts/listener_migration_check.py: closing a reuse_port listener while clients connect, under
the setting the deployment documents (net.ipv4.tcp_migrate_req=1: the kernel moves what waits in
the closing socket to another of the port), answers every connection."""
from __future__ import annotations

import importlib.util

from testkit import ROOT

from test_gateway_gunicorn import listener_migration


def _script():
    spec = importlib.util.spec_from_file_location("listener_migration_check", ROOT / "scripts/listener_migration_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_with_listener_migration_no_connection_is_reset_as_listeners_close():
    with listener_migration("1"):
        counts = _script().measure(seconds=2.0, interval=0.02, clients=4)
    assert counts["closes"] >= 20 and counts["answered"] > 100, counts
    assert counts["reset"] == 0 and counts["failed"] == 0, counts
