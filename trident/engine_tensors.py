"""The engine interface between ``llm`` and the engine model: TensorRT-LLM's backend tensors.

Names, dtypes and semantics are those of the ``tensorrt_llm`` model of NVIDIA's
tensorrtllm_backend (TensorRT-LLM 1.2.1), which trident's CPU engine also serves, so the same
requests work on GPU and CPU. Written once, here: ``llm`` encodes a request with
:func:`engine_inputs` and a stop with :func:`stop_inputs` and reads tokens with
:func:`read_output_ids`; the CPU engine's adapter decodes with :func:`read_sampling`,
:func:`decode_words_list` and :func:`is_stop` and answers with :func:`output_arrays`.
No torch and no Triton import: unit-tested on its own.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from .contract import SamplingParams

#: Inputs of the engine model (name -> numpy dtype), the subset of the TensorRT-LLM backend's
#: that trident uses; declared with the same names in both repository flavours' config.pbtxt.
ENGINE_INPUTS: dict[str, Any] = {
    "input_ids": np.int32,
    "input_lengths": np.int32,
    "request_output_len": np.int32,
    "end_id": np.int32,
    "pad_id": np.int32,
    "stop_words_list": np.int32,
    "bad_words_list": np.int32,
    "temperature": np.float32,
    "runtime_top_k": np.int32,
    "runtime_top_p": np.float32,
    "repetition_penalty": np.float32,
    "seed": np.uint64,  # TensorRT-LLM 1.2's name; older clients of its ensemble send random_seed
    "random_seed": np.uint64,
    "stop": np.bool_,
    "streaming": np.bool_,
}
OUTPUT_IDS = "output_ids"  # (batch 1, beam 1, new tokens) int32
SEQUENCE_LENGTH = "sequence_length"  # (1, 1) int32
ENGINE_OUTPUTS = (OUTPUT_IDS, SEQUENCE_LENGTH)


class EngineTensorError(ValueError):
    """A tensor that does not follow the interface; the message names it."""


def _one(value: Any, name: str) -> np.ndarray:
    return np.array([[value]], dtype=ENGINE_INPUTS[name])  # [1, 1]


# -- request: llm side --------------------------------------------------------------------------


def words_list(sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """TensorRT-LLM's stop/bad words format, shape (1, 2, L): ids, then cumulative end offsets
    padded with -1: [[5, 6], [7]] -> [[[5, 6, 7], [2, 3, -1]]]."""
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


def engine_inputs(sampling: SamplingParams, *, input_ids: Sequence[int], end_id: int, pad_id: int,
                  bad_words_ids: Sequence[Sequence[int]] = ()) -> dict[str, np.ndarray]:
    """The engine request for one prompt (leading batch dim 1, explicit dtypes). Every sampling
    value is sent, so the engine's own defaults never apply. Greedy (``sampling.greedy``) is
    TensorRT-LLM's ``runtime_top_k`` 1 (it refuses a zero temperature). Always streaming: ``llm``
    matches stop sequences as tokens come and stops the request on a match."""
    tensors = {
        "input_ids": np.array([list(input_ids)], dtype=np.int32),
        "input_lengths": _one(len(input_ids), "input_lengths"),
        "request_output_len": _one(sampling.max_new_tokens, "request_output_len"),
        "end_id": _one(end_id, "end_id"),
        "pad_id": _one(pad_id, "pad_id"),
        "streaming": _one(True, "streaming"),
        "repetition_penalty": _one(sampling.repetition_penalty, "repetition_penalty"),
    }
    if sampling.greedy:
        tensors["runtime_top_k"] = _one(1, "runtime_top_k")
        tensors["temperature"] = _one(1.0, "temperature")
    else:
        tensors["temperature"] = _one(sampling.temperature, "temperature")
        tensors["runtime_top_k"] = _one(sampling.top_k, "runtime_top_k")
        tensors["runtime_top_p"] = _one(sampling.top_p, "runtime_top_p")
    if sampling.seed is not None:
        tensors["seed"] = _one(sampling.seed, "seed")
    if bad_words_ids:
        tensors["bad_words_list"] = words_list(bad_words_ids)
    return tensors


def stop_inputs() -> dict[str, np.ndarray]:
    """TensorRT-LLM's stop request: the same request id with ``stop`` set (ids are dummies)."""
    return {
        "input_ids": np.zeros((1, 1), dtype=np.int32),
        "input_lengths": np.ones((1, 1), dtype=np.int32),
        "request_output_len": np.ones((1, 1), dtype=np.int32),
        "stop": np.ones((1, 1), dtype=np.bool_),
    }


