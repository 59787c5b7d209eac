"""Server-sent events checked against an OpenAPI document (the gateway's /openapi.json): shared
by the in-process fuzz (tests/unit/test_gateway_openapi.py) and the live one (tests/e2e)."""
from __future__ import annotations

import json

import jsonschema_rs


def _validator(spec: dict, schema: dict) -> jsonschema_rs.Validator:
    return jsonschema_rs.Draft202012Validator({**spec, **schema})


def _payload_schema(spec: dict, path: str, event: str) -> dict:
    """The documented schema of the JSON in the data line of ``event`` on ``path``."""
    stream = spec["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    for option in stream.get("oneOf", [stream]):
        if option["properties"]["event"]["const"] == event:
            data = option["properties"]["data"]
            return next(d for d in data.get("anyOf", [data]) if "contentSchema" in d)["contentSchema"]
    raise AssertionError(f"undocumented event {event!r} on {path}")


def check_sse(spec: dict, path: str, body: bytes) -> None:
    """The stream's shape (named events for /generate; data lines then [DONE], once, last, for
    /v1) and each JSON payload against the document (schemathesis checks each event too, with
    contentSchema; this does not depend on that)."""
    blocks = [b for b in body.decode("utf-8").split("\n\n") if b and not b.startswith(":")]
    assert blocks, "empty stream"
    for i, block in enumerate(blocks):
        lines = block.split("\n")
        if path == "/generate":
            assert len(lines) == 2 and lines[0].startswith("event: "), block
            event, data = lines[0][len("event: "):], lines[1][len("data: "):]
            assert (event in ("done", "error")) == (i == len(blocks) - 1), block
        else:
            assert len(lines) == 1 and lines[0].startswith("data: "), block
            event, data = "message", lines[0][len("data: "):]
            if data == "[DONE]":
                assert i == len(blocks) - 1, "[DONE] before the end"
                continue
            assert i < len(blocks) - 1, "the stream does not end with [DONE]"
        _validator(spec, _payload_schema(spec, path, event)).validate(json.loads(data))
