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

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .contract import DISALLOWED_BIAS, Guide, SamplingParams

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
    # Output controls (issue 15), TensorRT-LLM's inputs:
    "num_return_sequences": np.int32,
    "min_tokens": np.int32,
    "presence_penalty": np.float32,
    "frequency_penalty": np.float32,
    "return_log_probs": np.bool_,
    "embedding_bias": np.float32,  # (1, vocab): added to the logits (OpenAI's logit_bias)
    "guided_decoding_guide_type": np.object_,
    "guided_decoding_guide": np.object_,
    # Sent by NVIDIA's clients on every request (inflight_batcher_llm_client.py), never by llm:
    # beam_width must be 1 (engines built with max_beam_width 1); exclude_input_in_output false
    # puts the prompt's ids in front of a non-streaming request's output_ids (absent: the
    # model's parameter, "true" in both flavours).
    "beam_width": np.int32,
    "exclude_input_in_output": np.bool_,
}
#: Inputs only trident's CPU engine reads (TensorRT-LLM 1.2.1's backend has no such input; the
#: llm model refuses a request needing one on GPU: trident.contract.ENGINE_FEATURES).
CPU_ENGINE_INPUTS: dict[str, Any] = {
    "min_p": np.float32,
    "num_top_log_probs": np.int32,  # alternatives per token, 0..20 (with return_log_probs)
    # the prompt's own log-probabilities, with this many alternatives per position (0..20);
    # absent or negative: none (OpenAI's echo with logprobs)
    "num_context_log_probs": np.int32,
    # the final response says how many prompt tokens came from the prefix cache (num_cached_tokens)
    "return_num_cached_tokens": np.bool_,
    # (1, K) ids banned as end_id is while fewer than min_tokens tokens were generated (vLLM bans
    # its stop tokens there; TensorRT-LLM only the end id)
    "min_tokens_stop_ids": np.int32,
    # (1, 1) the request's prefix cache blocks are shared only with requests of the same id
    # (the name of a request field in TensorRT-LLM's sources; cache_salt_id() of vLLM's cache_salt)
    "cache_salt_id": np.uint64,
    # (1, 1) the waiting queue admits the lower values first, then in arrival order (vLLM's
    # priority; absent: 0). TensorRT-LLM's executor has a priority the Triton backend never reads.
    "priority": np.int32,
}
OUTPUT_IDS = "output_ids"  # (batch 1, beam 1, new tokens) int32
SEQUENCE_LENGTH = "sequence_length"  # (1, 1) int32
OUTPUT_LOG_PROBS = "output_log_probs"  # (1, 1, new tokens) fp32: of the tokens in output_ids
CUM_LOG_PROBS = "cum_log_probs"  # (1, 1) fp32: the sum over every token generated so far
SEQUENCE_INDEX = "sequence_index"  # (1, 1) int32: which of num_return_sequences (when > 1)
TOP_LOG_PROBS = "top_log_probs"  # CPU engine: (1, 1, new tokens, k) fp32, best first
TOP_LOG_PROB_IDS = "top_log_prob_ids"  # CPU engine: (1, 1, new tokens, k) int32
ENGINE_OUTPUTS = (OUTPUT_IDS, SEQUENCE_LENGTH)
#: What llm asks for besides ENGINE_OUTPUTS when a request has logprobs or several choices.
LOG_PROB_OUTPUTS = (OUTPUT_LOG_PROBS, CUM_LOG_PROBS)
CPU_ENGINE_OUTPUTS = (TOP_LOG_PROBS, TOP_LOG_PROB_IDS)
# CPU engine, with num_context_log_probs, only in a request's first response (L: prompt length):
CONTEXT_LOG_PROBS = "context_log_probs"  # (1, 1, L) fp32: element i is log P(prompt[i] | prompt[:i]); 0: NaN
CONTEXT_TOP_LOG_PROBS = "context_top_log_probs"  # (1, 1, L, k) fp32, best first; row 0: NaN
CONTEXT_TOP_LOG_PROB_IDS = "context_top_log_prob_ids"  # (1, 1, L, k) int32; row 0: -1
CONTEXT_LOG_PROB_RANKS = "context_log_prob_ranks"  # (1, 1, L) int32: tokens at least as likely, itself too; 0: 0
CONTEXT_OUTPUTS = (CONTEXT_LOG_PROBS, CONTEXT_TOP_LOG_PROBS, CONTEXT_TOP_LOG_PROB_IDS, CONTEXT_LOG_PROB_RANKS)
# CPU engine, with return_num_cached_tokens, on the request's final response:
NUM_CACHED_TOKENS = "num_cached_tokens"  # (1, 1) int32: prompt tokens taken from the prefix cache


