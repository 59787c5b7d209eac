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

The syntaxes (vLLM's names; :data:`SYNTAXES`): ``deepseek_r1``, ``qwen3`` and ``glm47`` (GLM-4.7
and GLM-5, whose templates open the thinking in the prompt) read ``<think>`` as above;
``seed_oss`` the same with ``<seed:think>`` ... ``</seed:think>`` (ByteDance's Seed-OSS).
``glm45`` (GLM-4.5 / 4.6) and ``mistral`` (Magistral: ``[THINK]`` ... ``[/THINK]``, special
tokens, so the gateway asks for the text with its special tokens) are models that open their
thinking themselves: a reply that does not begin with the opening tag is all content, one that
does is thinking up to the closing tag (all of it where the generation was cut while thinking).
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

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_SPACE = " \t\r\n"


@dataclass(frozen=True, slots=True)
class Syntax:
    """How a model writes its thinking: between ``open`` and ``close``; ``opened``: only where
    the reply begins with ``open`` (else the reply begins inside the thinking, its opening
    written by the template); ``special``: the tags are special tokens, kept in the text only
    when asked for."""

    open: str = THINK_OPEN
    close: str = THINK_CLOSE
    opened: bool = False
    special: bool = False


#: The parsers a deployment may name (REASONING_PARSER; gateway.config refuses another name):
#: vLLM's names of each syntax.
SYNTAXES = {
    "deepseek_r1": Syntax(), "qwen3": Syntax(), "glm47": Syntax(),
    "seed_oss": Syntax("<seed:think>", "</seed:think>"),
    "glm45": Syntax(opened=True),
    "mistral": Syntax("[THINK]", "[/THINK]", opened=True, special=True),
}
PARSERS = tuple(sorted(SYNTAXES))
#: Parsers whose tags are special tokens: the text must keep special tokens.
KEEP_SPECIAL_TOKENS = frozenset(name for name, syntax in SYNTAXES.items() if syntax.special)


@dataclass(frozen=True, slots=True)
class Reasoning:
    """How one chat request's replies are read: ``thinking`` false when the request turned it
    off (all content); ``include`` false leaves the reasoning out of the reply."""

    parser: str
    thinking: bool = True
    include: bool = True


class ReasoningReader:
    """One choice's text, split into reasoning and content as it comes."""

    def __init__(self, syntax: Syntax = Syntax()) -> None:
        self.syntax = syntax
        self._buf = ""
        self._state = "start"  # start (only whitespace, or the start of the opening tag, yet), thinking, content

    def feed(self, text: str) -> tuple[str, str]:
        """``(reasoning, content)`` that are final now."""
        self._buf += text
        opening, closing = self.syntax.open, self.syntax.close
        if self._state == "start":
            rest = self._buf.lstrip(_SPACE)
            if not rest or (len(rest) < len(opening) and opening.startswith(rest)):
                return "", ""
            if rest.startswith(opening):
                self._buf, self._state = rest[len(opening):], "thinking"
            else:  # no opening tag: all content where the model opens its thinking itself
                self._state = "content" if self.syntax.opened else "thinking"
        if self._state == "content":
            out, self._buf = self._buf, ""
            return "", out
        end = self._buf.find(closing)
        if end >= 0:
            thought, content = self._buf[:end], self._buf[end + len(closing):]
            self._buf, self._state = "", "content"
            return thought, content
        keep = len(self._buf) - partial_start(self._buf, closing)
        thought, self._buf = self._buf[:keep], self._buf[keep:]
        return thought, ""

    def finish(self) -> tuple[str, str]:
        """The end of the text: what was held back (still thinking: it is reasoning; nothing but
        the start of an opening tag, where the model opens its thinking itself: content)."""
        tail, self._buf = self._buf, ""
        if self._state == "start" and self.syntax.opened:
            self._state = "content"
        return ("", tail) if self._state == "content" else (tail, "")

    @property
    def thought_ended(self) -> bool:
        return self._state == "content"


def reader_for(parser: str) -> ReasoningReader:
    """A reader of one choice's text in the syntax ``parser`` names (one of PARSERS)."""
    return ReasoningReader(SYNTAXES[parser])


def split_reasoning(text: str, parser: str = "deepseek_r1") -> tuple[str | None, str | None]:
    """A whole reply's ``(reasoning, content)``; None for a part that is empty (content: also
    when the thinking never ended)."""
    reader = reader_for(parser)
    thought, content = reader.feed(text)
    tail_thought, tail_content = reader.finish()
    thought, content = thought + tail_thought, content + tail_content
    return thought or None, (content or None) if reader.thought_ended else None


__all__ = ["KEEP_SPECIAL_TOKENS", "PARSERS", "SYNTAXES", "Reasoning", "ReasoningReader", "Syntax", "reader_for",
           "split_reasoning"]
