"""POST /generate request validation: exact status, type, param and message per API.md rule."""

from __future__ import annotations

import json

import pytest

from gateway import create_app
from testkit import AUTH, KEY, MODEL, assert_error

from trident.contract import ModelLimits, SamplingParams, TextRequest







def post(client, body, **kwargs):
    headers = {**AUTH, **kwargs.pop("headers", {})}
    if isinstance(body, (dict, list)):
        return client.post("/generate", json=body, headers=headers, **kwargs)
    return client.post("/generate", data=body, headers=headers, **kwargs)




BAD_FIELDS = [
    # (fields added to {"prompt": "Hi"} (None removes prompt), param, message)
    ({"prompt": None}, "prompt", "prompt is required"),
    ({"prompt": ""}, "prompt", "prompt must be a non-empty string"),
    ({"prompt": 5}, "prompt", "prompt must be a string, got integer 5"),
    ({"prompt": ["a"]}, "prompt", "prompt must be a string, got array"),
    ({"prompt": {"a": 1}}, "prompt", "prompt must be a string, got object"),
    ({"model": 5}, "model", "model must be a string, got integer 5"),
    ({"max_new_tokens": 0}, "max_new_tokens", "max_new_tokens must be between 1 and 2048, got 0"),
    ({"max_new_tokens": 2049}, "max_new_tokens", "max_new_tokens must be between 1 and 2048, got 2049"),
    ({"max_new_tokens": -5}, "max_new_tokens", "max_new_tokens must be between 1 and 2048, got -5"),
    ({"max_new_tokens": 1.5}, "max_new_tokens", "max_new_tokens must be an integer, got number 1.5"),
    ({"max_new_tokens": 2.0}, "max_new_tokens", "max_new_tokens must be an integer, got number 2.0"),
    ({"max_new_tokens": "3"}, "max_new_tokens", 'max_new_tokens must be an integer, got string "3"'),
    ({"max_new_tokens": True}, "max_new_tokens", "max_new_tokens must be an integer, got boolean true"),
    ({"max_length": 0}, "max_length", "max_length must be between 1 and 2048, got 0"),
    ({"max_length": "8"}, "max_length", 'max_length must be an integer, got string "8"'),
    (
        {"max_length": 10, "max_new_tokens": 20},
        "max_length",
        "max_length is an alias of max_new_tokens; both were given with different values (10 and 20): "
        "send only max_new_tokens",
    ),
    ({"temperature": -0.1}, "temperature", "temperature must be between 0 and 2, got -0.1"),
    ({"temperature": 2.01}, "temperature", "temperature must be between 0 and 2, got 2.01"),
    ({"temperature": "1"}, "temperature", 'temperature must be a number, got string "1"'),
    ({"temperature": False}, "temperature", "temperature must be a number, got boolean false"),
    ({"top_p": 0}, "top_p", "top_p must be greater than 0 and at most 1, got 0"),
    ({"top_p": 1.5}, "top_p", "top_p must be greater than 0 and at most 1, got 1.5"),
    ({"top_p": -1}, "top_p", "top_p must be greater than 0 and at most 1, got -1"),
    ({"top_k": -1}, "top_k", "top_k must be between 0 and 2147483647, got -1"),
    ({"top_k": 2**31}, "top_k", "top_k must be between 0 and 2147483647, got 2147483648"),
    ({"top_k": 1.5}, "top_k", "top_k must be an integer, got number 1.5"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty must be greater than 0, got 0"),
    ({"repetition_penalty": -1.5}, "repetition_penalty", "repetition_penalty must be greater than 0, got -1.5"),
    ({"repetition_penalty": [1]}, "repetition_penalty", "repetition_penalty must be a number, got array"),
    ({"repetition_penalty": 10**60}, "repetition_penalty",
     "repetition_penalty is too large for a 32-bit float, got integer 1000000000000000000000000000000000000..."),
    ({"repetition_penalty": 1e300}, "repetition_penalty", "repetition_penalty is too large for a 32-bit float, got number 1e+300"),
    ({"stop_sequences": "x"}, "stop_sequences", 'stop_sequences must be an array of strings, got string "x"'),
    ({"stop_sequences": ["s"] * 17}, "stop_sequences", "stop_sequences must have at most 16 items, got 17"),
    ({"stop_sequences": [""]}, "stop_sequences", "stop_sequences[0] must be a non-empty string"),
    ({"stop_sequences": ["a", 1]}, "stop_sequences", "stop_sequences[1] must be a string, got integer 1"),
    ({"stop_sequences": ["a", None]}, "stop_sequences", "stop_sequences[1] must be a string, got null"),
    ({"stream": "true"}, "stream", 'stream must be a boolean (true or false), got string "true"'),
    ({"stream": 1}, "stream", "stream must be a boolean (true or false), got integer 1"),
    ({"seed": -1}, "seed", "seed must be between 0 and 18446744073709551615, got -1"),
    ({"seed": 2**64}, "seed", "seed must be between 0 and 18446744073709551615, got 18446744073709551616"),
    ({"seed": 1.5}, "seed", "seed must be an integer, got number 1.5"),
    ({"seed": "42"}, "seed", 'seed must be an integer, got string "42"'),
    ({"foo": 1}, "foo", "Unrecognized request argument supplied: foo"),
    ({"foo": 1, "bar": 2}, "foo", "Unrecognized request arguments supplied: foo, bar"),
    # an unknown field is named even when other fields are wrong too
    ({"max_new_token": 5, "temperature": 9}, "max_new_token", "Unrecognized request argument supplied: max_new_token"),
    # several errors: the first in the order of the contract's fields
    ({"temperature": 9, "max_new_tokens": 0}, "max_new_tokens", "max_new_tokens must be between 1 and 2048, got 0"),
]


@pytest.mark.parametrize(("fields", "param", "message"), BAD_FIELDS, ids=[m for _, _, m in BAD_FIELDS])
def test_invalid_field_is_400(client, backend, fields, param, message):
    body = {"prompt": "Hi", **fields}
    body = {k: v for k, v in body.items() if not (k == "prompt" and v is None)}
    assert_error(post(client, body), 400, "invalid_request_error", param, message)
    assert backend.calls == []


def test_prompt_null_is_400(client):
    assert_error(post(client, {"prompt": None}), 400, "invalid_request_error", "prompt", "prompt must be a string, got null")


def test_long_string_is_shortened_in_message(client):
    response = post(client, {"prompt": "Hi", "temperature": "x" * 100})
    message = response.get_json()["error"]["message"]
    assert message == 'temperature must be a number, got string "' + "x" * 40 + '..."'


def test_unknown_model_is_404(client, backend):
    assert_error(
        post(client, {"prompt": "Hi", "model": "gpt-4"}),
        404,
        "not_found_error",
        "model",
        f"The model 'gpt-4' does not exist or is not served here (served: {MODEL})",
    )
    assert backend.calls == []


BAD_BODIES = [
    # (raw body, content type, message)
    (b"{", "application/json", "Request body is not valid JSON: Expecting property name enclosed in double quotes (line 1 column 2)"),
    (b"", "application/json", "Request body is not valid JSON: Expecting value (line 1 column 1)"),
    (b'{"prompt": "x", "temperature": NaN}', "application/json", "Request body is not valid JSON: NaN is not valid JSON"),
    (b'{"prompt": "x", "top_p": Infinity}', "application/json", "Request body is not valid JSON: Infinity is not valid JSON"),
    (b'["prompt"]', "application/json", "Request body must be a JSON object, got array"),
    (b'"prompt"', "application/json", "Request body must be a JSON object, got string"),
    (b"null", "application/json", "Request body must be a JSON object, got null"),
    (b"42", "application/json", "Request body must be a JSON object, got integer"),
    (b'{"prompt": "x"}', "text/plain", "Content-Type must be application/json, got 'text/plain'"),
    (b"prompt=x", "application/x-www-form-urlencoded", "Content-Type must be application/json, got 'application/x-www-form-urlencoded'"),
    (b'{"prompt": "x"}', None, "Content-Type must be application/json"),
]


@pytest.mark.parametrize(("raw", "content_type", "message"), BAD_BODIES, ids=[m for *_, m in BAD_BODIES])
def test_bad_body_is_400(client, raw, content_type, message):
    headers = dict(AUTH)
    if content_type:
        headers["Content-Type"] = content_type
    response = client.post("/generate", data=raw, headers=headers)
    assert_error(response, 400, "invalid_request_error", None, message)


def _nested(levels: int) -> bytes:
    return b'{"prompt": "x", "stop_sequences": ' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"


@pytest.mark.parametrize("levels", [33, 40, 5000])
def test_a_body_nested_past_the_limit_is_400_before_parsing(client, levels):
    response = client.post("/generate", data=_nested(levels), headers={**AUTH, "Content-Type": "application/json"})
    shown = min(levels, 33)  # the count stops at the first level past the limit
    assert_error(response, 400, "invalid_request_error", None,
                 f"Request body is nested {shown} levels deep; at most 32 are allowed")


def test_a_body_at_the_nesting_limit_reaches_validation(client):
    response = client.post("/generate", data=_nested(32), headers={**AUTH, "Content-Type": "application/json"})
    error = response.get_json()["error"]
    assert response.status_code == 400 and error["param"] == "stop_sequences", error


def test_brackets_inside_strings_do_not_count_as_nesting(client, backend):
    """More opening brackets than the limit, all inside strings (escaped quotes too): the body is
    counted byte by byte (not only its brackets) and is shallow."""
    prompt = '[{"a": [1]}] \\ \\" ' * 40 + "[" * 100
    assert post(client, {"prompt": prompt, "stop_sequences": ["[["]}).status_code == 200
    assert backend.last_params.prompt == prompt


def test_invalid_utf8_is_400(client):
    response = client.post("/generate", data=b'{"prompt": "\xff"}', headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None
    assert error["message"].startswith("Request body is not valid JSON: ")


def test_json_content_type_with_charset_is_accepted(client):
    response = client.post(
        "/generate", data=b'{"prompt": "x"}', headers={**AUTH, "Content-Type": "application/json; charset=utf-8"}
    )
    assert response.status_code == 200


def test_defaults_fill_the_parameters_object(client, backend):
    assert post(client, {"prompt": "Hi there"}).status_code == 200
    assert backend.last_params == TextRequest(prompt="Hi there", model=MODEL)
    assert backend.last_params.sampling == SamplingParams(max_new_tokens=128, temperature=1.0)


def test_null_means_default(client, backend):
    body = {k: None for k in ("model", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                              "stop_sequences", "stream", "seed", "max_length")}
    assert post(client, {"prompt": "Hi", **body}).status_code == 200
    assert backend.last_params == TextRequest(prompt="Hi", model=MODEL)


def flat(params: TextRequest) -> dict:
    """The request's values by their /generate names."""
    s = params.sampling
    return {"model": params.model, "stream": params.stream, "max_new_tokens": s.max_new_tokens,
            "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
            "repetition_penalty": s.repetition_penalty, "stop_sequences": s.stop, "seed": s.seed}


GOOD_FIELDS = [
    # (fields, expected attributes of the parameters object)
    ({"temperature": 0}, {"temperature": 0.0}),
    ({"temperature": 2}, {"temperature": 2.0}),
    ({"top_p": 1}, {"top_p": 1.0}),
    ({"top_p": 1e-9}, {"top_p": 1e-9}),
    ({"top_k": 0}, {"top_k": 0}),
    ({"top_k": 50}, {"top_k": 50}),
    ({"repetition_penalty": 0.01}, {"repetition_penalty": 0.01}),
    ({"max_new_tokens": 1}, {"max_new_tokens": 1}),
    ({"max_new_tokens": 2048}, {"max_new_tokens": 2048}),
    ({"max_length": 10}, {"max_new_tokens": 10}),
    ({"max_length": 10, "max_new_tokens": 10}, {"max_new_tokens": 10}),
    ({"stop_sequences": []}, {"stop_sequences": ()}),
    ({"stop_sequences": ["\n\n"] + ["s"] * 15}, {"stop_sequences": ("\n\n",) + ("s",) * 15}),
    ({"seed": 0}, {"seed": 0}),
    ({"seed": 2**64 - 1}, {"seed": 2**64 - 1}),
    ({"model": MODEL}, {"model": MODEL}),
    ({"stream": False}, {"stream": False}),
]


@pytest.mark.parametrize(("fields", "expected"), GOOD_FIELDS, ids=[json.dumps(f)[:60] for f, _ in GOOD_FIELDS])
def test_valid_fields_reach_the_backend(client, backend, fields, expected):
    response = post(client, {"prompt": "Hi", **fields})
    assert response.status_code == 200, response.get_data(as_text=True)
    params = flat(backend.last_params)
    for name, value in expected.items():
        assert params[name] == value
        assert type(params[name]) is type(value)


def test_trailing_slash_route(client):
    response = client.post("/generate/", json={"prompt": "Hi"}, headers=AUTH)
    assert response.status_code == 200
    assert response.get_json()["object"] == "text_completion"


def test_max_new_tokens_limit_comes_from_the_served_model(backend):
    """The limit is the served model's, as Triton reports it (one source: the repository build)."""
    backend.model_limits = ModelLimits(max_context=128, max_new_tokens=64)
    client = create_app({"API_KEY": KEY}, backend=backend).test_client()
    assert_error(
        post(client, {"prompt": "Hi", "max_new_tokens": 65}),
        400,
        "invalid_request_error",
        "max_new_tokens",
        "max_new_tokens must be between 1 and 64, got 65",
    )


def test_public_model_name_comes_from_config(backend):
    client = create_app({"API_KEY": KEY, "MODEL_NAME": "tiny"}, backend=backend).test_client()
    response = post(client, {"prompt": "Hi"})
    assert response.status_code == 200 and response.get_json()["model"] == "tiny"
    assert post(client, {"prompt": "Hi", "model": MODEL}).status_code == 404
