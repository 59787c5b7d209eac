"""End-to-end fixtures: the real Triton server and the real gateway (gunicorn + gevent).

Both start on free ports for the session, wait for readiness, and always stop. When a test
that uses them fails, the tail of each server's log is attached to the failure report.
"""
import os
import subprocess
from pathlib import Path

import pytest
import requests

import testkit
from testkit import ROOT, free_port, model_dir, start_redis, stop_redis  # noqa: F401 (tests import them from here)

from trident.triton_launcher import TritonPorts, TritonServer

from e2e_helpers import API_KEY, wait_for

pytestmark = pytest.mark.e2e


def repo_dir() -> Path:
    return Path(os.environ.get("TRIDENT_REPO_DIR", ROOT / ".cache/model_repository/cpu"))


@pytest.fixture(scope="session")
def triton(tmp_path_factory):
    repo = repo_dir()
    if not (repo / "llm" / "config.pbtxt").is_file():
        pytest.fail(f"no model repository in {repo}: run `make test`, which builds it")
    work = tmp_path_factory.mktemp("triton")
    server = TritonServer(model_repository=repo, work_dir=work,
                          ports=TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port()))
    testkit.started(server)
    server.start(timeout=300)
    yield server
    server.stop()


SMALL_BATCH = 4  # engine slots of the small-batch repository: tests run many more streams


def build_small_repository(out: Path, *, max_batch_size: int = SMALL_BATCH, extra=()) -> Path:
    """The CPU repository from the same templates and model, with a small engine batch (and
    ``extra`` options of build/build_repository.py)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, str(ROOT / "build/build_repository.py"), "--model-dir", str(model_dir()),
                    "--out", str(out), "--max-batch-size", str(max_batch_size), "--max-seq-len", "1024",
                    "--weight-dtype", "int4", *extra], check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="session")
def small_repo(tmp_path_factory):
    return build_small_repository(tmp_path_factory.mktemp("repo-small") / "repository")


@pytest.fixture(scope="session")
def two_llm_repo(tmp_path_factory):
    """The small-batch repository with two instances of llm (two stub processes), and NVIDIA's
    ``tensorrt_llm_bls`` name for it instead of ``ensemble`` (as many stubs as the default)."""
    return build_small_repository(tmp_path_factory.mktemp("repo-two-llm") / "repository",
                                  extra=("--llm-instances", "2", "--nvidia-names", "tensorrt_llm_bls"))


def start_triton(repo, tmp_path_factory, name="triton"):
    work = tmp_path_factory.mktemp(name)
    server = TritonServer(model_repository=repo, work_dir=work,
                          ports=TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port()))
    testkit.started(server)
    return server.start(timeout=300)


@pytest.fixture(scope="session")
def small_triton(small_repo, tmp_path_factory):
    """A Triton whose engine has SMALL_BATCH slots."""
    server = start_triton(small_repo, tmp_path_factory, "triton-small")
    yield server
    server.stop()


def start_gateway(triton, tmp_path_factory, *, workers=1, extra_env=None, drain_timeout=5):
    return testkit.start_gateway(triton.grpc_url, tmp_path_factory.mktemp("gateway"), api_key=API_KEY,
                                 workers=workers, extra_env=extra_env, drain_timeout=drain_timeout)


@pytest.fixture(scope="session")
def gateway(triton, tmp_path_factory):
    gw = start_gateway(triton, tmp_path_factory)
    yield gw
    gw.stop()


@pytest.fixture
def client(gateway):
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {API_KEY}"
    session.base_url = gateway.url
    yield session
    session.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    with testkit.running_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    testkit.attach_logs(outcome.get_result())
