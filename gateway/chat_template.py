"""The model's own chat template, read from its tokenizer files and rendered with jinja2.

``/v1/chat/completions`` turns ``messages`` into the prompt with the template that ships with the
served model's tokenizer (``chat_template.jinja``, else ``chat_template`` in
``tokenizer_config.json``), found in the folder named by config ``TOKENIZER_DIR``
(``TRIDENT_TOKENIZER_DIR``): the same folder the Triton "llm" model tokenizes with.

Why not ``transformers.AutoTokenizer.apply_chat_template``: importing transformers and loading
a tokenizer took about 10 s and 440 MB per gateway worker here (transformers is not a gateway
dependency at all), for what is a jinja2 render. This module renders the template the way
transformers does (a sandboxed environment with ``trim_blocks``/``lstrip_blocks``, the
``loopcontrols`` extension, ``raise_exception``, ``strftime_now``, a ``tojson`` that does not
escape HTML, the tokenizer's special tokens as variables); a unit test checks that both give the
same text (tests/unit/test_gateway_openai_chat_template.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ClientError

_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
#: Variables the gateway gives every render: a request's chat_template_kwargs may not set them.
RESERVED_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt", "raise_exception",
                                "strftime_now", "additional_special_tokens", *_SPECIAL_TOKENS})
MAX_TEMPLATE_KWARGS = 64  # entries of chat_template_kwargs


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class ChatTemplate:
    """A compiled chat template and the variables it is rendered with."""

    def __init__(self, source: str, special_tokens: Mapping[str, Any] | None = None) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self._template = env.from_string(source)
        self._variables = dict(special_tokens or {})

    def __deepcopy__(self, memo: dict[int, Any]) -> ChatTemplate:
        return self  # immutable once built; schemas holding it get deep-copied (apispec)

    @classmethod
    def from_tokenizer_dir(cls, path: str | Path) -> ChatTemplate:
        """Read the template and the special tokens of a Hugging Face tokenizer folder.

        Raises ``ValueError`` when the folder has no tokenizer_config.json or no chat template.
        """
        folder = Path(path)
        config_path = folder / "tokenizer_config.json"
        if not config_path.is_file():
            raise ValueError(f"TOKENIZER_DIR {folder} has no tokenizer_config.json")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        special = folder / "special_tokens_map.json"  # older tokenizers keep the tokens here
        if special.is_file():
            config = {**json.loads(special.read_text(encoding="utf-8")), **config}
        source = cls._find_source(folder, config)
        tokens: dict[str, Any] = {}
        for name in _SPECIAL_TOKENS:
            text = _token_text(config.get(name))
            if text is not None:
                tokens[name] = text
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens")
        if isinstance(extra, list):
            tokens["additional_special_tokens"] = [t for t in map(_token_text, extra) if t is not None]
        return cls(source, tokens)

    @staticmethod
    def _find_source(folder: Path, config: Mapping[str, Any]) -> str:
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        if not isinstance(template, str) or not template:
            raise ValueError(f"the tokenizer in {folder} has no chat template")
        return template

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               continue_final_message: bool = False, tools: Sequence[Mapping[str, Any]] | None = None,
               variables: Mapping[str, Any] | None = None) -> str:
        """The prompt for ``messages`` (dicts with ``role`` and ``content``), ending with the
        assistant's turn header (``add_generation_prompt``), or, with ``continue_final_message``,
        with the final message's text left open for the model to go on with (vLLM's and
        transformers' prefill); ``tools`` as transformers passes them (OpenAI's ``{"type":
        "function", "function": {...}}``, or None); ``variables``: more of the template's own
        (vLLM's ``chat_template_kwargs``, e.g. Qwen3's ``enable_thinking``; none of
        RESERVED_VARIABLES). A template that refuses the conversation (``raise_exception``, e.g.
        roles out of order) is a 400 on ``messages``."""
        # As transformers does: a key whose value is None is left out (templates test presence).
        conversation = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = {**(variables or {}), **self._variables, "messages": conversation,
                   "tools": tools or None,  # always defined, as transformers passes them
                   "documents": None, "add_generation_prompt": add_generation_prompt}
        try:
            text = self._template.render(context)
        except jinja2.exceptions.TemplateError as exc:
            raise ClientError(f"messages could not be rendered with the model's chat template: {exc}",
                              param="messages") from None
        return _open_final_message(text, conversation[-1].get("content")) if continue_final_message else text


def _open_final_message(text: str, content: Any) -> str:
    """The rendered conversation cut right after the final message's text, so that the model
    continues that message: what the template put after it (the end of the turn) is left out.
    The template may have trimmed the message's whitespace: its text is looked for without it,
    and its trailing whitespace kept only where the template kept it."""
    final = content if isinstance(content, str) else ""
    core = final.strip()
    if not core:
        raise ClientError("continue_final_message needs text in the final message to continue", param="messages")
    at = text.rfind(core)
    if at < 0:
        raise ClientError("continue_final_message: the model's chat template does not show the final message's text, "
                          "so it cannot be continued", param="messages")
    kept = final.lstrip()
    end = at + len(kept) if text.startswith(kept, at) else at + len(core)
    return text[:end]
