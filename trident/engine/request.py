"""What goes into the engine (token ids + the one SamplingParams object) and what comes out."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np

from trident.contract import (
    INVALID_REQUEST,
    MAX_CHOICES,
    MAX_TOP_LOGPROBS,
    SERVER_ERROR,
    UNAVAILABLE,
    SamplingParams,
)

FinishReason = Literal["length", "end_id", "stop_words", "cancelled", "error"]


class EngineError(Exception):
    """Base class; ``error_type`` is the tag (trident.contract) the Triton adapter puts in front
    of the message, with ``param`` (the request field at fault) when there is one."""

    error_type = SERVER_ERROR

    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(EngineError):
    """submit() refused: max_queue_size requests are already waiting."""

    error_type = UNAVAILABLE


class EngineStoppedError(EngineError):
    error_type = UNAVAILABLE


class InvalidRequestError(EngineError, ValueError):
    error_type = INVALID_REQUEST


@dataclass
class GenerationRequest:
    """One engine request: token ids, the request's SamplingParams (read from TensorRT-LLM's
    tensors by trident.engine_tensors.read_sampling; their text-level ``stop``/``bad_words`` are
    not used here), and the engine-level token lists of TensorRT-LLM's interface."""

    request_id: str
    input_ids: list[int]
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=16, temperature=0.0))
    end_id: int | None = None
    pad_id: int | None = None
    stop_words: list[list[int]] = field(default_factory=list)  # token sequences
    bad_words: list[list[int]] = field(default_factory=list)
    streaming: bool = False
    # Not streaming: the output's token_ids start with input_ids (exclude_input_in_output false).
    include_input: bool = False
    # num_context_log_probs: the prompt's own log-probabilities with k alternatives per position,
    # in the first output (context.py); None: not asked.
    context_logprobs: int | None = None
    # return_num_cached_tokens: the final output says how many prompt tokens came from the
    # prefix cache (num_cached_tokens; OpenAI's usage.prompt_tokens_details.cached_tokens).
    report_cached: bool = False
    # min_tokens_stop_ids: tokens banned with end_id while fewer than min_tokens tokens were
    # generated (the llm model's stop tokens, vLLM's min_tokens; TensorRT-LLM bans end_id only).
    min_tokens_stops: tuple[int, ...] = ()
    # cache_salt_id: its prefix cache blocks are shared only with requests of the same id (vLLM's
    # cache_salt); None: with every request without one.
    cache_salt_id: int | None = None
    # priority: the waiting queue admits the lower values first, then in arrival order (vLLM's
    # priority; every request 0 by default: first come, first served)
    priority: int = 0
    # Polled at most every cancel_check_interval; True cancels the request (the client went away).
    is_cancelled: Callable[[], bool] | None = field(default=None, repr=False)
    # The guide compiled by Engine.submit (xgrammar.CompiledGrammar), in the submitting thread.
    grammar: Any = field(default=None, repr=False)

    # Read-only views of the sampling parameters, for the scheduler's convenience.
    max_new_tokens = property(lambda self: self.sampling.max_new_tokens)
    temperature = property(lambda self: self.sampling.temperature)
    top_k = property(lambda self: self.sampling.top_k)
    top_p = property(lambda self: self.sampling.top_p)
    repetition_penalty = property(lambda self: self.sampling.repetition_penalty)
    seed = property(lambda self: self.sampling.seed)

    def validate(self, *, vocab_size: int, max_seq_len: int, max_batch_size: int | None = None) -> None:
        """Raise InvalidRequestError with a message naming the field; called by Engine.submit."""
        if not self.input_ids:
            raise InvalidRequestError("input_ids must not be empty")
        bad = [t for t in self.input_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"input_ids contains ids outside [0, {vocab_size}): {bad[:5]}")
        if self.max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        total = len(self.input_ids) + self.max_new_tokens
        if len(self.input_ids) >= max_seq_len:
            raise InvalidRequestError(
                f"prompt has {len(self.input_ids)} tokens; max_seq_len is {max_seq_len} "
                "(prompt + max_new_tokens must fit)"
            )
        if total > max_seq_len:
            raise InvalidRequestError(
                f"prompt ({len(self.input_ids)} tokens) + max_new_tokens ({self.max_new_tokens}) = {total} "
                f"exceeds max_seq_len {max_seq_len}"
            )
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in [0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0.0:
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.end_id is not None and not 0 <= self.end_id < vocab_size:
            # TensorRT-LLM clients send end_id = -1 or a padded value for "none"; callers map that to None
            raise InvalidRequestError(f"end_id must be in [0, {vocab_size}), got {self.end_id}")
        for name in ("stop_words", "bad_words"):
            for words in getattr(self, name):
                if not words:
                    raise InvalidRequestError(f"{name} contains an empty sequence")
                if any(not 0 <= t < vocab_size for t in words):
                    raise InvalidRequestError(f"{name} contains ids outside [0, {vocab_size})")
        self._validate_output_controls(vocab_size, max_batch_size)

    def _validate_output_controls(self, vocab_size: int, max_batch_size: int | None) -> None:
        """TensorRT-LLM's input names in the messages and tags (a direct caller of the engine
        model sends those); trident.contract checks the same fields above llm with its own."""
        s = self.sampling
        n_limit = min(MAX_CHOICES, max_batch_size or MAX_CHOICES)
        if not 1 <= s.n <= n_limit:  # over max_batch_size it could never be admitted
            why = " (the engine's max_batch_size)" if n_limit < MAX_CHOICES else ""
            raise InvalidRequestError(f"num_return_sequences must be between 1 and {n_limit}{why}, got {s.n}",
                                      param="num_return_sequences")
        if not 0 <= s.min_tokens <= s.max_new_tokens:
            raise InvalidRequestError(f"min_tokens must be between 0 and request_output_len ({s.max_new_tokens}), "
                                      f"got {s.min_tokens}", param="min_tokens")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(s, name)):
                raise InvalidRequestError(f"{name} must be finite, got {getattr(s, name)}", param=name)
        if not 0.0 <= s.min_p <= 1.0:  # also NaN
            raise InvalidRequestError(f"min_p must be between 0 and 1, got {s.min_p}", param="min_p")
        if s.logprobs is not None and not 0 <= s.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"num_top_log_probs must be between 0 and {MAX_TOP_LOGPROBS}, got {s.logprobs}",
                                      param="num_top_log_probs")
        if self.context_logprobs is not None and not 0 <= self.context_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"num_context_log_probs must be between 0 and {MAX_TOP_LOGPROBS}, "
                                      f"got {self.context_logprobs}", param="num_context_log_probs")
        if any(not 0 <= t < vocab_size for t in self.min_tokens_stops):
            raise InvalidRequestError(f"min_tokens_stop_ids contains ids outside [0, {vocab_size})",
                                      param="min_tokens_stop_ids")
        # the tokens the dense embedding_bias names: allowed ones and biased ones, one bound for both
        named = (*s.allowed_token_ids, *(token for token, _ in s.logit_bias))
        if named and not (0 <= min(named) and max(named) < vocab_size):
            token = next(t for t in named if not 0 <= t < vocab_size)
            raise InvalidRequestError(f"embedding_bias has {vocab_size} entries at most (the model's vocabulary), "
                                      f"got one for token {token}", param="embedding_bias")
        for token, bias in s.logit_bias:
            if not math.isfinite(bias):
                raise InvalidRequestError(f"embedding_bias must be finite, got {bias} for token {token}",
                                          param="embedding_bias")


