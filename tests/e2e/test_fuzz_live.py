"""schemathesis against the real stack: the real gunicorn gateway in front of the real Triton,
driven by the gateway's own /openapi.json, where the two sides' validation must agree.

No response may be a 5xx, every response (status, headers, content type, body, each SSE
payload) must match the document, schema-invalid requests must be refused with a 4xx, and the
servers must be healthy after. The Triton serves a repository whose model allows 4 new tokens,
so that every accepted generation is short. ``make test`` runs a bounded sample
(``TRIDENT_FUZZ_EXAMPLES``, 30 per operation and mode); ``make fuzz`` runs 600 (over 5,000
requests).
"""
import os
import time

import pytest
import requests
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from openapi_sse import check_sse

from conftest import build_small_repository, start_gateway, start_triton
from e2e_helpers import AUTH

EXAMPLES = int(os.environ.get("TRIDENT_FUZZ_EXAMPLES", "30"))
SENT: list[str] = []


def _checks():
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
            response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory):
    repo = build_small_repository(tmp_path_factory.mktemp("repo-fuzz") / "repository", max_batch_size=8,
                                  extra=["--max-seq-len", "256", "--max-new-tokens-limit", "4"])
    triton = start_triton(repo, tmp_path_factory, "triton-fuzz")
    gw = start_gateway(triton, tmp_path_factory, workers=2)
    yield gw
    gw.stop()
    triton.stop()


@pytest.fixture(scope="module")
def fuzz_spec(fuzz_gateway):
    return requests.get(fuzz_gateway.url + "/openapi.json", timeout=30).json()


def test_fuzz_the_real_stack(fuzz_gateway, fuzz_spec):
    """Every operation of the live document, positive and negative cases (``EXAMPLES`` each),
    against the live gateway. (schemathesis' pytest loader for a schema known only at run time
    does not work with pytest 9, so the strategies are driven here with hypothesis directly.)"""
    schema = schemathesis.openapi.from_dict(fuzz_spec)
    checks = _checks()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                      derandomize=True, database=None)
            def run(case):
                response = case.call(base_url=fuzz_gateway.url, headers=AUTH, timeout=60)
                SENT.append(case.operation.label)
                case.validate_response(response, checks=checks, headers=AUTH)
                if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
                    check_sse(fuzz_spec, case.path, response.content, complete=not response.stream_cut_short)

            try:
                run()
            except Unsatisfiable:  # no invalid request exists for it (a GET without parameters)
                assert mode is GenerationMode.NEGATIVE, operation.label


def test_the_stack_is_healthy_after_the_fuzz(fuzz_gateway):
    if not SENT:
        pytest.skip("the fuzz did not run")
    print(f"fuzzed {len(SENT)} requests")
    assert len(SENT) >= 6 * EXAMPLES  # every operation, both modes, mostly
    assert requests.get(fuzz_gateway.url + "/healthz", timeout=10).status_code == 200
    deadline = time.monotonic() + 30
    while requests.get(fuzz_gateway.url + "/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "not ready after the fuzz"
        time.sleep(0.5)
    r = requests.post(fuzz_gateway.url + "/generate", json={"prompt": "Hi", "max_new_tokens": 2}, headers=AUTH,
                      timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