def read_output_ids(array: Optional[np.ndarray]) -> list[int]:
    return [] if array is None else np.asarray(array).reshape(-1).tolist()


# -- request: engine side -----------------------------------------------------------------------


def batch_row(name: str, arr: np.ndarray, row_ndim: int) -> np.ndarray:
    """Drop a leading batch dimension of 1; refuse real batches (one request = one sequence)."""
    arr = np.asarray(arr)
    if arr.ndim == row_ndim + 1:
        if arr.shape[0] != 1:
            raise EngineTensorError(f"{name}: batch size {arr.shape[0]} is not supported, send 1")
        arr = arr[0]
    if arr.ndim != row_ndim:
        raise EngineTensorError(f"{name}: unexpected shape {list(np.shape(arr))}")
    return arr


def scalar(tensors: Mapping[str, np.ndarray], name: str, default: Any = None) -> Any:
    arr = tensors.get(name)
    if arr is None:
        return default
    flat = np.asarray(arr).reshape(-1)
    if flat.size != 1:
        raise EngineTensorError(f"{name}: expected one value, got shape {list(np.shape(arr))}")
    return flat[0].item()


def decode_words_list(arr: np.ndarray, name: str = "stop_words_list") -> list[list[int]]:
    """The inverse of :func:`words_list`; also takes [2, L] (after a reshape)."""
    arr = batch_row(name, arr, 2)
    if arr.shape[0] != 2:
        raise EngineTensorError(f"{name}: expected shape [1, 2, L], got {list(arr.shape)}")
    ids, offsets = arr[0].tolist(), arr[1].tolist()
    words: list[list[int]] = []
    start = 0
    for end in offsets:
        if end < 0:
            break
        if end <= start or end > len(ids):
            raise EngineTensorError(f"{name}: offsets must increase within [1, {len(ids)}], got {offsets}")
        words.append([int(t) for t in ids[start:end]])
        start = end
    return words


def read_sampling(tensors: Mapping[str, np.ndarray]) -> SamplingParams:
    """The sampling of an engine request, with the TensorRT-LLM backend's semantics for absent
    inputs: ``runtime_top_k`` 1, or neither top-k nor top-p, is greedy (temperature 0 here);
    top-p 0 is off. Values are not range-checked here (the engine validates them)."""
    top_k = int(scalar(tensors, "runtime_top_k", 0))
    top_p = float(scalar(tensors, "runtime_top_p", 0.0))
    temperature = float(scalar(tensors, "temperature", 1.0))
    if top_k == 1 or (top_k == 0 and top_p == 0.0):
        temperature = 0.0
    seed = scalar(tensors, "seed")
    if seed is None:
        seed = scalar(tensors, "random_seed")
    return SamplingParams(
        max_new_tokens=int(scalar(tensors, "request_output_len")),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=float(scalar(tensors, "repetition_penalty", 1.0)),
        seed=None if seed is None else int(seed),
    )


def is_stop(tensors: Mapping[str, np.ndarray]) -> bool:
    return bool(scalar(tensors, "stop", False))


# -- responses ------------------------------------------------------------------------------------


def output_arrays(token_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """Generated tokens (prompt excluded) as TensorRT-LLM outputs: (1, 1, n) and (1, 1)."""
    return {
        OUTPUT_IDS: np.asarray(token_ids, dtype=np.int32).reshape(1, 1, len(token_ids)),
        SEQUENCE_LENGTH: np.asarray([[len(token_ids)]], dtype=np.int32),
    }
