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


def check_sse(spec: dict, path: str, body: bytes, *, complete: bool = True) -> None:
    """The stream's shape (named events for /generate, /v1/messages and /v1/responses, the last
    one ending it;
    data lines then [DONE], once, last, for the other /v1 streams) and each JSON payload against
    the document (schemathesis checks each event too, with contentSchema; this does not depend
    on that). ``complete`` false: the reader stopped early (schemathesis reads at most 20 events
    of a stream and says so, ``stream_cut_short``), so the events that end a stream may be
    missing, and nothing else."""
    blocks = [b for b in body.decode("utf-8").split("\n\n") if b and not b.startswith(":")]
    assert blocks, "empty stream"
    for i, block in enumerate(blocks):
        lines = block.split("\n")
        last_block = i == len(blocks) - 1
        if path in ("/generate", "/v1/messages", "/v1/responses"):
            assert len(lines) == 2 and lines[0].startswith("event: "), block
            event, data = lines[0][len("event: "):], lines[1][len("data: "):]
            ends = {"/generate": ("done", "error"), "/v1/messages": ("message_stop", "error"),
                    "/v1/responses": ("response.completed", "response.incomplete", "response.failed",
                                       "error")}[path]
            assert event not in ends or last_block, f"{block} before the end"
            assert event in ends or not last_block or not complete, f"the stream does not end with one of {ends}"
            if path == "/v1/messages":
                assert (event == "message_start") == (i == 0), block
            if path == "/v1/responses":  # response.created first; each event numbered in order
                assert (event == "response.created") == (i == 0), block
                assert json.loads(data)["sequence_number"] == i, block
        else:
            assert len(lines) == 1 and lines[0].startswith("data: "), block
            event, data = "message", lines[0][len("data: "):]
            if data == "[DONE]":
                assert last_block, "[DONE] before the end"
                continue
            assert not last_block or not complete, "the stream does not end with [DONE]"
        _validator(spec, _payload_schema(spec, path, event)).validate(json.loads(data))
