"""GET /openapi.json, and a schemathesis fuzz run of every operation it describes against the
in-process app with the fake backend: no 5xx, and every response (status, headers, content type,
JSON body, and each SSE payload) matches the document. Schema-invalid requests (schemathesis'
negative mode) must be rejected with a 4xx."""

from __future__ import annotations

import tempfile
from pathlib import Path

import jsonschema_rs
import openapi_sse
import pytest
import schemathesis
from gateway_fakes import FakeBackend
from hypothesis import HealthCheck, seed, settings
from openai_fixtures import AUTH, KEY, tokenizer_dir
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway import create_app

# positive_data_acceptance is left out on purpose: some schema-valid bodies are 400s by a
# cross-field rule (stream_options without stream, max_tokens != max_completion_tokens), which
# JSON Schema cannot say; the 400 itself is checked against the document like every response.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES_PER_OPERATION = 150
MIN_REQUESTS = 1000


TOKENIZER_HOME = tempfile.TemporaryDirectory(prefix="trident-openapi-")  # removed when the run ends


def _app():
    folder = tokenizer_dir(Path(TOKENIZER_HOME.name) / "tok")
    return create_app({"API_KEY": KEY, "TOKENIZER_DIR": str(folder)}, backend=FakeBackend())


APP = _app()
SPEC = APP.test_client().get("/openapi.json").get_json()
schema = schemathesis.openapi.from_wsgi("/openapi.json", APP)
SENT: list[str] = []


# -- the document -------------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1():
    from schemathesis.specs.openapi.definitions import OPENAPI_31

    assert SPEC["openapi"] == "3.1.0"
    jsonschema_rs.Draft202012Validator(OPENAPI_31).validate(SPEC)


def test_every_endpoint_is_described():
    documented = {(p, m) for p, ops in SPEC["paths"].items() for m in ops}
    assert documented == {
        ("/healthz", "get"), ("/readyz", "get"), ("/health", "get"), ("/metrics", "get"), ("/openapi.json", "get"),
        ("/generate", "post"), ("/v1/models", "get"), ("/v1/models/{model}", "get"),
        ("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/messages", "post"),
        ("/v1/messages/count_tokens", "post"), ("/v1/responses", "post"), ("/v1/responses/{response_id}", "get"),
        ("/v1/responses/{response_id}", "delete"), ("/v1/responses/{response_id}/input_items", "get"),
            ("/v1/responses/{response_id}/cancel", "post"),
        ("/tokenize", "post"), ("/detokenize", "post"),
    }
    # ... and that is every route of the app (but the /generate/ alias and Flask's static files)
    routes = {
        (rule.rule.replace("<path:model>", "{model}").replace("<response_id>", "{response_id}"), method.lower())
        for rule in APP.url_map.iter_rules()
        for method in rule.methods - {"HEAD", "OPTIONS"}
        if rule.endpoint != "static" and rule.rule != "/generate/"
    }
    assert routes == documented


