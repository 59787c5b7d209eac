"""The text-level request of the ``llm`` Triton model, independent of Triton itself.

Inputs use the names of NVIDIA's TensorRT-LLM ``ensemble`` (``text_input``, ``max_tokens``,
``stop_words`` ...); the engine request uses the tensor names of TensorRT-LLM's backend
(``input_ids``, ``request_output_len``, ``runtime_top_k`` ...), which the CPU engine shares.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import InvalidRequest
from .text import IncrementalDetokenizer, StopSequenceMatcher

FINISH_LENGTH = "length"
FINISH_STOP = "stop_sequence"
FINISH_EOS = "eos_token"


@dataclasses.dataclass
class TextRequest:
    prompt: str
    max_tokens: int
    stop_words: list[str] = dataclasses.field(default_factory=list)
    bad_words: list[str] = dataclasses.field(default_factory=list)
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    end_id: Optional[int] = None
    pad_id: Optional[int] = None
    stream: bool = False


def _scalar(value: Optional[np.ndarray], cast):
    if value is None:
        return None
    flat = np.asarray(value).reshape(-1)
    if flat.size == 0:
        return None
    return cast(flat[0])


def _strings(value: Optional[np.ndarray]) -> list[str]:
    if value is None:
        return []
    out = []
    for item in np.asarray(value).reshape(-1):
        text = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        if text:
            out.append(text)
    return out


def parse_text_request(get: Callable[[str], Optional[np.ndarray]]) -> TextRequest:
    """Build a request from named input tensors (``get`` returns None for absent ones)."""
    prompts = _strings(get("text_input"))
    if len(prompts) != 1:
        raise InvalidRequest("text_input must hold exactly one non-empty prompt", param="prompt")
    max_tokens = _scalar(get("max_tokens"), int)
    if max_tokens is None or max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}", param="max_new_tokens")
    seed = _scalar(get("seed"), int)
    if seed is None:
        seed = _scalar(get("random_seed"), int)
    return TextRequest(
        prompt=prompts[0],
        max_tokens=max_tokens,
        stop_words=_strings(get("stop_words")),
        bad_words=_strings(get("bad_words")),
        temperature=_scalar(get("temperature"), float),
        top_k=_scalar(get("top_k"), int),
        top_p=_scalar(get("top_p"), float),
        repetition_penalty=_scalar(get("repetition_penalty"), float),
        seed=seed,
        end_id=_scalar(get("end_id"), int),
        pad_id=_scalar(get("pad_id"), int),
        stream=bool(_scalar(get("stream"), bool) or False),
    )


def words_list(sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """TensorRT-LLM's stop/bad words format, shape (1, 2, L): ids, then cumulative end offsets."""
    flat: list[int] = []
    offsets: list[int] = []
    for seq in sequences:
        flat.extend(int(t) for t in seq)
        offsets.append(len(flat))
    length = max(len(flat), 1)
    out = np.full((1, 2, length), -1, dtype=np.int32)
    out[0, 0, : len(flat)] = flat
    if not flat:
        out[0, 0, 0] = 0
    out[0, 1, : len(offsets)] = offsets
    return out


def engine_tensors(req: TextRequest, *, input_ids: Sequence[int], end_id: int, pad_id: int,
                   bad_words_ids: Sequence[Sequence[int]] = ()) -> dict[str, np.ndarray]:
    """Map one request to the engine's named tensors (leading batch dim 1, explicit dtypes).

    The engine always streams to this model, so stop sequences are found as soon as they are
    generated and the engine request can be stopped. Temperature 0 means greedy, which
    TensorRT-LLM expresses as top_k = 1 (it does not accept a zero temperature).
    """
    def one(value, dtype):
        return np.array([[value]], dtype=dtype)

    tensors = {
        "input_ids": np.array([list(input_ids)], dtype=np.int32),
        "input_lengths": one(len(input_ids), np.int32),
        "request_output_len": one(req.max_tokens, np.int32),
        "end_id": one(req.end_id if req.end_id is not None else end_id, np.int32),
        "pad_id": one(req.pad_id if req.pad_id is not None else pad_id, np.int32),
        "streaming": one(True, np.bool_),
    }
    greedy = req.temperature is not None and req.temperature == 0.0
    if greedy:
        tensors["runtime_top_k"] = one(1, np.int32)
        tensors["temperature"] = one(1.0, np.float32)
    else:
        if req.temperature is not None:
            tensors["temperature"] = one(req.temperature, np.float32)
        if req.top_k is not None:
            tensors["runtime_top_k"] = one(req.top_k, np.int32)
        if req.top_p is not None:
            tensors["runtime_top_p"] = one(req.top_p, np.float32)
    if req.repetition_penalty is not None:
        tensors["repetition_penalty"] = one(req.repetition_penalty, np.float32)
    if req.seed is not None:
        tensors["seed"] = one(req.seed, np.uint64)
    if bad_words_ids:
        tensors["bad_words_list"] = words_list(bad_words_ids)
    return tensors


class TextGeneration:
    """Turns the engine's token stream into released text, a finish reason and token counts."""

    def __init__(self, tokenizer, req: TextRequest, *, prompt_tokens: int):
        self.req = req
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopSequenceMatcher(req.stop_words)
        self.finish_reason: Optional[str] = None

    @property
    def stopped(self) -> bool:
        """A stop sequence matched: the engine request should be stopped."""
        return self._stops.matched is not None

    def push(self, token_ids: Sequence[int]) -> str:
        """New engine tokens -> text safe to hand out now."""
        if self.stopped or not len(token_ids):
            return ""
        out = []
        for token in token_ids:  # one at a time, so counting stops at the matching token
            self.completion_tokens += 1
            out.append(self._stops.push(self._detok.push([token])))
            if self.stopped:
                self.finish_reason = FINISH_STOP
                break
        return "".join(out)

    def finish(self) -> str:
        """The engine finished this request; returns the text still held back."""
        if self.stopped:
            return ""
        tail = self._stops.push(self._detok.flush())
        if self.stopped:
            self.finish_reason = FINISH_STOP
            return tail
        tail += self._stops.flush()
        self.finish_reason = FINISH_LENGTH if self.completion_tokens >= self.req.max_tokens else FINISH_EOS
        return tail
