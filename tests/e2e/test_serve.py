"""``make serve`` as a user runs it (scripts/serve.py, the small-batch repository with two
instances of ``llm``): the service stays up after it says it is ready, and comes back by itself
when Triton is killed, when Triton runs but one of its ``llm`` stubs hangs (Triton's HTTP
health endpoints still say ready, half the requests fail; the stream probe,
trident.stream_probe, finds it), when the engine model's stub dies (Triton still says ready,
every generation fails; the probe's stop ping to the engine finds it), and when the
``preprocessing`` model's stub dies (every request of a client that tokenizes there fails; the
probe's tokenize ping finds it)."""
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from testkit import ROOT, free_port, model_dir

from e2e_helpers import API_KEY, wait_for

from trident import shm_regions

pytestmark = pytest.mark.e2e

BODY = {"prompt": "1, 2, 3, 4, 5, 6,", "max_new_tokens": 4, "temperature": 0}


def _generates(url: str) -> bool:
    try:
        r = requests.post(url + "/generate", json=BODY, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    except requests.ConnectionError:
        return False
    return r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def _triton_pid(work) -> int | None:
    """The running tritonserver of this serve.py (its command line names the work dir)."""
    out = subprocess.run(["pgrep", "-f", f"tritonserver.*{work}"], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None


def _stub_pid(work, model: str, instance: str) -> int | None:
    """The stub process of one instance of a Python-backend model (Triton names it in the stub's
    command line)."""
    out = subprocess.run(["pgrep", "-f", f"{work}.*triton_python_backend_stub .*/{model}/1/model.py .* {instance} "],
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None


def _maps_torch(pid: int) -> bool:
    """Whether a process has PyTorch's library loaded."""
    return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()


def _llm_stub_pid(work, instance: str = "llm_0_1") -> int | None:
    return _stub_pid(work, "llm", instance)


def _tokenizes(grpc_port: str) -> bool:
    """A client of Triton's gRPC that tokenizes with the ``preprocessing`` model gets token ids."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    query = grpcclient.InferInput("QUERY", [1, 1], "BYTES")
    query.set_data_from_numpy(np.array([[b"hello there"]], dtype=np.object_))
    length = grpcclient.InferInput("REQUEST_OUTPUT_LEN", [1, 1], "INT32")
    length.set_data_from_numpy(np.array([[4]], dtype=np.int32))
    try:
        return client.infer("preprocessing", [query, length], client_timeout=30).as_numpy("INPUT_ID").size > 0
    except InferenceServerException:
        return False
    finally:
        client.close()


def _kill_stub(work, model: str, instance: str, http_port: str, grpc_port: str, failure: str,
               meanwhile=lambda: True) -> int | None:
    """SIGKILL one stub of a running Triton: Triton still says ready over HTTP, ``meanwhile()``
    holds (checked at once: the supervisor restarts that Triton a few seconds later), and the
    stream probe command fails with ``failure``. Returns that Triton's pid."""
    pid = _triton_pid(work)
    stub = _stub_pid(work, model, instance)
    assert stub is not None
    os.kill(stub, signal.SIGKILL)
    assert _http_ready(http_port) and meanwhile()
    probe = subprocess.run([sys.executable, "-m", "trident.stream_probe", "--url", f"127.0.0.1:{grpc_port}",
                            "--timeout", "3"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert probe.returncode == 1 and failure in probe.stderr, probe
    return pid


def _http_ready(port: str) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def test_serve_stays_up_and_restarts_a_killed_or_hung_triton_or_a_dead_engine_or_preprocessing(two_llm_repo, tmp_path):
    # A region of the Python backend that a killed Triton left in /dev/shm (no process names it,
    # an hour old): starting Triton removes it (trident.shm_regions).
    left = Path("/dev/shm") / f"{shm_regions.PREFIX}{uuid.uuid4()}"
    left.write_bytes(b"\0" * 4096)
    os.utime(left, (time.time() - 3600,) * 2)
    port = free_port()
    env = {**os.environ, "TRIDENT_API_KEY": API_KEY, "GATEWAY_PORT": str(port), "TRITON_HTTP_PORT": str(free_port()),
           "TRITON_GRPC_PORT": str(free_port()), "TRITON_METRICS_PORT": str(free_port())}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts/serve.py"), "--model-repository", str(two_llm_repo),
                             "--tokenizer-dir", str(model_dir()), "--work-dir", str(tmp_path / "run"),
                             "--probe-interval", "1", "--probe-timeout", "3", "--probe-failures", "3",
                             "--restart-backoff", "0.25"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: "trident is ready" in (tmp_path / "serve.log").read_text(), timeout=300), \
            (tmp_path / "serve.log").read_text()
        assert not left.exists()
        banner = (tmp_path / "serve.log").read_text()
        assert API_KEY not in banner and "from TRIDENT_API_KEY (not shown)" in banner  # the operator's secret
        time.sleep(3)  # a Triton started from a thread that had ended got SIGTERM right after it was ready
        assert "exited" not in (tmp_path / "serve.log").read_text(), (tmp_path / "serve.log").read_text()
        assert _generates(url)
        # The stubs that only tokenize never load torch (trident.text.hf_tokenizer: about 250 MB
        # and 2 s of CPU each); an llm stub loads it with XGrammar at its first request with a
        # guide, which waits for it while other requests go on (trident.llm_service).
        work = tmp_path / "run"
        stubs = [_stub_pid(work, "llm", "llm_0_0"), _stub_pid(work, "llm", "llm_0_1"),
                 _stub_pid(work, "preprocessing", "preprocessing_0_0")]
        assert None not in stubs and not any(_maps_torch(stub) for stub in stubs)
        guided = [requests.post(url + "/generate", json={**BODY, "regex": " [0-9]{3}"},
                                headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) for _ in range(2)]
        assert [r.status_code for r in guided] == [200, 200], [r.text for r in guided]
        assert all(re.fullmatch(" [0-9]{3}", r.json()["choices"][0]["text"]) for r in guided), [r.text for r in guided]
        assert sum(_maps_torch(stub) for stub in stubs[:2]) >= 1 and not _maps_torch(stubs[2])
        pid = _triton_pid(tmp_path / "run")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: "Triton is back" in (tmp_path / "serve.log").read_text(), timeout=300), \
            (tmp_path / "serve.log").read_text()
        assert wait_for(lambda: _generates(url), timeout=60)
        assert _triton_pid(tmp_path / "run") not in (None, pid)

        # The probe on its own, as a Kubernetes exec liveness probe runs it.
        grpc_port, http_port = env["TRITON_GRPC_PORT"], env["TRITON_HTTP_PORT"]
        probe = subprocess.run([sys.executable, "-m", "trident.stream_probe", "--url", f"127.0.0.1:{grpc_port}"],
                               capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert probe.returncode == 0 and "from each of its instances (llm_0_0, llm_0_1)" in probe.stdout, probe
        assert "; its engine model tensorrt_llm answered a stop ping; preprocessing tokenized a word" in probe.stdout

        # One of the two llm stubs hangs: Triton runs and says ready over HTTP, and hands every
        # other request to the hung instance, which fails it after a second (by hand: 200 and 500
        # in turn). One ping a probe failed only every other probe, never 3 in a row, and that
        # Triton was never restarted; the probe pings until each instance has answered.
        pid = _triton_pid(tmp_path / "run")
        stub = _llm_stub_pid(tmp_path / "run")
        assert stub is not None and _llm_stub_pid(tmp_path / "run", "llm_0_0") not in (None, stub)
        os.kill(stub, signal.SIGSTOP)
        assert _http_ready(http_port)
        probe = subprocess.run([sys.executable, "-m", "trident.stream_probe", "--url", f"127.0.0.1:{grpc_port}",
                                "--timeout", "3"], capture_output=True, text=True, timeout=60, cwd=ROOT)
        # Its error, or (while the supervisor's own probe keeps it busy failing) no answer at all.
        assert probe.returncode == 1 and "not live" in probe.stderr, probe
        assert "Stub process 'llm_0_1' is not healthy" in probe.stderr or "1 of the 2 instances" in probe.stderr, probe
        assert wait_for(lambda: "Triton is back (restart 2)" in (tmp_path / "serve.log").read_text(), timeout=300), \
            (tmp_path / "serve.log").read_text()
        assert "failed 3 probes in a row" in (tmp_path / "serve.log").read_text()
        assert wait_for(lambda: _generates(url), timeout=60)
        assert _triton_pid(tmp_path / "run") not in (None, pid)
        assert _llm_stub_pid(tmp_path / "run") not in (None, stub)

        # The engine's stub dies (the CPU engine is a Python-backend model): Triton does not
        # restart it and stays ready, every generation fails after a second, and llm still
        # answers its pings. The probe's stop ping to the engine model finds it.
        pid = _kill_stub(tmp_path / "run", "tensorrt_llm", "tensorrt_llm_0_0", http_port, grpc_port,
                         "the engine model: tensorrt_llm answered the stop ping with an error: Stub process "
                         "'tensorrt_llm_0_0' is not healthy")
        assert wait_for(lambda: "Triton is back (restart 3)" in (tmp_path / "serve.log").read_text(), timeout=300), \
            (tmp_path / "serve.log").read_text()
        assert wait_for(lambda: _generates(url), timeout=60)
        assert _triton_pid(tmp_path / "run") not in (None, pid)

        # The preprocessing model's stub dies (TensorRT-LLM's tokenizing model, for clients of
        # Triton's gRPC; trident's own path does not use it): its every request fails while
        # Triton, the model, llm and the engine all answer (by hand, the probe then passed and
        # that Triton was never restarted). The probe's tokenize ping finds it.
        assert _tokenizes(grpc_port)
        pid = _kill_stub(tmp_path / "run", "preprocessing", "preprocessing_0_0", http_port, grpc_port,
                         "the preprocessing model: preprocessing answered the tokenize ping with an error: Stub "
                         "process 'preprocessing_0_0' is not healthy",
                         meanwhile=lambda: _generates(url) and not _tokenizes(grpc_port))
        assert wait_for(lambda: "Triton is back (restart 4)" in (tmp_path / "serve.log").read_text(), timeout=300), \
            (tmp_path / "serve.log").read_text()
        assert wait_for(lambda: _tokenizes(grpc_port), timeout=60) and wait_for(lambda: _generates(url), timeout=60)
        assert _triton_pid(tmp_path / "run") not in (None, pid)
    finally:
        left.unlink(missing_ok=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()