def test_request_schemas_come_from_the_app_schemas():
    schemas = SPEC["components"]["schemas"]
    generate = schemas["GenerateRequest"]
    assert list(generate["properties"])[:3] == ["prompt", "model", "max_new_tokens"]
    assert generate["required"] == ["prompt"] and generate["additionalProperties"] is False
    assert generate["properties"]["max_new_tokens"] == {"type": ["integer", "null"], "minimum": 1, "maximum": 2048}
    assert generate["properties"]["top_p"] == {"type": ["number", "null"], "maximum": 1, "exclusiveMinimum": 0}
    chat = schemas["ChatCompletionRequest"]
    assert chat["properties"]["messages"] == {
        "type": "array", "items": {"$ref": "#/components/schemas/ChatMessage"}, "minItems": 1, "maxItems": 512,
    }
    stop = generate["properties"]["stop_sequences"]
    assert stop["maxItems"] == 16 and stop["items"]["maxLength"] == 256
    assert chat["properties"]["n"] == {"type": ["integer", "null"], "minimum": 1, "maximum": 16}
    assert generate["properties"]["logit_bias"]["additionalProperties"] == {"type": "number", "minimum": -100, "maximum": 100}
    assert {"type": "null"} in chat["properties"]["response_format"]["anyOf"]
    assert schemas["ChatMessage"]["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant", "tool"]
    ops = SPEC["paths"]
    assert ops["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    assert ops["/generate"]["post"]["security"] == [{"bearerAuth": []}]
    assert "security" not in ops["/healthz"]["get"]


def test_responses_errors_and_sse_payloads_are_described():
    post = SPEC["paths"]["/v1/chat/completions"]["post"]
    assert set(post["responses"]) == {"200", "400", "401", "403", "404", "408", "413", "429", "500", "501", "503"}
    assert post["responses"]["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert set(post["responses"]["429"]["headers"]) >= {"Retry-After", "x-should-retry", "X-Request-ID"}
    event = post["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert event["properties"]["event"] == {"const": "message"}
    assert event["properties"]["data"]["anyOf"] == [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json", "contentSchema": {
            "oneOf": [{"$ref": "#/components/schemas/ChatCompletionChunk"}, {"$ref": "#/components/schemas/Error"}]}},
    ]
    generate = SPEC["paths"]["/generate"]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert [e["properties"]["event"]["const"] for e in generate["oneOf"]] == ["token", "done", "error"]
    error = SPEC["components"]["schemas"]["ErrorObject"]
    assert error["required"] == ["code", "message", "param", "type"]


MINIMAL_BODIES = {  # a valid request of each operation that takes a JSON body
    "/generate": {"prompt": "hi", "max_new_tokens": 2},
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/messages": {"model": "smollm2-135m-instruct", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/messages/count_tokens": {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/responses": {"input": "hi", "max_output_tokens": 16},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [1, 2]},
}


def _allows_null(prop: dict) -> bool:
    if "$ref" in prop:
        prop = SPEC["components"]["schemas"][prop["$ref"].rsplit("/", 1)[1]]
    kind = prop.get("type")
    return (not prop or kind == "null" or (isinstance(kind, list) and "null" in kind)
            or None in prop.get("enum", [0]) or any(_allows_null(p) for p in prop.get("anyOf", [])))


def test_null_is_refused_wherever_the_document_does_not_allow_it():
    """Every request property, sent as null: a 4xx unless the document allows null (the fuzz
    run's negative mode finds such a field only by chance: stop_token_ids once accepted null
    while the document said array)."""
    client = APP.test_client()
    posts = [path for path, ops in SPEC["paths"].items() if "requestBody" in ops.get("post", {})]
    assert sorted(posts) == sorted(MINIMAL_BODIES)
    checked = set()
    for path, body in MINIMAL_BODIES.items():
        assert client.post(path, json=body, headers=AUTH).status_code == 200, path
        schema = SPEC["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        schema = SPEC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema
        for name, prop in schema["properties"].items():
            if not _allows_null(prop):
                status = client.post(path, json={**body, name: None}, headers=AUTH).status_code
                assert 400 <= status < 500, (path, name, status)
                checked.add((path, name))
    assert {("/generate", "prompt"), ("/v1/chat/completions", "messages"), ("/detokenize", "tokens")} <= checked, checked


# -- SSE payloads against the document (tests/openapi_sse.py) ------------------------------------


def check_sse(path: str, body: bytes, *, complete: bool = True) -> None:
    openapi_sse.check_sse(SPEC, path, body, complete=complete)


def test_check_sse_can_fail():
    with pytest.raises(jsonschema_rs.ValidationError):
        check_sse("/v1/completions", b'data: {"id": 1}\n\ndata: [DONE]\n\n')
    with pytest.raises(AssertionError):
        check_sse("/v1/completions", b'data: {"error": {"message": "m", "type": "server_error", '
                                     b'"param": null, "code": 500}}\n\n')
    with pytest.raises(AssertionError):
        check_sse("/generate", b'event: done\ndata: {}\n\nevent: token\ndata: {"text": "x"}\n\n')
    cut = b'data: {"error": {"message": "m", "type": "server_error", "param": null, "code": 500}}\n\n'
    check_sse("/v1/completions", cut, complete=False)  # a reader that stopped early: no [DONE] yet
    with pytest.raises(AssertionError):  # but [DONE] before the end is still wrong
        check_sse("/v1/completions", b"data: [DONE]\n\n" + cut, complete=False)


# -- the fuzz run -------------------------------------------------------------------------------


# A fixed seed, not derandomize: derandomize's seed (Hypothesis' digest of the test) differed
# with the checkout's path, so every clone (each CI run) sent other requests; 146 of the 789
# bodies of POST /v1/completions differed between two checkouts of one commit. With the seed,
# every run, here and in CI, sends the same requests.
@schema.parametrize()
@seed(20261206)
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
          database=None)
def test_fuzz(case):
    response = case.call(headers=AUTH)
    SENT.append(case.operation.label)
    case.validate_response(response, checks=CHECKS, headers=AUTH)
    if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        check_sse(case.path, response.content, complete=not response.stream_cut_short)


def test_fuzz_sent_enough_requests():
    """Runs after test_fuzz (file order); skipped when test_fuzz was deselected."""
    if not SENT:
        pytest.skip("test_fuzz did not run")
    assert len(SENT) >= MIN_REQUESTS, {op: SENT.count(op) for op in set(SENT)}

