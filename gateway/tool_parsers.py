"""``tool_choice: "auto"``: the calls a model chose to make, read out of its own text.

With ``auto`` the model decides between answering and calling, in the syntax it was trained on;
the gateway reads that syntax (vLLM's ``--tool-call-parser``, llama.cpp's ``--jinja`` do the
same). The deployment names it with ``TOOL_CALL_PARSER`` (``TRIDENT_TOOL_CALL_PARSER``); without
one, ``auto`` with tools stays a 400 (gateway.tools), as vLLM answers without a parser.

``hermes``: each call is a JSON object ``{"name": ..., "arguments": {...}}`` between
``<tool_call>`` and ``</tool_call>``, as Hermes 2 Pro / 3, Qwen2.5 / Qwen3 and SmolLM3 write them
(their chat templates render ``tools`` and teach it). Text outside the blocks is the message's
``content``; whitespace next to a block is not part of it, and beside calls, content that is
only whitespace is null. A block whose JSON is not such an object, or names a function that is not in ``tools``,
stays text, as does a block the generation did not close.

:class:`AutoCalls` reads a choice's text as it grows (streams): it hands out content as soon as it
cannot be the start of a block, and each call once its block is closed. The same reader gives a
whole reply, so a stream and a reply of the same text agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from typing import Any

#: The parsers a deployment may name (TOOL_CALL_PARSER).
PARSERS = ("hermes",)

HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
_SPACE = " \t\r\n"


def check_parser(name: str | None) -> None:
    """A deployment's TOOL_CALL_PARSER: None/"" or one of PARSERS (else it does not start)."""
    if name and name not in PARSERS:
        raise ValueError(f"TOOL_CALL_PARSER must be one of {', '.join(PARSERS)} (or empty: no tool_choice "
                         f'"auto"), got {name!r}')


class AutoCalls:
    """One choice's text, split into content and calls as it comes (the ``hermes`` syntax).

    ``feed(text)`` returns ``(content, calls)``: the content that is final now, and the calls
    completed, each ``{"index", "id", "type", "function": {"name", "arguments"}}`` numbered from
    0 (``new_id`` names them); ``finish()`` the content held back to the end."""

    def __init__(self, names: Collection[str], new_id: Callable[[], str], *, most: int | None = None) -> None:
        self._names = frozenset(names)
        self._most = most  # calls beyond this many are left out (parallel_tool_calls: false keeps one)
        self._new_id = new_id
        self._buf = ""  # text not handed out yet
        self._inside = False  # _buf is the inside of an open block
        self._searched = 0  # inside a block: where the search for its end goes on
        self._after_block = False  # skip the whitespace that follows a block
        self._space = ""  # the whitespace before the open block: content, unless the block is a call
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._buf += text
        content: list[str] = []
        calls: list[dict[str, Any]] = []
        while self._buf:
            if self._inside:
                end = self._buf.find(HERMES_CLOSE, self._searched)
                if end < 0:
                    self._searched = max(0, len(self._buf) - len(HERMES_CLOSE) + 1)
                    break
                body, self._buf = self._buf[:end], self._buf[end + len(HERMES_CLOSE):]
                self._inside, self._searched = False, 0
                call = self._call(body)
                if call is None:  # not a call of a declared function: it stays text
                    content.append(self._space + HERMES_OPEN + body + HERMES_CLOSE)
                    self._after_block = False
                else:
                    if self._most is None or call["index"] < self._most:
                        calls.append(call)
                    self._after_block = True
                continue
            if self._after_block:
                self._buf = self._buf.lstrip(_SPACE)
                if not self._buf:
                    break
                self._after_block = False
            start = self._buf.find(HERMES_OPEN)
            if start >= 0:
                before = self._buf[:start]
                content.append(before.rstrip(_SPACE))
                self._space = before[len(before.rstrip(_SPACE)):]
                self._buf, self._inside = self._buf[start + len(HERMES_OPEN):], True
                continue
            # Hold back what may still become a block's start, and the whitespace before it.
            keep = len(self._buf) - _partial_open(self._buf)
            keep = len(self._buf[:keep].rstrip(_SPACE))
            content.append(self._buf[:keep])
            self._buf = self._buf[keep:]
            break
        return "".join(content), calls

    def finish(self) -> str:
        """The end of the text: what is held back is content (an unclosed block too)."""
        tail = (self._space + HERMES_OPEN if self._inside else "") + self._buf
        if self._after_block:
            tail = tail.lstrip(_SPACE)
        self._buf, self._inside = "", False
        return tail

    def _call(self, body: str) -> dict[str, Any] | None:
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self._names:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        call = {"index": self.calls, "id": self._new_id(), "type": "function",
                "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}
        self.calls += 1
        return call


def _partial_open(text: str) -> int:
    """How many of ``text``'s last characters are the start of HERMES_OPEN (0: none)."""
    for size in range(min(len(text), len(HERMES_OPEN) - 1), 0, -1):
        if HERMES_OPEN.startswith(text[-size:]):
            return size
    return 0


def split_calls(text: str, names: Collection[str], new_id: Callable[[], str], *,
                most: int | None = None) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole reply's content and calls (without ``index``); with calls, content that is only
    whitespace is None."""
    reader = AutoCalls(names, new_id, most=most)
    content, calls = reader.feed(text)
    content += reader.finish()
    if calls and not content.strip(_SPACE):
        return None, [{k: v for k, v in c.items() if k != "index"} for c in calls]
    return content, [{k: v for k, v in c.items() if k != "index"} for c in calls]


__all__ = ["PARSERS", "AutoCalls", "check_parser", "split_calls"]
