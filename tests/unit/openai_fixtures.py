"""Shared set-up of the OpenAI-compatible gateway tests (in-process, fake backend)."""

from __future__ import annotations

import json
from pathlib import Path

from gateway_fakes import FakeBackend

from gateway import create_app

from testkit import AUTH, KEY, MODEL  # noqa: F401  (re-exported for the OpenAI tests)

# SmolLM2-135M-Instruct's own chat template (as its tokenizer_config.json holds it).
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def tokenizer_dir(root: Path, template: str | list | None = SMOL_TEMPLATE, **extra) -> Path:
    """A folder with a tokenizer_config.json holding ``template`` (no tokenizer needed)."""
    root.mkdir(parents=True, exist_ok=True)
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", **extra}
    if template is not None:
        config["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


def make_openai_app(tmp_path: Path, config=None, backend=None):
    backend = backend or FakeBackend()
    settings = {"API_KEY": KEY, "TOKENIZER_DIR": str(tokenizer_dir(tmp_path / "tok")), **(config or {})}
    return create_app(settings, backend=backend), backend


def sse_data(response) -> list:
    """The ``data:`` payloads of an SSE body, JSON-decoded except the literal ``[DONE]``;
    asserts that no line carries an event name and that comments are the only other lines."""
    out = []
    for block in response.get_data(as_text=True).split("\n\n"):
        if not block:
            continue
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if not lines:
            continue
        assert len(lines) == 1 and lines[0].startswith("data: "), block
        data = lines[0][len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out
