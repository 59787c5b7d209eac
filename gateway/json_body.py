"""The JSON body of a request: read once and in time (``BODY_TIMEOUT``), bounded before parsing
(nesting), strict about what JSON is (no NaN), and refused when a string is not valid Unicode (a
lone surrogate).

The time limit: a client that sends its headers and then stalls in its body (or vanishes without
closing, behind a NAT that dropped it) would otherwise hold its connection and greenlet for ever;
gunicorn bounds the wait for headers (its keep-alive time) but not for a body. Past the limit the
answer is a 408, and the connection closes."""

from __future__ import annotations

import json
from typing import Any

from flask import Request, current_app

from trident.contract import MAX_JSON_DEPTH

from .disconnect import gevent_active
from .errors import ClientError
from .schemas import describe


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 (413 comes from werkzeug's body limit)."""
    if not request.is_json:
        got = request.headers.get("Content-Type")
        raise ClientError(f"Content-Type must be application/json, got {got!r}" if got else
                          "Content-Type must be application/json")
    raw = _read_body(request, current_app.config["BODY_TIMEOUT"])
    # A body nests at most as deep as it has opening brackets (strings included), so most bodies
    # skip the byte-by-byte count: 0.25 ms for 10 KB (a 2,000-token prompt), 3 ms for 100 KB.
    depth = json_depth(raw) if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH else 0
    if depth > MAX_JSON_DEPTH:
        raise ClientError(f"Request body is nested {depth} levels deep; at most {MAX_JSON_DEPTH} are allowed")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ClientError(f"Request body is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ClientError(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ClientError(f"Request body must be a JSON object, got {describe(body).split(' ')[0]}")
    bad = unencodable_path(body)
    if bad is not None:
        raise ClientError(f"{bad} is not valid Unicode text: it holds a lone surrogate (such as \\ud800); "
                          "send UTF-8 text", param=bad.split("[")[0].split(".")[0] or None)
    return body


def _read_body(request: Request, timeout: float) -> bytes:
    """The whole body (a 413 past MAX_CONTENT_LENGTH, from werkzeug), or a 408 when it has not
    arrived within ``timeout`` seconds. The limit needs gevent's sockets (the gateway's workers);
    elsewhere (the test client) the body is in memory already."""
    timer = _gevent_timeout(timeout)
    if timer is None:
        return request.get_data(cache=False)
    timer.start()
    try:
        return request.get_data(cache=False)
    except BaseException as exc:
        if exc is not timer:
            raise
        # gunicorn then closes the connection: the rest of the body does not come within its
        # keep-alive time either.
        raise ClientError(f"The request body did not arrive within {timeout:g} s", status=408) from None
    finally:
        timer.close()


def _gevent_timeout(seconds: float) -> Any:
    if not gevent_active():
        return None
    from gevent import Timeout

    return Timeout(seconds)


def json_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text, counted without parsing it (brackets
    inside strings skipped), so a deep body never reaches the parser's recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:
                    return deepest
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def unencodable_path(value: Any, path: str = "") -> str | None:
    """The path (``messages[1].content``) of the first string, key included, that is not valid
    Unicode (a lone surrogate from a ``\\ud800`` escape), or None. Depth is bounded already."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "the request body"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{path}.{key}" if path else str(key)
            if unencodable_path(key, name) is not None:
                return name.encode("utf-8", "backslashreplace").decode("ascii")
            found = unencodable_path(item, name)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = unencodable_path(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None
