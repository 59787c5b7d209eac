"""Retry advice for clients: ``x-should-retry`` on 429 and 5xx responses.

The official ``openai`` client retries 408, 409, 429 and 5xx (twice by default), waiting what
``Retry-After`` says when it is short, unless ``x-should-retry`` says otherwise. Its 1.x
releases honour a ``Retry-After`` of at most 60 s and otherwise retry after about a second,
which against a per-hour or per-day limit is a blind retry that only burns the budget; newer
ones give up past 120 s. So: a 429 or 503 whose ``Retry-After`` is at most
:data:`MAX_HONOURED_RETRY_AFTER` seconds says ``x-should-retry: true`` (waiting that long and
retrying works), a longer one ``false``; a 501 (a feature this deployment does not have) says
``false``; a 504 (the generation ran past the request timeout) says ``false`` too: the same
request would run as long again. Other statuses are left to the client's own rules.
"""

from __future__ import annotations

from flask import Response

MAX_HONOURED_RETRY_AFTER = 60  # seconds: every openai-python release waits this long


def add_retry_advice(response: Response) -> Response:
    """``after_request`` hook; registered so that it runs after flask-limiter's, which sets the
    429's ``Retry-After``."""
    status = response.status_code
    if status in (501, 504):
        response.headers["x-should-retry"] = "false"
    elif status in (429, 503):
        try:
            wait = int(response.headers.get("Retry-After", ""))
        except ValueError:
            return response
        response.headers["x-should-retry"] = "true" if wait <= MAX_HONOURED_RETRY_AFTER else "false"
    return response
