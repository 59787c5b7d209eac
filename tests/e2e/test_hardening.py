"""Issue 17's cases as raw HTTP against the real gateway (gunicorn + gevent) and Triton: each is
a 4xx in the JSON envelope naming the field, never a 500; the server stays healthy."""
import http.client
import json
from urllib.parse import urlparse

import pytest
import requests

from e2e_helpers import AUTH

pytestmark = pytest.mark.e2e


def raw_post(gateway, body: bytes, headers: dict) -> tuple[int, dict]:
    u = urlparse(gateway.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.putrequest("POST", "/generate")
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.parametrize(("body", "param"), [
    (b'{"prompt": "a \\ud800 b", "max_new_tokens": 2}', "prompt"),
    (b'{"prompt": "x", "stop_sequences": ["\\udfff"], "max_new_tokens": 2}', "stop_sequences"),
    (b'{"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"title": "\\ud800"}}}}',
     "response_format"),
])
def test_a_lone_surrogate_is_a_400_naming_its_field(gateway, body, param):
    status, payload = raw_post(gateway, body, AUTH)
    assert status == 400 and payload["error"]["param"] == param, payload


def test_a_body_nested_5000_levels_is_a_400(gateway):
    status, payload = raw_post(gateway, b"[" * 5000 + b"]" * 5000, AUTH)
    assert status == 400 and payload["error"]["type"] == "invalid_request_error", payload
    status, payload = raw_post(gateway, b'{"prompt": "x", "stop_sequences": ' + b"[" * 5000 + b"]" * 5000 + b"}", AUTH)
    assert status == 400, payload


def test_a_100000_character_stop_sequence_is_a_400_naming_the_limit(gateway):
    r = requests.post(gateway.url + "/generate", json={"prompt": "x", "stop_sequences": ["y" * 100_000]},
                      headers=AUTH, timeout=30)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "stop_sequences" and "256" in error["message"], error


def test_non_ascii_bytes_in_authorization_get_the_json_envelope_without_echo(gateway):
    u = urlparse(gateway.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    secret = b"Bearer s\xc3\xa9cret-\xff-key"
    conn.putrequest("POST", "/generate")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Authorization", secret)
    conn.putheader("Content-Length", "15")
    conn.endheaders(b'{"prompt": "x"}')
    response = conn.getresponse()
    text = response.read()
    conn.close()
    assert 400 <= response.status < 500 and response.getheader("Content-Type", "").startswith("application/json")
    assert "error" in json.loads(text) and b"cret" not in text


def test_the_server_is_healthy_after(gateway):
    r = requests.post(gateway.url + "/generate", json={"prompt": "1, 2, 3,", "max_new_tokens": 2, "temperature": 0},
                      headers=AUTH, timeout=60)
    assert r.status_code == 200
