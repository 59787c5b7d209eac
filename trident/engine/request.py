"""What goes into the engine (token ids + the one SamplingParams object) and what comes out."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from trident.contract import INVALID_REQUEST, SERVER_ERROR, UNAVAILABLE, SamplingParams

FinishReason = Literal["length", "end_id", "stop_words", "cancelled", "error"]


class EngineError(Exception):
    """Base class; ``error_type`` is the tag (trident.contract) the Triton adapter puts in front
    of the message."""

    error_type = SERVER_ERROR


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
    # Polled at most every cancel_check_interval; True cancels the request (the client went away).
    is_cancelled: Callable[[], bool] | None = field(default=None, repr=False)

    # Read-only views of the sampling parameters, for the scheduler's convenience.
    max_new_tokens = property(lambda self: self.sampling.max_new_tokens)
    temperature = property(lambda self: self.sampling.temperature)
    top_k = property(lambda self: self.sampling.top_k)
    top_p = property(lambda self: self.sampling.top_p)
    repetition_penalty = property(lambda self: self.sampling.repetition_penalty)
    seed = property(lambda self: self.sampling.seed)

    def validate(self, *, vocab_size: int, max_seq_len: int) -> None:
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


@dataclass
class GenerationOutput:
    request_id: str
    token_ids: list[int]  # streaming: tokens since the last call; otherwise all generated tokens
    finished: bool
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_type: str | None = None  # a trident.contract error kind
    step: int = 0  # decode steps the engine had completed when this output was produced
