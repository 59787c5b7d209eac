"""The ``llm`` model's interfaces and tensors (trident.llm_service is its request loop): its
settings (config parameters), the request and engine-client protocols model.py implements over
Triton, the engine chunks it reads, which engine outputs a request needs, and the tensors of each
response it sends (trident.contract.LLM_OUTPUTS).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional, Protocol

import numpy as np

from .contract import PROMPT_TOKEN_OUTPUTS, TOKEN_OUTPUTS, ModelLimits
from .engine_tensors import (
    CONTEXT_OUTPUTS,
    CPU_ENGINE_OUTPUTS,
    ENGINE_OUTPUTS,
    LOG_PROB_OUTPUTS,
    NUM_CACHED_TOKENS,
    SEQUENCE_INDEX,
    EngineResponse,
    context_logprobs,
)
from .generation import TextGeneration, TokenLogprob
from .sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class LlmSettings:
    """The ``llm`` model's ``config.pbtxt`` parameters."""

    engine_model: str = "tensorrt_llm"
    limits: ModelLimits = ModelLimits()
    max_concurrent: int = 256  # requests streaming from the engine at once (worker threads)
    cancel_check_interval: float = 0.1  # seconds between is_cancelled() polls of one request
    # Engine tokens per streamed response (SGLang's and vLLM's --stream-interval): 1 sends every
    # token as it comes; N sends a choice's first text at once, then every N tokens, so Triton,
    # this model and the gateway handle N times fewer messages.
    stream_interval: int = 1

    def __post_init__(self) -> None:
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1, got {self.stream_interval}")

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "LlmSettings":
        def get(key: str, default: Any, cast: Callable[[str], Any]) -> Any:
            value = params.get(key, "")
            return cast(value) if value != "" else default

        return cls(
            engine_model=get("engine_model", cls.engine_model, str),
            limits=ModelLimits.from_parameters(params),
            max_concurrent=get("max_concurrent_requests", cls.max_concurrent, int),
            cancel_check_interval=get("cancel_check_interval_ms", cls.cancel_check_interval * 1000, float) / 1000,
            stream_interval=get("stream_interval", cls.stream_interval, int),
        )


class Request(Protocol):
    """One ``llm`` request as the service sees it (model.py wraps Triton's)."""

    def input(self, name: str) -> Optional[np.ndarray]: ...

    def wants_admission(self) -> bool: ...

    def cancel_token(self) -> Optional[str]:
        """The token that names this request for a cancel request (trident.contract
        CANCEL_TOKEN_PARAMETER), or None."""

    def cancels(self) -> Optional[str]:
        """For a cancel request (trident.contract CANCEL_PARAMETER): the token of the request
        it ends; None for a generation request."""

    def pings(self) -> bool:
        """True for a liveness ping (trident.contract PING_PARAMETER)."""

    def tokenizer_call(self) -> Optional[str]:
        """"tokenize" or "detokenize" for such a request (trident.contract TOKENIZE_PARAMETER,
        DETOKENIZE_PARAMETER); None for any other."""

    def adds_special_tokens(self) -> bool:
        """For a tokenize request: whether the tokenizer adds its special tokens (default true)."""

    def wants_token_strs(self) -> bool:
        """For a tokenize request: whether the answer holds the ids' vocabulary pieces (default
        false; trident.contract TOKEN_STRS_PARAMETER)."""

    def is_cancelled(self) -> bool: ...

    def send_admission(self, prompt_tokens: int, prompt_ids: Optional[Sequence[int]] = None) -> None:
        """A non-final response without text: accepted, generation pending. It names the server
        and the prompt's token count (known once the prompt is tokenized: Anthropic's stream
        reports it in its first event), and its ids when asked for (return_prompt_token_ids)."""

    def send_pong(self) -> None:
        """The answer to a ping: one final response naming the server, as the admission does, and
        the instance of the model that answered."""

    def send_text(self, text: str, *, index: int = 0, n: int = 1, tokens: Optional[list[TokenLogprob]] = None,
                  counts: Optional[dict[str, int]] = None) -> None:
        """A non-final response holding a text delta of choice ``index`` of ``n`` (with its tokens
        when logprobs were asked for, and NVIDIA's per-response token counts when asked for)."""

    def send_final(self, text: str, gen: TextGeneration, *, tokens: Optional[list[TokenLogprob]] = None,
                   final: bool = True, counts: Optional[dict[str, int]] = None) -> None:
        """A choice's last response: its last text, finish_reason and token counts; ``final``
        (the request's last response) is False for every choice but the last to end."""

    def send_outputs(self, arrays: dict[str, np.ndarray], *, final: bool = True) -> None:
        """One response holding these outputs: a final one (a tokenize or detokenize answer), or
        not (the prompt's log-probabilities, before the text)."""

    def send_error(self, message: str) -> None:
        """A final error response; ``message`` is tagged (trident.errors)."""

    def close(self) -> None:
        """End the response stream without a response (the client is gone)."""


