"""Errors across the boundary between the gateway and Triton's models: part of trident.contract
(import them from there). A model tags its error message with a kind (and the request field at
fault); the gateway maps the kind to an HTTP status."""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

# -- errors across the boundary ----------------------------------------------------------------------

INVALID_REQUEST = "invalid_request_error"  # the gateway's 400, naming the param when tagged with one
UNAVAILABLE = "service_unavailable"  # the gateway's 503 with Retry-After
SERVER_ERROR = "server_error"  # the gateway's 500 (also any untagged message)
ERROR_KINDS = (INVALID_REQUEST, UNAVAILABLE, SERVER_ERROR)


def tag_error(kind: str, message: str, param: Optional[str] = None) -> str:
    """``[kind] message`` or ``[kind:param] message``: how an error crosses Triton."""
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}")
    return f"[{kind}:{param}] {message}" if param else f"[{kind}] {message}"


# Triton or the Python backend may put a prefix ending in ": " before the tag.
_TAGGED = re.compile(
    r"(?:^|:\s)\s*\[(?P<kind>" + "|".join(ERROR_KINDS) + r")"
    r"(?::(?P<param>[A-Za-z0-9_.-]+(?:\[\d+\])*))?\]\s*(?P<message>.*)\Z",
    re.S,
)


@dataclasses.dataclass(frozen=True)
class TaggedMessage:
    kind: str
    param: Optional[str]
    message: str


def parse_error(text: str) -> Optional[TaggedMessage]:
    """The tag of an error message, or None when it has none."""
    match = _TAGGED.search(text.strip())
    if match is None:
        return None
    message = match["message"].strip() or match["kind"].replace("_", " ")
    return TaggedMessage(match["kind"], match["param"], message)


class TaggedError(Exception):
    """An error that crosses the boundary with its tag (:func:`tag_error`)."""

    kind = SERVER_ERROR

    def __init__(self, message: str, *, param: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def tagged(self) -> str:
        return tag_error(self.kind, self.message, self.param)


class InvalidRequest(TaggedError):
    kind = INVALID_REQUEST
