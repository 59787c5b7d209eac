"""Error messages that cross the Triton boundary carry a tag the gateway maps to a status.

``[invalid_request_error] msg`` / ``[invalid_request_error:param] msg`` -> 400,
``[service_unavailable] msg`` -> 503; any other message is an internal error (500).
"""
from __future__ import annotations


class TaggedError(Exception):
    tag = "server_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def tagged(self) -> str:
        tag = f"{self.tag}:{self.param}" if self.param else self.tag
        return f"[{tag}] {self.message}"


class InvalidRequest(TaggedError):
    tag = "invalid_request_error"


class Unavailable(TaggedError):
    tag = "service_unavailable"