@dataclasses.dataclass
class EngineChunk:
    """One response of the engine model: new token ids (with their log-probabilities when asked
    for, and the choice they belong to), or an error message. ``final``: the engine's final
    response (its last tokens, when it carries any: nothing follows)."""

    token_ids: Sequence[int] = ()
    error: Optional[str] = None
    log_probs: Optional[Sequence[float]] = None
    top_ids: Optional[Sequence[Sequence[int]]] = None
    top_log_probs: Optional[Sequence[Sequence[float]]] = None
    sequence_index: int = 0
    final: bool = False
    # In the first response of a request that asked for them: the prompt's log-probabilities
    # (NaN for the first token) and alternatives per prompt position (ids below 0: none)
    context_log_probs: Optional[Sequence[float]] = None
    context_top_ids: Optional[Sequence[Sequence[int]]] = None
    context_top_log_probs: Optional[Sequence[Sequence[float]]] = None
    context_ranks: Optional[Sequence[int]] = None  # each prompt token's rank at its position (0 at 0)
    # In the request's final response, when asked for (feature cached_tokens): prompt tokens the
    # engine took from its prefix cache
    cached_tokens: Optional[int] = None

    @classmethod
    def of(cls, out: EngineResponse, *, final: bool = False) -> "EngineChunk":
        """The chunk of an engine response read by trident.engine_tensors.read_response."""
        return cls(token_ids=out.token_ids, log_probs=out.log_probs, top_ids=out.top_ids,
                   top_log_probs=out.top_log_probs, sequence_index=out.sequence_index, final=final,
                   context_log_probs=out.context_log_probs, context_top_ids=out.context_top_ids,
                   context_top_log_probs=out.context_top_log_probs, context_ranks=out.context_ranks,
                   cached_tokens=out.cached_tokens)


class EngineClient(Protocol):
    def stream(self, tensors: dict[str, np.ndarray], engine_id: str, outputs: Sequence[str] = ENGINE_OUTPUTS
               ) -> Iterable[EngineChunk]:
        """Submit one engine request and iterate its responses up to the final one; ``outputs``
        are the engine outputs to ask for (:func:`engine_outputs`)."""

    def stop(self, engine_id: str) -> None:
        """Stop the engine request with this id (queued or running); returns once sent."""


class EngineFailure(Exception):
    """The engine model answered with an error; its message is passed on unchanged."""


def engine_outputs(sampling: SamplingParams, *, cached_tokens: bool = False) -> tuple[str, ...]:
    """The engine outputs a request needs: log-probabilities, alternatives (CPU engine), the
    choice index, only when it asked for them; ``cached_tokens``: the prefix cache's share of
    the prompt (an engine with that feature)."""
    outputs = ENGINE_OUTPUTS + ((NUM_CACHED_TOKENS,) if cached_tokens else ())
    if sampling.logprobs is not None:
        outputs += LOG_PROB_OUTPUTS
        if sampling.logprobs:
            outputs += CPU_ENGINE_OUTPUTS
    if context_logprobs(sampling) is not None:
        outputs += CONTEXT_OUTPUTS  # the prompt's log-probabilities, in the first response
    if sampling.n > 1:
        outputs += (SEQUENCE_INDEX,)
    return outputs