class EngineTensorError(ValueError):
    """A tensor that does not follow the interface; the message names it."""


def _one(value: Any, name: str) -> np.ndarray:
    return np.array([[value]], dtype={**ENGINE_INPUTS, **CPU_ENGINE_INPUTS}[name])  # [1, 1]


def _string(value: str) -> np.ndarray:
    return np.array([[value.encode("utf-8")]], dtype=np.object_)  # [1, 1]


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
                  bad_words_ids: Sequence[Sequence[int]] = (), vocab_size: int = 0,
                  report_cached: bool = False, min_tokens_stop_ids: Iterable[int] = ()) -> dict[str, np.ndarray]:
    """The engine request for one prompt (leading batch dim 1, explicit dtypes). Every sampling
    value is sent, so the engine's own defaults never apply. Greedy (``sampling.greedy``) is
    TensorRT-LLM's ``runtime_top_k`` 1 (it refuses a zero temperature). Always streaming: ``llm``
    matches stop sequences as tokens come and stops the request on a match. ``report_cached``:
    ask for the final response's num_cached_tokens (CPU engine only). ``min_tokens_stop_ids``:
    the tokens that end a choice besides ``end_id`` (stop_token_ids, the model's other end
    tokens), banned with it before ``min_tokens`` (CPU engine only). With ``ignore_eos`` the
    engine's ``min_tokens`` is the whole output (the end id never comes); with stop ids to ban
    as well, it is ``min_tokens`` instead and the end id a one-token bad word, banned throughout,
    so that the stop ids are banned for ``min_tokens`` tokens only."""
    tensors = {
        "input_ids": np.array([list(input_ids)], dtype=np.int32),
        "input_lengths": _one(len(input_ids), "input_lengths"),
        "request_output_len": _one(sampling.engine_tokens, "request_output_len"),
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
    stops = sorted(set(min_tokens_stop_ids) - {end_id}) if sampling.min_tokens else []
    split_ban = bool(stops) and sampling.ignore_eos  # the end id throughout, the stop ids for min_tokens
    bad_words = [*bad_words_ids, [end_id]] if split_ban else bad_words_ids
    if bad_words:
        tensors["bad_words_list"] = words_list(bad_words)
    tensors.update(_output_control_inputs(sampling, vocab_size,
                                          min_tokens=sampling.min_tokens if split_ban else sampling.engine_min_tokens))
    if report_cached:  # an engine with the feature (CPU): the prefix cache's share of the prompt
        tensors["return_num_cached_tokens"] = _one(True, "return_num_cached_tokens")
    if stops:
        tensors["min_tokens_stop_ids"] = np.array([stops], dtype=np.int32)
    return tensors


def _output_control_inputs(s: SamplingParams, vocab_size: int, *, min_tokens: int) -> dict[str, np.ndarray]:
    """The output controls, each only when it is not its default (a plain request stays as it
    was); ``min_tokens``: the engine's (engine_inputs decides it). ``logit_bias`` becomes
    TensorRT-LLM's dense ``embedding_bias`` of the model's width."""
    tensors: dict[str, np.ndarray] = {}
    if s.n != 1:
        tensors["num_return_sequences"] = _one(s.n, "num_return_sequences")
    if min_tokens:
        tensors["min_tokens"] = _one(min_tokens, "min_tokens")
    if s.presence_penalty:
        tensors["presence_penalty"] = _one(s.presence_penalty, "presence_penalty")
    if s.frequency_penalty:
        tensors["frequency_penalty"] = _one(s.frequency_penalty, "frequency_penalty")
    if s.min_p:
        tensors["min_p"] = _one(s.min_p, "min_p")
    if s.logit_bias or s.allowed_token_ids:
        tensors["embedding_bias"] = _embedding_bias(s, vocab_size)
    if s.logprobs is not None:
        tensors["return_log_probs"] = _one(True, "return_log_probs")
        if s.logprobs:
            tensors["num_top_log_probs"] = _one(s.logprobs, "num_top_log_probs")
    if (k := context_logprobs(s)) is not None:  # the prompt's tokens with their log-probabilities (CPU engine)
        tensors["num_context_log_probs"] = _one(k, "num_context_log_probs")
    if s.cache_salt is not None:
        tensors["cache_salt_id"] = _one(cache_salt_id(s.cache_salt), "cache_salt_id")
    if s.priority:  # 0 is the engine's own default, and the only value a GPU deployment takes
        tensors["priority"] = _one(s.priority, "priority")
    if s.guide is not None:
        tensors["guided_decoding_guide_type"] = _string(s.guide.type)
        tensors["guided_decoding_guide"] = _string(s.guide.text)
    return tensors


def cache_salt_id(salt: str) -> int:
    """The engine's id of a cache_salt: 64 bits of its BLAKE2b digest (a salt is any string; the
    engine keys its prefix cache chains by the id)."""
    return int.from_bytes(hashlib.blake2b(salt.encode("utf-8"), digest_size=8).digest(), "little")


def context_logprobs(s: SamplingParams) -> Optional[int]:
    """The alternatives per prompt position the engine is asked for: echo's (logprobs) and
    prompt_logprobs' together, each shown its own; None when neither asks for the prompt's."""
    asked = [k for k in (s.logprobs if s.echo else None, s.prompt_logprobs) if k is not None]
    return max(asked) if asked else None


def _embedding_bias(s: SamplingParams, vocab_size: int) -> np.ndarray:
    """TensorRT-LLM's dense ``embedding_bias`` (1, vocab): ``logit_bias``, and with
    ``allowed_token_ids`` DISALLOWED_BIAS for every token not in it."""
    highest = max([t for t, _ in s.logit_bias] + list(s.allowed_token_ids))
    if vocab_size <= highest:
        raise ValueError(f"embedding_bias needs the model's vocabulary size (got {vocab_size})")
    allowed = set(s.allowed_token_ids)
    if allowed:
        bias = np.full((1, vocab_size), DISALLOWED_BIAS, dtype=np.float32)
        bias[0, list(allowed)] = 0.0
    else:
        bias = np.zeros((1, vocab_size), dtype=np.float32)
    for token, value in s.logit_bias:
        if not allowed or token in allowed:  # a bias on a disallowed token changes nothing
            bias[0, token] = value
    return bias


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
    logprobs = None
    if scalar(tensors, "return_log_probs", False):
        logprobs = int(scalar(tensors, "num_top_log_probs", 0))
    return SamplingParams(
        max_new_tokens=int(scalar(tensors, "request_output_len")),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=float(scalar(tensors, "repetition_penalty", 1.0)),
        seed=None if seed is None else int(seed),
        n=int(scalar(tensors, "num_return_sequences", 1)),
        min_tokens=int(scalar(tensors, "min_tokens", 0)),
        presence_penalty=float(scalar(tensors, "presence_penalty", 0.0)),
        frequency_penalty=float(scalar(tensors, "frequency_penalty", 0.0)),
        min_p=float(scalar(tensors, "min_p", 0.0)),
        **read_embedding_bias(tensors.get("embedding_bias")),
        logprobs=logprobs,
        guide=read_guide(tensors),
    )


def read_embedding_bias(arr: Optional[np.ndarray]) -> dict[str, tuple]:
    """A dense embedding_bias ((1, V) or (V,); absent: none) as the SamplingParams fields it
    came from: ``logit_bias`` (its non-zero entries) and, where some tokens have DISALLOWED_BIAS
    and others not, ``allowed_token_ids`` (the others) with ``logit_bias`` among those only, as
    the llm model builds it; either way the same logits."""
    if arr is None:
        return {}
    flat = np.asarray(arr, dtype=np.float32).reshape(-1)
    if not np.isfinite(flat).all():
        raise EngineTensorError("embedding_bias: values must be finite")
    out: dict[str, tuple] = {}
    kept = np.flatnonzero(flat != DISALLOWED_BIAS)
    if 0 < kept.size < flat.size:
        out["allowed_token_ids"] = tuple(kept.tolist())
        ids = kept[flat[kept] != 0.0]
    else:
        ids = np.flatnonzero(flat)
    out["logit_bias"] = tuple(zip(ids.tolist(), flat[ids].tolist()))
    return out


def _text(tensors: Mapping[str, np.ndarray], name: str) -> Optional[str]:
    arr = tensors.get(name)
    if arr is None:
        return None
    flat = np.asarray(arr, dtype=object).reshape(-1)
    if flat.size != 1:
        raise EngineTensorError(f"{name}: expected one string, got shape {list(np.shape(arr))}")
    value = flat[0]
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise EngineTensorError(f"{name}: not valid UTF-8") from None


def read_guide(tensors: Mapping[str, np.ndarray]) -> Optional[Guide]:
    """TensorRT-LLM's guided decoding inputs; as its backend, no guide type means no guide."""
    kind = _text(tensors, "guided_decoding_guide_type")
    if not kind:
        return None
    return Guide(kind, _text(tensors, "guided_decoding_guide") or "")


def is_stop(tensors: Mapping[str, np.ndarray]) -> bool:
    return bool(scalar(tensors, "stop", False))


# -- responses ------------------------------------------------------------------------------------


def output_arrays(token_ids: Sequence[int], *, log_probs: Optional[Sequence[float]] = None,
                  cum_log_prob: Optional[float] = None, top_ids: Optional[np.ndarray] = None,
                  top_log_probs: Optional[np.ndarray] = None,
                  sequence_index: Optional[int] = None) -> dict[str, np.ndarray]:
    """Generated tokens (prompt excluded) as TensorRT-LLM outputs: (1, 1, n) and (1, 1); with
    logprobs their log-probabilities (1, 1, n) and the running sum (1, 1); the CPU engine's
    alternatives (n, k) as (1, 1, n, k); the choice index of a num_return_sequences request."""
    n = len(token_ids)
    out = {
        OUTPUT_IDS: np.asarray(token_ids, dtype=np.int32).reshape(1, 1, n),
        SEQUENCE_LENGTH: np.asarray([[n]], dtype=np.int32),
    }
    if log_probs is not None:
        out[OUTPUT_LOG_PROBS] = np.asarray(log_probs, dtype=np.float32).reshape(1, 1, n)
        out[CUM_LOG_PROBS] = np.asarray([[cum_log_prob or 0.0]], dtype=np.float32)
    if top_ids is not None and top_log_probs is not None:
        k = np.shape(top_ids)[-1] if np.size(top_ids) else 0
        out[TOP_LOG_PROB_IDS] = np.asarray(top_ids, dtype=np.int32).reshape(1, 1, n, k)
        out[TOP_LOG_PROBS] = np.asarray(top_log_probs, dtype=np.float32).reshape(1, 1, n, k)
    if sequence_index is not None:
        out[SEQUENCE_INDEX] = np.asarray([[sequence_index]], dtype=np.int32)
    return out


@dataclass(frozen=True)
class EngineResponse:
    """One engine response as llm reads it (any of the optional outputs may be absent)."""

    token_ids: list[int]
    log_probs: Optional[list[float]] = None  # one per token
    top_ids: Optional[list[list[int]]] = None  # per token, best first
    top_log_probs: Optional[list[list[float]]] = None
    sequence_index: int = 0
    # The prompt's log-probabilities (first response, when asked for: CONTEXT_OUTPUTS)
    context_log_probs: Optional[list[float]] = None
    context_top_ids: Optional[list[list[int]]] = None
    context_top_log_probs: Optional[list[list[float]]] = None
    context_ranks: Optional[list[int]] = None
    cached_tokens: Optional[int] = None  # NUM_CACHED_TOKENS (the final response, when asked for)


def _rows(array: np.ndarray, count: int, dtype: Any = None) -> list[list]:
    """The last ``count`` rows of a [..., k] tensor of alternatives: ``count`` empty rows when k is
    0 (no alternatives asked for: there is nothing to tell the rows apart by)."""
    k = np.shape(array)[-1]
    if k == 0 or count == 0:
        return [[] for _ in range(count)]
    return np.asarray(array, dtype=dtype).reshape(-1, k)[-count:].tolist()


def read_response(get: Callable[[str], Optional[np.ndarray]]) -> EngineResponse:
    """An engine response from its output tensors. TensorRT-LLM's streaming responses carry the
    new tokens; their log-probabilities are taken from the end of output_log_probs, so a backend
    that sends the whole history there reads the same."""
    ids = read_output_ids(get(OUTPUT_IDS))
    n = len(ids)
    log_probs = top_ids = top = None
    lp = get(OUTPUT_LOG_PROBS)
    if lp is not None:
        flat = np.asarray(lp, dtype=np.float32).reshape(-1)
        log_probs = flat[flat.size - n:].tolist() if n else []
    t_ids, t_lp = get(TOP_LOG_PROB_IDS), get(TOP_LOG_PROBS)
    if t_ids is not None and t_lp is not None and n:
        top_ids, top = _rows(t_ids, n), _rows(t_lp, n, np.float32)
    index = get(SEQUENCE_INDEX)
    context = context_ids = context_top = ranks = None
    if (c := get(CONTEXT_LOG_PROBS)) is not None:
        context = np.asarray(c, dtype=np.float32).reshape(-1).tolist()
        c_ids, c_lp = get(CONTEXT_TOP_LOG_PROB_IDS), get(CONTEXT_TOP_LOG_PROBS)
        if c_ids is not None and c_lp is not None:
            context_ids, context_top = _rows(c_ids, len(context)), _rows(c_lp, len(context), np.float32)
        if (r := get(CONTEXT_LOG_PROB_RANKS)) is not None:
            ranks = np.asarray(r).reshape(-1).astype(int).tolist()
    cached = get(NUM_CACHED_TOKENS)
    return EngineResponse(ids, log_probs, top_ids, top,
                          int(np.asarray(index).reshape(-1)[0]) if index is not None and np.size(index) else 0,
                          context, context_ids, context_top, ranks,
                          int(np.asarray(cached).reshape(-1)[0]) if cached is not None and np.size(cached) else None)
