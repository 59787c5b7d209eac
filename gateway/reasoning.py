"""Reasoning models' thinking, read out of their text: ``reasoning`` beside ``content``.

Models such as DeepSeek-R1 (and its distillations), Qwen3 and QwQ think before they answer, in
``<think> ... </think>``. With ``REASONING_PARSER`` (``TRIDENT_REASONING_PARSER``) set, a chat
reply's text up to ``</think>`` is its ``reasoning`` and the rest its ``content`` (vLLM's
``--reasoning-parser``; vLLM's ``deepseek_r1`` and ``qwen3`` read the same syntax, and both
names are taken). The reply carries it under ``reasoning`` and, for the clients that still read
DeepSeek's original name, ``reasoning_content`` (vLLM sends both).

* A ``<think>`` the model writes at the start is left out; newer templates put it in the prompt,
  so the text usually begins inside the thinking.
* No ``</think>`` by the end: the whole text is reasoning, ``content`` null (the generation was
  cut while thinking), unless the request turned thinking off (``chat_template_kwargs``
  ``enable_thinking: false``, which Qwen3's template answers with an empty thinking block in the
  prompt): then it is all content.
* ``include_reasoning: false`` (vLLM's) leaves the reasoning out of the reply.
* A constrained reply (``response_format``, ``structured_outputs``, a forced tool call) is
  constrained from its first token, so there is no thinking to read: it is all content. (vLLM
  lifts the constraint until the thinking ends; the engines here apply it from the start.)

:class:`ReasoningReader` reads a choice's text as it grows: thinking is handed out as soon as it
cannot be the start of ``</think>``, content once the thinking ended. The same reader gives a
whole reply, so a stream and a reply of the same text agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tool_parsers import partial_start

#: The parsers a deployment may name (REASONING_PARSER; gateway.config refuses another name):
#: vLLM's names of the <think> syntax.
PARSERS = ("deepseek_r1", "qwen3")

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_SPACE = " \t\r\n"


@dataclass(frozen=True, slots=True)
class Reasoning:
    """How one chat request's replies are read: ``thinking`` false when the request turned it
    off (all content); ``include`` false leaves the reasoning out of the reply."""

    parser: str
    thinking: bool = True
    include: bool = True


class ReasoningReader:
    """One choice's text, split into reasoning and content as it comes."""

    def __init__(self) -> None:
        self._buf = ""
        self._state = "start"  # start (only whitespace, or the start of <think>, yet), thinking, content

    def feed(self, text: str) -> tuple[str, str]:
        """``(reasoning, content)`` that are final now."""
        self._buf += text
        if self._state == "start":
            rest = self._buf.lstrip(_SPACE)
            if not rest or (len(rest) < len(THINK_OPEN) and THINK_OPEN.startswith(rest)):
                return "", ""
            self._buf = rest[len(THINK_OPEN):] if rest.startswith(THINK_OPEN) else self._buf
            self._state = "thinking"
        if self._state == "content":
            out, self._buf = self._buf, ""
            return "", out
        end = self._buf.find(THINK_CLOSE)
        if end >= 0:
            thought, content = self._buf[:end], self._buf[end + len(THINK_CLOSE):]
            self._buf, self._state = "", "content"
            return thought, content
        keep = len(self._buf) - partial_start(self._buf, THINK_CLOSE)
        thought, self._buf = self._buf[:keep], self._buf[keep:]
        return thought, ""

    def finish(self) -> tuple[str, str]:
        """The end of the text: what was held back (still thinking: it is reasoning)."""
        tail, self._buf = self._buf, ""
        return ("", tail) if self._state == "content" else (tail, "")

    @property
    def thought_ended(self) -> bool:
        return self._state == "content"


def split_reasoning(text: str) -> tuple[str | None, str | None]:
    """A whole reply's ``(reasoning, content)``; None for a part that is empty (content: also
    when the thinking never ended)."""
    reader = ReasoningReader()
    thought, content = reader.feed(text)
    tail_thought, tail_content = reader.finish()
    thought, content = thought + tail_thought, content + tail_content
    return thought or None, (content or None) if reader.thought_ended else None


__all__ = ["PARSERS", "Reasoning", "ReasoningReader", "split_reasoning"]
