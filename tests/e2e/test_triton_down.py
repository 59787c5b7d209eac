"""Triton going away: an error event mid-stream, then fast 503s with Retry-After.

Uses its own Triton and gateway (the shared ones stay up for the other tests)."""
import time

import pytest
import requests

from conftest import repo_dir, start_gateway
from e2e_helpers import AUTH
from testkit import free_port
from trident.child_process import kill_group
from trident.triton_launcher import TritonPorts, TritonServer


@pytest.fixture
def own_stack(tmp_path_factory):
    triton = TritonServer(model_repository=repo_dir(), work_dir=tmp_path_factory.mktemp("triton-down"),
                          ports=TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port()))
    triton.start(timeout=300)
    gateway = start_gateway(triton, tmp_path_factory, extra_env={"TRIDENT_HEARTBEAT_INTERVAL": "0.5"})
    yield triton, gateway
    gateway.stop()
    triton.stop()


def test_triton_stopped_mid_stream_then_503(own_stack):
    triton, gateway = own_stack
    assert requests.get(gateway.url + "/health", timeout=30).json() == {"status": "ready"}
    r = requests.post(gateway.url + "/generate", headers=AUTH, stream=True, timeout=120,
                      json={"prompt": "Write a long story.", "max_new_tokens": 1500, "temperature": 0,
                            "stream": True})
    assert r.status_code == 200
    lines = r.iter_lines()
    for line in lines:
        if line.startswith(b"event: token"):
            break
    kill_group(triton.process.pid)  # Triton and its model processes die mid-stream, no goodbye
    rest = b"\n".join(lines)
    assert b"event: error" in rest, rest[-500:]
    error_data = rest.split(b"event: error", 1)[1]
    assert b'"error"' in error_data and b"event: done" not in error_data

    started = time.monotonic()
    r = requests.post(gateway.url + "/generate", headers=AUTH, timeout=30,
                      json={"prompt": "hi", "max_new_tokens": 4})
    assert time.monotonic() - started < 10
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "service_unavailable"
    assert int(r.headers["Retry-After"]) > 0
    for probe in ("/readyz", "/health"):  # /health: vLLM's and SGLang's name
        ready = requests.get(gateway.url + probe, timeout=30)
        assert ready.status_code == 503 and "Retry-After" in ready.headers
    assert requests.get(gateway.url + "/healthz", timeout=30).status_code == 200


def test_stop_leaves_no_process_of_the_group(tmp_path_factory):
    """Stopping Triton also ends its Python-backend stubs, even after Triton died first, and
    removes the shared-memory regions of its stubs, which a killed Triton leaves in /dev/shm."""
    import os
    import signal

    from trident import shm_regions

    triton = TritonServer(model_repository=repo_dir(), work_dir=tmp_path_factory.mktemp("triton-kill"),
                          ports=TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port()))
    triton.start(timeout=300)
    pgid = triton.process.pid
    regions = [shm_regions.SHM_DIR / name for name in shm_regions.named_by_processes(group=pgid)]
    assert len(regions) >= 4 and all(region.exists() for region in regions), regions  # one per stub
    triton.process.send_signal(signal.SIGKILL)  # only Triton itself: its stubs are orphaned
    triton.process.wait()
    triton.stop()
    assert not [region for region in regions if region.exists()]
    deadline = time.monotonic() + 15  # killed processes linger until their new parent reaps them
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return  # no process is left in the group
        time.sleep(0.2)
    pytest.fail(f"processes of Triton's group are still running: {os.popen(f'pgrep -ag {pgid}').read()}")


def test_the_engine_model_unloads_at_once_after_streams_through_llm(tmp_path_factory):
    """llm streams from the engine model over Triton's own gRPC endpoint (trident.engine_grpc).
    A call cancelled after its final response left the engine's request counted as in flight
    in Triton 2.51, so at shutdown the engine model never unloaded and Triton gave up after its
    exit timeout. After a few seconds of short streams, Triton's log must show both models
    unloaded and no expired timeout."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from stress_llm_stub import churn

    triton = TritonServer(model_repository=repo_dir(), work_dir=tmp_path_factory.mktemp("triton-unload"),
                          ports=TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port()))
    triton.start(timeout=300)
    try:
        texts, failures = churn(triton.grpc_url, seconds=3, clients=8)
        assert not failures, failures[:5]
        assert sum(texts.values()) >= 8, texts
    finally:
        triton.stop()
    log = triton.log_path.read_text(errors="replace")
    assert "Exit timeout expired" not in log
    for model in ("llm", "tensorrt_llm"):
        assert f"successfully unloaded '{model}'" in log, model
