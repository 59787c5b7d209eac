"""gateway.grpc_env: the gateway's gRPC client uses polling I/O unless the operator decided."""
from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.grpc_env import use_polling_client


@pytest.mark.parametrize(("given", "expected"), [
    (None, "-event_engine_client"),
    ("", "-event_engine_client"),
    ("work_serializer_dispatch", "work_serializer_dispatch,-event_engine_client"),
    ("event_engine_client", "event_engine_client"),  # the operator turned it on: kept
    ("-event_engine_client", "-event_engine_client"),
    ("a, -event_engine_client ,b", "a, -event_engine_client ,b"),
])
def test_the_experiment_is_added_unless_named(given, expected):
    environ = {} if given is None else {"GRPC_EXPERIMENTS": given}
    use_polling_client(environ)
    assert environ["GRPC_EXPERIMENTS"] == expected


@pytest.mark.parametrize("module", ["gateway.triton_backend", "gateway.triton_relay"])
def test_the_gateway_sets_it_before_grpc_is_imported(module):
    """gRPC reads GRPC_EXPERIMENTS once, when it starts: the value must be there when ``grpc`` is
    first imported, by whichever gateway module imports it first."""
    code = f"""
import os, sys
os.environ.pop("GRPC_EXPERIMENTS", None)
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "grpc":
            seen.append(os.environ.get("GRPC_EXPERIMENTS"))
        return None
sys.meta_path.insert(0, Watch())
import {module}
print(seen)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['-event_engine_client']"
