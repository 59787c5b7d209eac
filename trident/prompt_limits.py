"""The prompt-length bound a repository build writes: no prompt longer than the model's context
times its tokenizer's longest token can fit, so the gateway and ``llm`` refuse longer ones before
tokenizing them (trident.contract.ModelLimits.max_prompt_chars)."""
from __future__ import annotations

from pathlib import Path


def longest_token_chars(tokenizer_dir: Path) -> int:
    """Characters of the longest token of a Hugging Face tokenizer (SmolLM2's: 81)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return max(len(tokenizer.decode([i])) for i in range(len(tokenizer)))


def max_prompt_chars(tokenizer_dir: Path, max_context: int) -> int:
    return max_context * longest_token_chars(tokenizer_dir)
