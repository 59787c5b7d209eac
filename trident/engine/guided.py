"""Guided decoding in the engine: XGrammar's compiler (loaded on first use) and the per-step mask.

A guide is compiled once per request, in the thread that submits it (Engine.submit: a new JSON
schema takes milliseconds, a known one ~0.1 ms from XGrammar's cache), never in the engine's
loop. Each sequence gets its own ``GrammarMatcher``; every step it fills the row's bitmask of
allowed tokens, the sampler sets every other logit to -inf, and the chosen token is accepted.
"""
from __future__ import annotations

import threading

import torch

from trident.contract import Guide, InvalidRequest

from .request import InvalidRequestError

GUIDE_TYPE_PARAM = "guided_decoding_guide_type"


class GuideCompiler:
    """The engine's compiler: trident.grammar's, built from the tokenizer description file
    (TensorRT-LLM's xgrammar_tokenizer_info.json) with the model's vocabulary size."""

    def __init__(self, tokenizer_info_path: str, *, vocab_size: int, cache_bytes: int = -1) -> None:
        self.path = tokenizer_info_path
        self.vocab_size = vocab_size
        self.cache_limit = cache_bytes  # trident.grammar.GuideCompiler's cache_bytes
        self._compiler = None
        self._lock = threading.Lock()

    def _get(self):
        with self._lock:
            if self._compiler is None:
                from trident.grammar import GuideCompiler as Compiler, load_tokenizer_info

                self._compiler = Compiler(load_tokenizer_info(self.path, vocab_size=self.vocab_size),
                                          cache_bytes=self.cache_limit)
            return self._compiler

    def cache_bytes(self) -> int:
        """Bytes of compiled guides kept for reuse (0 before the first guide)."""
        with self._lock:
            compiler = self._compiler
        return compiler.cache_bytes() if compiler is not None else 0

    def compile(self, guide: Guide):
        """The CompiledGrammar; raises InvalidRequestError naming the field."""
        if not self.path:
            raise InvalidRequestError("guided decoding is not configured on this engine (its model has no "
                                      "xgrammar_tokenizer_info_path)", param=GUIDE_TYPE_PARAM)
        try:
            return self._get().compile(guide)
        except InvalidRequest as exc:
            raise InvalidRequestError(exc.message, param=exc.param) from None

    @staticmethod
    def matchers(compiled, n: int, end_id: int | None) -> list:
        """One matcher per sequence. The request's end id is the grammar's only stop token (it
        ends a guided sequence where the grammar allows, as it does any other); without one,
        the tokenizer's end token is (and is not output either)."""
        from trident.grammar import LOCK

        import xgrammar

        stop = None if end_id is None else [end_id]
        with LOCK:
            return [xgrammar.GrammarMatcher(compiled, override_stop_tokens=stop) for _ in range(n)]


def apply_masks(logits: torch.Tensor, matchers: list, rows: list[int]) -> None:
    """Set to -inf, in rows ``rows`` of logits (B, V), every token its matcher does not allow."""
    import xgrammar

    from trident.grammar import LOCK

    bitmask = xgrammar.allocate_token_bitmask(logits.shape[0], logits.shape[1])  # (B, ceil(V / 32)) int32
    with LOCK:
        for matcher, b in zip(matchers, rows):
            matcher.fill_next_token_bitmask(bitmask, b)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)
