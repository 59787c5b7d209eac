"""TensorRT-LLM-style Triton tensors <-> engine objects, with no Triton import (unit-testable).

Tensor names, dtypes and semantics mirror the ``tensorrt_llm`` model of NVIDIA's
tensorrtllm_backend, so clients written for it work unchanged. Each tensor may arrive with the
leading batch dimension of 1 the clients send (e.g. input_ids [1, T]) or without it (scalars
reshaped to [] by config.pbtxt).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .request import GenerationRequest, InvalidRequestError


def _batch_row(name: str, arr: np.ndarray, row_ndim: int) -> np.ndarray:
    """Drop a leading batch dimension of 1; refuse real batches (one request = one sequence)."""
    arr = np.asarray(arr)
    if arr.ndim == row_ndim + 1:
        if arr.shape[0] != 1:
            raise InvalidRequestError(f"{name}: batch size {arr.shape[0]} is not supported, send 1")
        arr = arr[0]
    if arr.ndim != row_ndim:
        raise InvalidRequestError(f"{name}: unexpected shape {list(np.shape(arr))}")
    return arr


def _scalar(tensors: Mapping[str, np.ndarray], name: str, default=None):
    arr = tensors.get(name)
    if arr is None:
        return default
    flat = np.asarray(arr).reshape(-1)
    if flat.size != 1:
        raise InvalidRequestError(f"{name}: expected one value, got shape {list(np.shape(arr))}")
    return flat[0].item()


def decode_word_list(arr: np.ndarray, name: str = "stop_words_list") -> list[list[int]]:
    """TensorRT-LLM word list [1, 2, L] (or [2, L]) -> list of token sequences.

    Row 0 holds the concatenated token ids of all words, row 1 the cumulative end offset of each
    word, padded with -1: [[5, 6, 7, 0], [2, 3, -1, -1]] -> [[5, 6], [7]].
    """
    arr = _batch_row(name, arr, 2)
    if arr.shape[0] != 2:
        raise InvalidRequestError(f"{name}: expected shape [1, 2, L], got {list(arr.shape)}")
    ids, offsets = arr[0].tolist(), arr[1].tolist()
    words: list[list[int]] = []
    start = 0
    for end in offsets:
        if end < 0:
            break
        if end <= start or end > len(ids):
            raise InvalidRequestError(f"{name}: offsets must increase within [1, {len(ids)}], got {offsets}")
        words.append([int(t) for t in ids[start:end]])
        start = end
    return words


def is_stop_request(tensors: Mapping[str, np.ndarray]) -> bool:
    return bool(_scalar(tensors, "stop", False))


def request_from_tensors(request_id: str, tensors: Mapping[str, np.ndarray]) -> GenerationRequest:
    """Build the engine request; raises InvalidRequestError naming the offending tensor."""
    if "input_ids" not in tensors or "request_output_len" not in tensors:
        raise InvalidRequestError("input_ids and request_output_len are required")
    input_ids = _batch_row("input_ids", tensors["input_ids"], 1).astype(np.int64).tolist()
    length = _scalar(tensors, "input_lengths")
    if length is not None:
        if not 0 < length <= len(input_ids):
            raise InvalidRequestError(f"input_lengths {length} does not match input_ids ({len(input_ids)} ids)")
        input_ids = input_ids[:length]

    # TensorRT-LLM: top_k == 1, or neither top_k nor top_p, means greedy; so does temperature 0 here.
    top_k = int(_scalar(tensors, "runtime_top_k", 0))
    top_p = float(_scalar(tensors, "runtime_top_p", 0.0))
    temperature = float(_scalar(tensors, "temperature", 1.0))
    if top_k == 1 or (top_k == 0 and top_p == 0.0):
        temperature = 0.0
    end_id = _scalar(tensors, "end_id")
    # TensorRT-LLM 1.2's backend reads "seed"; older clients of its ensemble send "random_seed".
    seed = _scalar(tensors, "seed")
    if seed is None:
        seed = _scalar(tensors, "random_seed")
    stop_words = decode_word_list(tensors["stop_words_list"]) if "stop_words_list" in tensors else []
    bad_words = (
        decode_word_list(tensors["bad_words_list"], "bad_words_list") if "bad_words_list" in tensors else []
    )
    return GenerationRequest(
        request_id=request_id,
        input_ids=input_ids,
        max_new_tokens=int(_scalar(tensors, "request_output_len")),
        end_id=None if end_id is None or end_id < 0 else int(end_id),
        pad_id=_scalar(tensors, "pad_id"),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=float(_scalar(tensors, "repetition_penalty", 1.0)),
        seed=None if seed is None else int(seed),
        stop_words=stop_words,
        bad_words=bad_words,
        streaming=bool(_scalar(tensors, "streaming", False)),
    )


def output_arrays(token_ids: list[int]) -> dict[str, np.ndarray]:
    """Generated tokens (prompt excluded) as TensorRT-LLM outputs: (batch=1, beam=1, n) and (1, 1)."""
    return {
        "output_ids": np.asarray(token_ids, dtype=np.int32).reshape(1, 1, len(token_ids)),
        "sequence_length": np.asarray([[len(token_ids)]], dtype=np.int32),
    }


def error_message(error_type: str | None, message: str | None) -> str:
    """The adapter's error text: a bracketed tag the gateway maps to a status, then the reason."""
    return f"[{error_type or 'internal_error'}] {message or 'unknown error'}"