def prompt_logprob_tensors(ids: Sequence[int], chunk: EngineChunk, k: int,
                           token_text: Callable[[int], str]) -> dict[str, np.ndarray]:
    """The response of num_prompt_log_probs ``k`` (trident.contract PROMPT_TOKEN_OUTPUTS and
    prompt_log_prob_ranks): the prompt's ids (as the engine got them), each one's text decoded
    alone, its log-probability and rank (from the engine's first response, ``chunk``), and the
    ``k`` best tokens at each position."""
    L = len(ids)
    ranks = chunk.context_ranks
    if chunk.context_log_probs is None or ranks is None or not len(chunk.context_log_probs) == len(ranks) == L:
        raise EngineFailure("the engine sent no log-probabilities and ranks of the prompt (prompt_logprobs)")
    rows = zip(chunk.context_top_ids or [()] * L, chunk.context_top_log_probs or [()] * L) if k else [((), ())] * L
    tokens = []
    for token, logprob, (row_ids, row_lps) in zip(ids, chunk.context_log_probs, rows):
        best = [(int(t), float(lp)) for t, lp in zip(row_ids[:k], row_lps[:k]) if t >= 0]
        tokens.append(TokenLogprob(token_text(int(token)), int(token), float(logprob),
                                   tuple((token_text(t), lp) for t, lp in best), tuple(t for t, _ in best)))
    out = dict(zip(PROMPT_TOKEN_OUTPUTS, token_arrays(tokens, k)))
    out["prompt_log_prob_ranks"] = np.asarray(ranks, dtype=np.int32).reshape(1, L)
    return out


def token_arrays(tokens: Sequence[TokenLogprob], k: int) -> tuple[np.ndarray, ...]:
    """Tokens as the tensors of trident.contract TOKEN_OUTPUTS (or PROMPT_TOKEN_OUTPUTS), batch
    dimension included: texts, ids, log-probabilities [1, n], and ``k`` alternatives each
    [1, n, k] (texts, log-probabilities, ids; best first; "" / -inf / -1 past a shorter row)."""
    n = len(tokens)
    texts = np.full((1, n, k), b"", dtype=np.object_)
    values = np.full((1, n, k), -np.inf, dtype=np.float32)
    alternatives = np.full((1, n, k), -1, dtype=np.int32)
    for i, token in enumerate(tokens):
        for j, (alt, logprob) in enumerate(token.top):
            texts[0, i, j] = alt.encode("utf-8")
            values[0, i, j] = logprob
        alternatives[0, i, :len(token.top_ids)] = token.top_ids
    return (np.array([t.text.encode("utf-8") for t in tokens], dtype=np.object_).reshape(1, n),
            np.array([t.id for t in tokens], dtype=np.int32).reshape(1, n),
            np.array([t.logprob for t in tokens], dtype=np.float32).reshape(1, n),
            texts, values, alternatives)


def output_tensors(text: str, *, index: int = 0, tokens: Optional[list[TokenLogprob]] = None,
                   gen: Optional[TextGeneration] = None, n: int = 1,
                   counts: Optional[dict[str, int]] = None) -> dict[str, np.ndarray]:
    """One llm response's tensors (trident.contract.LLM_OUTPUTS), each with the batch dimension:
    the text; the choice index with several choices; the tokens of the text with logprobs; and on
    a choice's last response (``gen``) its finish_reason, token counts (cached_tokens when the
    engine reported them) and cum_log_probs. ``counts``: NVIDIA's num_input_tokens /
    num_output_tokens of this response, those asked for."""
    out = {"text_output": np.array([[text.encode("utf-8")]], dtype=np.object_)}
    for name, value in (counts or {}).items():
        out[name] = np.array([[value]], dtype=np.int32)
    if n > 1:
        out["sequence_index"] = np.array([[index]], dtype=np.int32)
    if tokens is not None:
        k = max((len(t.top) for t in tokens), default=0)
        arrays = token_arrays(tokens, k)
        out.update(zip(TOKEN_OUTPUTS, arrays if k else arrays[:3]))  # the alternatives when asked for
    if gen is not None:
        out["finish_reason"] = np.array([[gen.finish_reason.encode()]], dtype=np.object_)
        out["prompt_tokens"] = np.array([[gen.prompt_tokens]], dtype=np.int32)
        out["completion_tokens"] = np.array([[gen.completion_tokens]], dtype=np.int32)
        if gen.cached_tokens is not None:
            out["cached_tokens"] = np.array([[gen.cached_tokens]], dtype=np.int32)
        if gen.logprobs:
            out["cum_log_probs"] = np.array([[gen.cum_logprob]], dtype=np.float32)
        stop = gen.stop_reason
        if isinstance(stop, str):
            out["stop_sequence"] = np.array([[stop.encode("utf-8")]], dtype=np.object_)
        elif stop is not None:
            out["stop_token_id"] = np.array([[stop]], dtype=np.int32)
    return out
