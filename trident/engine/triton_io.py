"""TensorRT-LLM-style Triton tensors -> the engine's request, on the engine's side.

The interface itself (names, dtypes, the word-list format, TensorRT-LLM's sampling semantics,
the outputs) is trident.engine_tensors, which the ``llm`` model encodes with; this module only
builds a :class:`GenerationRequest` from it and tags errors. Each tensor may arrive with the
leading batch dimension of 1 the clients send (e.g. input_ids [1, T]) or without it (scalars
reshaped to [] by config.pbtxt). No Triton import (unit-testable).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from trident.contract import SERVER_ERROR, beam_width_error, tag_error
from trident.engine_tensors import (
    CONTEXT_LOG_PROB_RANKS,
    CONTEXT_LOG_PROBS,
    CONTEXT_TOP_LOG_PROB_IDS,
    CONTEXT_TOP_LOG_PROBS,
    NUM_CACHED_TOKENS,
    EngineTensorError,
    batch_row,
    decode_words_list,
    is_stop,
    output_arrays,
    read_sampling,
    scalar,
)

from .request import GenerationOutput, GenerationRequest, InvalidRequestError

__all__ = ["METRICS", "decode_word_list", "error_message", "is_stop_request", "output_arrays", "request_from_tensors",
           "response_arrays"]

is_stop_request = is_stop


def decode_word_list(arr: np.ndarray, name: str = "stop_words_list") -> list[list[int]]:
    try:
        return decode_words_list(arr, name)
    except EngineTensorError as exc:
        raise InvalidRequestError(str(exc)) from None


def request_from_tensors(request_id: str, tensors: Mapping[str, np.ndarray], *,
                         exclude_input: bool = True) -> GenerationRequest:
    """Build the engine request; raises InvalidRequestError naming the offending tensor.
    ``exclude_input``: the model's ``exclude_input_in_output`` parameter, which the request's
    input of that name overrides (TensorRT-LLM's backend does the same)."""
    if "input_ids" not in tensors or "request_output_len" not in tensors:
        raise InvalidRequestError("input_ids and request_output_len are required")
    try:
        if (trouble := beam_width_error(scalar(tensors, "beam_width"))) is not None:
            raise InvalidRequestError(trouble, param="beam_width")
        streaming = bool(scalar(tensors, "streaming", False))
        input_ids = batch_row("input_ids", tensors["input_ids"], 1).astype(np.int64).tolist()
        length = scalar(tensors, "input_lengths")
        if length is not None:
            if not 0 < length <= len(input_ids):
                raise InvalidRequestError(f"input_lengths {length} does not match input_ids ({len(input_ids)} ids)")
            input_ids = input_ids[:length]
        end_id = scalar(tensors, "end_id")
        words = {name: decode_words_list(tensors[name], name) if name in tensors else []
                 for name in ("stop_words_list", "bad_words_list")}
        return GenerationRequest(
            request_id=request_id,
            input_ids=input_ids,
            sampling=read_sampling(tensors),
            end_id=None if end_id is None or end_id < 0 else int(end_id),
            pad_id=scalar(tensors, "pad_id"),
            stop_words=words["stop_words_list"],
            bad_words=words["bad_words_list"],
            streaming=streaming,
            # streaming outputs never repeat the prompt (TensorRT-LLM's either)
            include_input=not streaming and not bool(scalar(tensors, "exclude_input_in_output", exclude_input)),
            context_logprobs=_context_logprobs(tensors),
            report_cached=bool(scalar(tensors, "return_num_cached_tokens", False)),
            min_tokens_stops=_id_list(tensors, "min_tokens_stop_ids"),
            cache_salt_id=_salt(tensors),
            priority=_integer(tensors, "priority") or 0,
        )
    except EngineTensorError as exc:
        raise InvalidRequestError(str(exc)) from None


def _id_list(tensors: Mapping[str, np.ndarray], name: str) -> tuple[int, ...]:
    """A (1, K) or (K,) integer tensor of token ids; () when absent."""
    arr = tensors.get(name)
    if arr is None:
        return ()
    if not np.issubdtype(np.asarray(arr).dtype, np.integer):
        raise InvalidRequestError(f"{name} must be an integer tensor, got {np.asarray(arr).dtype}", param=name)
    return tuple(int(t) for t in batch_row(name, arr, 1).tolist())


def _context_logprobs(tensors: Mapping[str, np.ndarray]) -> int | None:
    """num_context_log_probs: k, or None when absent or negative (off). Range: the engine's check."""
    k = _integer(tensors, "num_context_log_probs")
    return None if k is None or k < 0 else k


def _salt(tensors: Mapping[str, np.ndarray]) -> int | None:
    """cache_salt_id: an unsigned 64-bit integer, or None when absent."""
    salt = _integer(tensors, "cache_salt_id")
    return None if salt is None else salt & (2**64 - 1)


def _integer(tensors: Mapping[str, np.ndarray], name: str) -> int | None:
    """One value of an integer tensor, or None when absent."""
    arr = tensors.get(name)
    if arr is None:
        return None
    if not np.issubdtype(np.asarray(arr).dtype, np.integer):
        raise InvalidRequestError(f"{name} must be an integer tensor, got {np.asarray(arr).dtype}", param=name)
    return int(scalar(tensors, name))


def response_arrays(out: GenerationOutput) -> dict[str, np.ndarray]:
    """An output's tensors: output_ids and sequence_length always; log-probabilities,
    alternatives and the sequence index only when the request asked for them (a plain request's
    responses are exactly what they were before these existed); the prompt's log-probabilities
    on the one output that carries them (the request's first)."""
    top = out.top_ids is not None
    arrays = output_arrays(out.token_ids, log_probs=out.log_probs, cum_log_prob=out.cum_log_prob,
                           top_ids=_rows(out.top_ids, np.int32) if top else None,
                           top_log_probs=_rows(out.top_log_probs, np.float32) if top else None,
                           sequence_index=out.sequence_index)
    if out.cached_tokens is not None:
        arrays[NUM_CACHED_TOKENS] = np.array([[out.cached_tokens]], dtype=np.int32)
    if out.context_log_probs is not None:
        L, k = out.context_top_ids.shape
        arrays[CONTEXT_LOG_PROBS] = np.asarray(out.context_log_probs, dtype=np.float32).reshape(1, 1, L)
        arrays[CONTEXT_TOP_LOG_PROBS] = np.asarray(out.context_top_log_probs, dtype=np.float32).reshape(1, 1, L, k)
        arrays[CONTEXT_TOP_LOG_PROB_IDS] = np.asarray(out.context_top_ids, dtype=np.int32).reshape(1, 1, L, k)
        arrays[CONTEXT_LOG_PROB_RANKS] = np.asarray(out.context_ranks, dtype=np.int32).reshape(1, 1, L)
    return arrays


def _rows(rows: list[list], dtype) -> np.ndarray:
    """(n, k) from n lists of k (n may be 0: the sequence's last output can carry no token)."""
    k = len(rows[0]) if rows else 0
    return np.asarray(rows, dtype=dtype).reshape(len(rows), k)


def error_message(error_type: str | None, message: str | None, param: str | None = None) -> str:
    """The adapter's error text: a contract tag the gateway maps to a status (naming the request
    field at fault when known), then the reason."""
    try:
        return tag_error(error_type or SERVER_ERROR, message or "unknown error", param)
    except ValueError:  # not a contract kind: a server error
        return tag_error(SERVER_ERROR, message or "unknown error")


# Engine counters published on Triton's metrics port (Prometheus), next to Triton's own.
# (metric name, kind, description, key of Engine.stats()); counters before gauges so that a
# scrape that sees a request cancelled also sees every token generated before it.
METRICS = (
    ("trident_engine_generated_tokens_total", "COUNTER", "tokens generated by the CPU engine", "tokens_generated"),
    ("trident_engine_decode_steps_total", "COUNTER", "batched decode steps run", "steps"),
    ("trident_engine_requests_prefilled_total", "COUNTER", "requests that reached prefill (got a slot)",
     "requests_prefilled"),
    ("trident_engine_requests_finished_total", "COUNTER", "requests that got their final output", "requests_finished"),
    ("trident_engine_requests_cancelled_total", "COUNTER", "requests cancelled (client gone or stop)", "requests_cancelled"),
    ("trident_engine_prompt_tokens_prefilled_total", "COUNTER",
     "prompt tokens the model computed (once per request, whatever its num_return_sequences)",
     "prompt_tokens_prefilled"),
    ("trident_engine_prefix_cache_hit_tokens_total", "COUNTER", "prompt tokens taken from the prefix cache (int4)",
     "prefix_cache_hit_tokens"),
    ("trident_engine_prefix_cache_miss_tokens_total", "COUNTER", "prompt tokens not found in the prefix cache (int4)",
     "prefix_cache_miss_tokens"),
    ("trident_engine_prefix_cache_hit_requests_total", "COUNTER", "requests that reused a cached prefix (int4)",
     "prefix_cache_hit_requests"),
    ("trident_engine_prefix_cache_miss_requests_total", "COUNTER", "requests that found no cached prefix (int4)",
     "prefix_cache_miss_requests"),
    ("trident_engine_prefix_cache_evicted_blocks_total", "COUNTER", "cached KV blocks evicted (int4)",
     "prefix_cache_evicted"),
    ("trident_engine_active_requests", "GAUGE", "sequences in the running batch", "active"),
    ("trident_engine_waiting_requests", "GAUGE", "requests queued for a batch slot", "waiting"),
    ("trident_engine_prefix_cache_blocks", "GAUGE", "KV blocks cached for reuse, held by no sequence (int4)",
     "prefix_cache_blocks"),
    ("trident_engine_kv_blocks_free", "GAUGE", "KV blocks free or cached (int4)", "kv_blocks_free"),
    ("trident_engine_kv_blocks_total", "GAUGE", "KV blocks in the paged cache (int4)", "kv_blocks_total"),
    ("trident_engine_guide_cache_bytes", "GAUGE", "compiled guides kept for reuse (at most guide_cache_mb)",
     "guide_cache_bytes"),
)
