"""What goes into the engine (one parameters object per request) and what comes out."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

FinishReason = Literal["length", "end_id", "stop_words", "cancelled", "error"]


class EngineError(Exception):
    """Base class; ``error_type`` is the tag the Triton adapter puts in front of the message."""

    error_type = "internal_error"


class QueueFullError(EngineError):
    """submit() refused: max_queue_size requests are already waiting."""

    error_type = "service_unavailable"


class EngineStoppedError(EngineError):
    error_type = "service_unavailable"


class InvalidRequestError(EngineError, ValueError):
    error_type = "invalid_request_error"


@dataclass
class GenerationRequest:
    request_id: str
    input_ids: list[int]
    max_new_tokens: int = 16
    end_id: int | None = None
    pad_id: int | None = None
    temperature: float = 0.0  # 0 => greedy
    top_k: int = 0  # 0 = off, 1 => greedy
    top_p: float = 1.0  # 1.0 or 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    seed: int | None = None
    stop_words: list[list[int]] = field(default_factory=list)
    bad_words: list[list[int]] = field(default_factory=list)
    streaming: bool = False
    # Polled once per engine step; True cancels the request (e.g. the client went away).
    is_cancelled: Callable[[], bool] | None = field(default=None, repr=False)

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
    error_type: str | None = None  # "invalid_request_error" | "service_unavailable" | "internal_error"
    step: int = 0  # decode steps the engine had completed when this output was produced
    num_generated: int = 0  # tokens generated so far (end_id excluded)