@dataclass
class GenerationOutput:
    """One output of a sequence. ``finished``: the request's last output (Triton's final flag).
    With num_return_sequences n > 1 each of the n sequences ends with an output carrying its
    ``finish_reason``; only the last of them is ``finished``. An error ends all n at once."""

    request_id: str
    token_ids: list[int]  # streaming: tokens since the last call; otherwise all generated tokens
    finished: bool
    finish_reason: FinishReason | None = None  # set on a sequence's last output
    error: str | None = None
    error_type: str | None = None  # a trident.contract error kind
    error_param: str | None = None  # the request field at fault (invalid requests)
    step: int = 0  # decode steps the engine had completed when this output was produced
    sequence_index: int | None = None  # which of n (None when n is 1)
    # With logprobs: one per token of token_ids, the running sum over all the sequence's tokens,
    # and with k alternatives, (len(token_ids), k) ids and log-probabilities, best first.
    log_probs: list[float] | None = None
    cum_log_prob: float | None = None
    top_ids: list[list[int]] | None = None
    top_log_probs: list[list[float]] | None = None
    # With context_logprobs, on the request's first output only: (L,) fp32 log P(prompt[i] |
    # prompt[:i]) (NaN at 0), and (L, k) int32 ids / fp32 log-probabilities, best first (row 0:
    # -1 / NaN), and (L,) int32 ranks (0 at 0). See context.ContextLogprobs.
    context_log_probs: np.ndarray | None = None
    context_top_ids: np.ndarray | None = None
    context_top_log_probs: np.ndarray | None = None
    context_ranks: np.ndarray | None = None
    # With report_cached, on the request's final output: its prompt tokens whose K/V came from the
    # prefix cache at admission (0 on the fp32 slot batch, which has none).
    cached_tokens: int | None = None
