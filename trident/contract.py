"""The contract between the gateway and Triton's ``llm`` / ``ensemble`` models, defined once.

Both sides import this module (it needs only numpy): the gateway encodes a request with
:func:`llm_inputs` and reads errors with :func:`parse_error`; the ``llm`` model reads the
request with :func:`read_llm_inputs`, validates it with :meth:`SamplingParams.check` against
:class:`ModelLimits`, and tags its errors with :func:`tag_error`. So the tensor names and dtypes,
the sampling defaults, the finish reasons, the error tags and the limits are written here and
nowhere else (docs/architecture.md lists where each concern lives).

A request has these shapes between the HTTP body and the engine's sampler:

1. the JSON body (validated by the gateway's schemas),
2. :class:`TextRequest` with its :class:`SamplingParams` (the gateway builds it; the ``llm``
   model rebuilds the same object from the tensors, with the same defaults),
3. the ``llm`` tensors (:data:`LLM_INPUTS`), on the wire between the two,
4. the engine's tensors (TensorRT-LLM's names, ``trident.engine_tensors``) from ``llm`` to the
   engine, which the CPU engine reads back into the same :class:`SamplingParams`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np

from .error_tags import *  # noqa: F401,F403 (part of the contract)
from .error_tags import InvalidRequest
from .sampling_params import *  # noqa: F401,F403 (part of the contract)
from .sampling_params import Guide, SamplingParams, beam_width_error

# -- the llm / ensemble tensors -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: Any  # numpy dtype of the values (BYTES tensors: np.object_ of bytes)
    optional: bool = True
    many: bool = False  # dims [-1] (a list), else [1]
    matrix: bool = False  # dims [-1, -1]

    @property
    def dims(self) -> tuple[int, ...]:
        """The dims in config.pbtxt (after the batch dimension)."""
        return (-1, -1) if self.matrix else (-1,) if self.many else (1,)


#: Inputs of ``llm`` and ``ensemble``, the names of NVIDIA's TensorRT-LLM ensemble.
LLM_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_input", np.object_, optional=False),
    TensorSpec("max_tokens", np.int32, optional=False),
    TensorSpec("stop_words", np.object_, many=True),
    TensorSpec("bad_words", np.object_, many=True),
    TensorSpec("end_id", np.int32),
    TensorSpec("pad_id", np.int32),
    TensorSpec("top_k", np.int32),
    TensorSpec("top_p", np.float32),
    TensorSpec("temperature", np.float32),
    TensorSpec("repetition_penalty", np.float32),
    TensorSpec("seed", np.uint64),
    TensorSpec("random_seed", np.uint64),  # the older name of seed in NVIDIA's ensemble
    TensorSpec("stream", np.bool_),
    # Output controls (issue 15); NVIDIA's ensemble names where it has the input.
    TensorSpec("num_return_sequences", np.int32),
    TensorSpec("min_tokens", np.int32),
    TensorSpec("presence_penalty", np.float32),
    TensorSpec("frequency_penalty", np.float32),
    TensorSpec("return_log_probs", np.bool_),
    TensorSpec("guided_decoding_guide_type", np.object_),
    TensorSpec("guided_decoding_guide", np.object_),
    # trident extensions: alternatives per token (0..20), min-p, logit bias by token id
    TensorSpec("num_top_log_probs", np.int32),
    TensorSpec("min_p", np.float32),
    TensorSpec("logit_bias_ids", np.int32, many=True),
    TensorSpec("logit_bias_values", np.float32, many=True),
    # NVIDIA's clients send these two on every request (its end_to_end_grpc_client.py): beam
    # search is not served (the engines are built with max_beam_width 1), so only beam_width 1;
    # exclude_input_in_output false puts the prompt in front of a non-streaming text_output, as
    # NVIDIA's ensemble does (streaming: never; absent: not, unlike NVIDIA's default).
    TensorSpec("beam_width", np.int32),
    TensorSpec("exclude_input_in_output", np.bool_),
    # trident extension: the prompt as token ids, used as given (not tokenized); text_input is
    # then empty. /v1/completions' prompt of token ids, as vLLM's and llama.cpp's.
    TensorSpec("input_ids", np.int32, many=True),
    # trident extension: OpenAI's echo. The prompt is in front of the text, streamed or not; with
    # return_log_probs its tokens come first in the token outputs, each with its log-probability
    # (NaN for the first token, which has none) and alternatives (CPU engine).
    TensorSpec("echo", np.bool_),
    # trident extensions, vLLM's names: token ids that end a choice as a stop sequence does
    # (finish_reason stop), and whether the stop (sequence or token) stays in the text.
    TensorSpec("stop_token_ids", np.int32, many=True),
    TensorSpec("include_stop_str_in_output", np.bool_),
    # trident extension, vLLM's name: the end tokens never end a choice (stop sequences and
    # stop_token_ids still do)
    TensorSpec("ignore_eos", np.bool_),
    # trident extension, vLLM's name: false keeps the tokenizer's special tokens in the text
    # (default true: left out, as both vLLM and NVIDIA's postprocessing do).
    TensorSpec("skip_special_tokens", np.bool_),
    # NVIDIA's ensemble (and its tensorrt_llm backend): token counts on every response, as Triton's
    # OpenAI-compatible frontend asks for them on every request to a TensorRT-LLM model
    # (num_input_tokens: the prompt's; num_output_tokens: the tokens this response adds).
    TensorSpec("return_num_input_tokens", np.bool_),
    TensorSpec("return_num_output_tokens", np.bool_),
    # trident extensions, vLLM's names: only these token ids can be generated; keep only the
    # prompt's last k tokens (-1: as many as fit the context with max_tokens).
    TensorSpec("allowed_token_ids", np.int32, many=True),
    TensorSpec("truncate_prompt_tokens", np.int32),
    # trident extension (vLLM's return_token_ids answers with them): the ids the engine got for
    # the prompt (after truncate_prompt_tokens), prompt_token_ids, in a first response without
    # text, with prompt_tokens (the admission response, when the caller asked for that too).
    TensorSpec("return_prompt_token_ids", np.bool_),
    # trident extension (vLLM's prompt_logprobs; CPU engine): k (0..20). A response without text,
    # before any text, holds the prompt's tokens: prompt_token_ids, their texts, log-probabilities
    # and ranks, and the k best tokens at each position (the prompt_* outputs).
    TensorSpec("num_prompt_log_probs", np.int32),
    # trident extension (vLLM's add_special_tokens): false tokenizes text_input without the
    # tokenizer's special tokens (a BOS its post-processor adds): a prompt rendered by a chat
    # template already has them. Absent: true (transformers' default, NVIDIA's preprocessing).
    TensorSpec("add_special_tokens", np.bool_),
    # trident extension, vLLM's name (CPU engine): the prompt's K/V are reused only by requests
    # with the same salt (the engine gets it as cache_salt_id, TensorRT-LLM's executor's name).
    TensorSpec("cache_salt", np.object_),
    # trident extension, vLLM's name and meaning (CPU engine): the engine admits waiting requests
    # the lower values first, then in arrival order; absent: 0 (first come, first served).
    TensorSpec("priority", np.int32),
)
#: Outputs: text on every response; the counts and finish_reason on the final one (prompt_tokens
#: also on the admission response, which the gateway asks for).
LLM_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_output", np.object_, optional=False),
    TensorSpec("finish_reason", np.object_),
    TensorSpec("prompt_tokens", np.int32),
    TensorSpec("completion_tokens", np.int32),
    TensorSpec("server", np.object_),  # on the admission response (with prompt_tokens): which Triton took the request
    TensorSpec("instance", np.object_),  # on a ping's answer: which instance of llm answered it
    # With num_return_sequences > 1: the choice a response belongs to (absent: 0). Each choice
    # ends with its own response carrying finish_reason and its completion_tokens.
    TensorSpec("sequence_index", np.int32),
    # With return_log_probs, per response, one entry per token of its text_output: the token's
    # text (the texts concatenate to text_output), id and log-probability; with
    # num_top_log_probs k > 0 also [tokens, k] alternatives (texts, log-probabilities and ids,
    # best first; a row with fewer: texts "", log-probabilities -inf, ids -1). On a choice's last
    # response, cum_log_probs: the sum over its returned tokens.
    TensorSpec("output_token_texts", np.object_, many=True),
    TensorSpec("output_token_ids", np.int32, many=True),
    TensorSpec("output_log_probs", np.float32, many=True),
    TensorSpec("top_log_prob_texts", np.object_, matrix=True),
    TensorSpec("top_log_probs", np.float32, matrix=True),
    TensorSpec("top_log_prob_ids", np.int32, matrix=True),
    TensorSpec("cum_log_probs", np.float32),
    # On a choice's last response, when a stop ended it (vLLM's stop_reason): the stop sequence it
    # matched, or the stop token (one of stop_token_ids, or an end token of the model's other than
    # end_id); neither when the end id or max_tokens ended it.
    TensorSpec("stop_sequence", np.object_),
    TensorSpec("stop_token_id", np.int32),
    # On a choice's last response, when the engine reports it (feature cached_tokens, the CPU
    # engine): how many of the prompt's tokens came from the engine's prefix cache (OpenAI's
    # usage.prompt_tokens_details.cached_tokens).
    TensorSpec("cached_tokens", np.int32),
    # With return_num_input_tokens / return_num_output_tokens, on every text response (NVIDIA's
    # names and meaning): the prompt's token count, and how many generated tokens this response
    # accounts for (a choice's responses add up to its completion_tokens).
    TensorSpec("num_input_tokens", np.int32),
    TensorSpec("num_output_tokens", np.int32),
    # With return_prompt_token_ids, on the first response (no text; with prompt_tokens and server,
    # the admission response): the ids the engine got for the prompt.
    TensorSpec("prompt_token_ids", np.int32, many=True),
    # With num_prompt_log_probs k, on a response without text before any text (with
    # prompt_token_ids): per prompt token, its text (decoded alone), log-probability given the
    # tokens before it (NaN for the first) and rank there (1: the most likely; 0 for the first),
    # and [tokens, k] alternatives (texts, log-probabilities, ids; best first; row 0 empty: "",
    # -inf, -1).
    TensorSpec("prompt_token_texts", np.object_, many=True),
    TensorSpec("prompt_log_probs", np.float32, many=True),
    TensorSpec("prompt_log_prob_ranks", np.int32, many=True),
    TensorSpec("prompt_top_log_prob_texts", np.object_, matrix=True),
    TensorSpec("prompt_top_log_probs", np.float32, matrix=True),
    TensorSpec("prompt_top_log_prob_ids", np.int32, matrix=True),
    # On a tokenize answer with TOKEN_STRS_PARAMETER: each id's piece of the vocabulary.
    TensorSpec("token_strs", np.object_, many=True),
)

#: The outputs that carry tokens (texts, ids, log-probabilities, and the alternatives' texts,
#: log-probabilities and ids), in that order: a response's generated ones, and the prompt's
#: (num_prompt_log_probs). The llm model writes them (trident.llm_io), the gateway reads them.
TOKEN_OUTPUTS = ("output_token_texts", "output_token_ids", "output_log_probs", "top_log_prob_texts", "top_log_probs",
                 "top_log_prob_ids")
PROMPT_TOKEN_OUTPUTS = ("prompt_token_texts", "prompt_token_ids", "prompt_log_probs", "prompt_top_log_prob_texts",
                        "prompt_top_log_probs", "prompt_top_log_prob_ids")

#: Environment variable naming a Triton server (``host:grpc port`` by default, set by the
#: launchers); the ``llm`` model puts it in its admission response, the gateway in its metrics
#: and logs.
SERVER_ID_ENV = "TRIDENT_SERVER_ID"
#: Environment variable: ``host:port`` of the Triton gRPC endpoint through which the ``llm``
#: model streams from the engine model (trident.engine_grpc); the launchers set it to their own
#: server's gRPC port.
ENGINE_GRPC_ENV = "TRIDENT_ENGINE_GRPC_URL"

#: Request parameter (bool) of the ``llm`` model: send one empty response as soon as the request
#: is validated and queued, before any text. The gateway asks for it so that a streaming client
#: gets its HTTP 200 and SSE heartbeats while the request waits for the engine, and every
#: validation error still arrives before that as an HTTP status.
ADMISSION_PARAMETER = "trident_admission_ack"

#: Request parameter (string) of the ``llm`` model: a token naming this request for
#: :data:`CANCEL_PARAMETER`. The gateway sets a random one on every request.
CANCEL_TOKEN_PARAMETER = "trident_cancel_token"
#: Request parameter (string) of the ``llm`` model: this request only ends the request whose
#: :data:`CANCEL_TOKEN_PARAMETER` it names (its client is gone), and gets an empty final
#: response. That request ends with an empty final response too, so its gRPC call ends without
#: a cancellation: Triton 2.51's gRPC endpoint can deadlock when a client cancels a stream while
#: a response of it is being written (docs/architecture.md). Its inputs are ignored (the
#: required ones must be present: an empty ``text_input`` and ``max_tokens``).
CANCEL_PARAMETER = "trident_cancel"
#: Request parameter (bool) of the ``llm`` model: a liveness ping (trident.stream_probe). The
#: model answers it at once, on the thread that accepts requests, with one final response naming
#: its server (``server``, as in the admission response) and the instance of the model that
#: answered (``instance``); nothing reaches the engine, so the answer comes under any load. It
#: shows that Triton's streaming endpoint and the model's stub answer, which Triton's HTTP health
#: endpoints do not (docs/operations.md). Its inputs are ignored (the required ones must be
#: present, as for :data:`CANCEL_PARAMETER`).
PING_PARAMETER = "trident_ping"
#: Request parameter (bool) of the ``llm`` model: this request only tokenizes its ``text_input``
#: with the model's tokenizer (the ids a generation of that prompt is given; special tokens
#: unless :data:`ADD_SPECIAL_TOKENS_PARAMETER` is false) and gets one final response: the ids in
#: ``output_token_ids``, their count in ``prompt_tokens``. The gateway's ``/tokenize``. Answered,
#: as a ping, on the thread that accepts requests; nothing reaches the engine.
TOKENIZE_PARAMETER = "trident_tokenize"
#: Request parameter (bool) of a :data:`TOKENIZE_PARAMETER` request; absent: true.
ADD_SPECIAL_TOKENS_PARAMETER = "trident_add_special_tokens"
#: Request parameter (bool) of a :data:`TOKENIZE_PARAMETER` request: the answer also holds each
#: id's piece of the vocabulary (the tokenizer's ``convert_ids_to_tokens``) in ``token_strs``
#: (vLLM's /tokenize ``return_token_strs``); absent: false.
TOKEN_STRS_PARAMETER = "trident_token_strs"
#: Request parameter (bool) of the ``llm`` model: this request only turns its ``input_ids`` into
#: text (special tokens included) and gets one final response: the text in ``text_output``, the
#: ids' count in ``prompt_tokens``. The gateway's ``/detokenize``; answered as a ping is.
DETOKENIZE_PARAMETER = "trident_detokenize"


def control_inputs() -> dict[str, np.ndarray]:
    """The inputs Triton requires of every ``llm`` request, for one that only controls (a cancel
    request, a ping): an empty ``text_input`` and a ``max_tokens``, which the model ignores."""
    return {"text_input": np.array([[b""]], dtype=np.object_), "max_tokens": np.array([[1]], dtype=np.int32)}

# -- finish reasons -----------------------------------------------------------------------------

FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_STOP = "stop_sequence"  # a stop sequence was generated
FINISH_EOS = "eos_token"  # the model ended
FINISH_REASONS = (FINISH_LENGTH, FINISH_STOP, FINISH_EOS)


def finish_reason(*, stopped: bool, completion_tokens: int, max_new_tokens: int) -> str:
    """Why a generation ended, from what every engine reports (the tokens it made; TensorRT-LLM's
    backend has no finish-reason output): a stop sequence, the token budget, or else the end id."""
    if stopped:
        return FINISH_STOP
    return FINISH_LENGTH if completion_tokens >= max_new_tokens else FINISH_EOS



@dataclasses.dataclass(frozen=True, slots=True)
class TextRequest:
    """One generation request at the text level: what the gateway sends and ``llm`` receives."""

    prompt: str = dataclasses.field(repr=False)  # never in logs
    sampling: SamplingParams = SamplingParams()
    stream: bool = False
    model: str = ""  # the public model name (gateway side); not sent to Triton
    end_id: Optional[int] = None  # NVIDIA ensemble overrides of the tokenizer's ids
    pad_id: Optional[int] = None
    # A non-streaming request's text_output starts with the prompt (NVIDIA's ensemble with
    # exclude_input_in_output false); direct gRPC clients only, the gateway never asks for it.
    include_prompt: bool = False
    # The prompt as token ids, used as they are (``prompt`` is then ""); None: ``prompt`` is text.
    prompt_ids: Optional[tuple[int, ...]] = dataclasses.field(default=None, repr=False)
    # NVIDIA's token counts on every response (num_input_tokens / num_output_tokens); direct
    # gRPC clients only (Triton's OpenAI frontend), the gateway reads completion_tokens.
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    # The prompt's ids (after truncation) in a first response without text (return_prompt_token_ids).
    return_prompt_token_ids: bool = False
    # Tokenize the prompt text with the tokenizer's special tokens (false: a chat template's
    # rendering, which holds them already; vLLM's add_special_tokens).
    add_special_tokens: bool = True

    def with_prompt(self, prompt: "str | tuple[int, ...]") -> "TextRequest":
        """This request with another prompt: a text, or token ids."""
        if isinstance(prompt, str):
            return dataclasses.replace(self, prompt=prompt, prompt_ids=None)
        return dataclasses.replace(self, prompt="", prompt_ids=tuple(prompt))


# -- the llm tensors: encoding (gateway) and decoding (llm) ------------------------------------------


def _one(value: Any, dtype: Any) -> np.ndarray:
    return np.array([[value]], dtype=dtype)  # [1, 1]: the batch dimension, then the value


def _strings(values: tuple[str, ...]) -> np.ndarray:
    return np.array([[v.encode("utf-8") for v in values]], dtype=np.object_)  # [1, N]


def llm_inputs(req: TextRequest) -> dict[str, np.ndarray]:
    """The inputs of Triton model ``llm`` for ``req`` (each of shape [1, ...]). Every sampling
    value is sent explicitly, so the model applies exactly the gateway's values; lists only when
    non-empty, ``seed`` only when set."""
    s = req.sampling
    values = {
        "text_input": _strings((req.prompt,)),  # "" with input_ids
        "input_ids": None if req.prompt_ids is None else np.array([req.prompt_ids], dtype=np.int32),
        "max_tokens": _one(s.max_new_tokens, np.int32),
        "stop_words": _strings(s.stop) if s.stop else None,
        "bad_words": _strings(s.bad_words) if s.bad_words else None,
        "end_id": None if req.end_id is None else _one(req.end_id, np.int32),
        "pad_id": None if req.pad_id is None else _one(req.pad_id, np.int32),
        "temperature": _one(s.temperature, np.float32),
        "top_p": _one(s.top_p, np.float32),
        "top_k": _one(s.top_k, np.int32),
        "repetition_penalty": _one(s.repetition_penalty, np.float32),
        "seed": None if s.seed is None else _one(s.seed, np.uint64),
        "stream": _one(req.stream, np.bool_),
        "exclude_input_in_output": _one(False, np.bool_) if req.include_prompt else None,
    }
    # Output controls only when they differ from the defaults (the common request stays small).
    if s.n != 1:
        values["num_return_sequences"] = _one(s.n, np.int32)
    if s.min_tokens:
        values["min_tokens"] = _one(s.min_tokens, np.int32)
    if s.presence_penalty:
        values["presence_penalty"] = _one(s.presence_penalty, np.float32)
    if s.frequency_penalty:
        values["frequency_penalty"] = _one(s.frequency_penalty, np.float32)
    if s.min_p:
        values["min_p"] = _one(s.min_p, np.float32)
    if s.logit_bias:
        values["logit_bias_ids"] = np.array([[t for t, _ in s.logit_bias]], dtype=np.int32)
        values["logit_bias_values"] = np.array([[b for _, b in s.logit_bias]], dtype=np.float32)
    if s.logprobs is not None:
        values["return_log_probs"] = _one(True, np.bool_)
        values["num_top_log_probs"] = _one(s.logprobs, np.int32)
    if s.guide is not None:
        values["guided_decoding_guide_type"] = _strings((s.guide.type,))
        values["guided_decoding_guide"] = _strings((s.guide.text,))
    if s.echo:
        values["echo"] = _one(True, np.bool_)
    if s.prompt_logprobs is not None:
        values["num_prompt_log_probs"] = _one(s.prompt_logprobs, np.int32)
    if s.cache_salt is not None:
        values["cache_salt"] = _strings((s.cache_salt,))
    if s.priority is not None:
        values["priority"] = _one(s.priority, np.int32)
    if s.stop_token_ids:
        values["stop_token_ids"] = np.array([s.stop_token_ids], dtype=np.int32)
    if s.include_stop_str_in_output:
        values["include_stop_str_in_output"] = _one(True, np.bool_)
    if s.ignore_eos:
        values["ignore_eos"] = _one(True, np.bool_)
    if not s.skip_special_tokens:
        values["skip_special_tokens"] = _one(False, np.bool_)
    if s.allowed_token_ids:
        values["allowed_token_ids"] = np.array([s.allowed_token_ids], dtype=np.int32)
    if s.truncate_prompt_tokens is not None:
        values["truncate_prompt_tokens"] = _one(s.truncate_prompt_tokens, np.int32)
    if req.return_num_input_tokens:
        values["return_num_input_tokens"] = _one(True, np.bool_)
    if req.return_num_output_tokens:
        values["return_num_output_tokens"] = _one(True, np.bool_)
    if req.return_prompt_token_ids:
        values["return_prompt_token_ids"] = _one(True, np.bool_)
    if not req.add_special_tokens:
        values["add_special_tokens"] = _one(False, np.bool_)
    return {name: value for name, value in values.items() if value is not None}


def _logit_bias(ids: Optional[np.ndarray], biases: Optional[np.ndarray]) -> tuple[tuple[int, float], ...]:
    if ids is None and biases is None:
        return ()
    ids_ = np.asarray(ids if ids is not None else []).reshape(-1)
    biases_ = np.asarray(biases if biases is not None else []).reshape(-1)
    if ids_.size != biases_.size:
        raise InvalidRequest(f"logit_bias_ids has {ids_.size} entries and logit_bias_values {biases_.size}: "
                             "give one value per id", param="logit_bias")
    merged: dict[int, float] = {}
    for token, bias in zip(ids_.tolist(), biases_.tolist()):
        merged[int(token)] = float(bias)
    return tuple(merged.items())


def _guide(get: Callable[[str], Optional[np.ndarray]]) -> Optional[Guide]:
    kinds = _texts(get("guided_decoding_guide_type"), "guided_decoding_guide_type")
    texts = _texts(get("guided_decoding_guide"), "guided_decoding_guide")
    if not kinds:
        if texts:
            raise InvalidRequest("guided_decoding_guide needs guided_decoding_guide_type",
                                 param="guided_decoding_guide_type")
        return None
    if len(kinds) > 1 or len(texts) > 1:
        raise InvalidRequest("give one guided decoding guide", param="guided_decoding_guide")
    return Guide(kinds[0], texts[0] if texts else "")


def _scalar(value: Optional[np.ndarray], cast: Callable[[Any], Any]) -> Any:
    if value is None:
        return None
    flat = np.asarray(value).reshape(-1)
    return cast(flat[0]) if flat.size else None


def _texts(value: Optional[np.ndarray], name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    out = []
    for i, item in enumerate(np.asarray(value).reshape(-1)):
        try:
            text = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        except UnicodeDecodeError:
            raise InvalidRequest(f"{name}[{i}] is not valid UTF-8", param=name) from None
        if text:
            out.append(text)
    return tuple(out)


def _ids(value: Optional[np.ndarray]) -> Optional[tuple[int, ...]]:
    """An ``input_ids`` tensor as a tuple of ids; None when absent."""
    return None if value is None else tuple(int(i) for i in np.asarray(value).reshape(-1).tolist())


def read_tokenizer_inputs(get: Callable[[str], Optional[np.ndarray]]) -> tuple[str, tuple[int, ...]]:
    """The text (``text_input``, may be empty) and the ids (``input_ids``, may be none) of a
    :data:`TOKENIZE_PARAMETER` or :data:`DETOKENIZE_PARAMETER` request. Raises InvalidRequest."""
    texts = _texts(get("text_input"), "text_input")
    if len(texts) > 1:
        raise InvalidRequest("text_input must hold one text", param="prompt")
    return texts[0] if texts else "", _ids(get("input_ids")) or ()


def tokenize_outputs(ids: Sequence[int], strs: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """The one response to a :data:`TOKENIZE_PARAMETER` request (``strs``: the ids' pieces,
    :data:`TOKEN_STRS_PARAMETER`)."""
    out = {"text_output": np.array([[b""]], dtype=np.object_),
           "output_token_ids": np.array(list(ids), dtype=np.int32).reshape(1, len(ids)),
           "prompt_tokens": np.array([[len(ids)]], dtype=np.int32)}
    if strs is not None:
        out["token_strs"] = np.array([s.encode("utf-8") for s in strs], dtype=np.object_).reshape(1, len(strs))
    return out


def detokenize_outputs(text: str, count: int) -> dict[str, np.ndarray]:
    """The one response to a :data:`DETOKENIZE_PARAMETER` request (``count``: the ids')."""
    return {"text_output": np.array([[text.encode("utf-8")]], dtype=np.object_),
            "prompt_tokens": np.array([[count]], dtype=np.int32)}


def read_llm_inputs(get: Callable[[str], Optional[np.ndarray]]) -> TextRequest:
    """The request from ``llm``'s input tensors (``get`` returns None for absent ones): absent
    sampling inputs take :class:`SamplingParams`' defaults. Raises InvalidRequest."""
    prompts = _texts(get("text_input"), "prompt")
    prompt_ids = _ids(get("input_ids"))
    if prompt_ids is not None:
        if prompts:
            raise InvalidRequest("give the prompt as text_input or as input_ids, not both", param="prompt")
        if not prompt_ids:
            raise InvalidRequest("input_ids must hold at least one token id", param="prompt")
        prompts = ("",)
    elif len(prompts) != 1:
        raise InvalidRequest("text_input must hold exactly one non-empty prompt", param="prompt")
    max_tokens = _scalar(get("max_tokens"), int)
    if max_tokens is None:
        raise InvalidRequest("max_tokens is required", param="max_new_tokens")
    seed = _scalar(get("seed"), int)
    if seed is None:
        seed = _scalar(get("random_seed"), int)
    given = {
        "max_new_tokens": max_tokens,
        "temperature": _scalar(get("temperature"), float),
        "top_p": _scalar(get("top_p"), float) or None,  # NVIDIA's ensemble: 0 means off
        "top_k": _scalar(get("top_k"), int),
        "repetition_penalty": _scalar(get("repetition_penalty"), float),
        "stop": _texts(get("stop_words"), "stop_sequences"),
        "seed": seed,
        "bad_words": _texts(get("bad_words"), "bad_words"),
        "n": _scalar(get("num_return_sequences"), int),
        "min_tokens": _scalar(get("min_tokens"), int),
        "presence_penalty": _scalar(get("presence_penalty"), float),
        "frequency_penalty": _scalar(get("frequency_penalty"), float),
        "min_p": _scalar(get("min_p"), float),
        "logit_bias": _logit_bias(get("logit_bias_ids"), get("logit_bias_values")),
        "guide": _guide(get),
    }
    if _scalar(get("return_log_probs"), bool):
        given["logprobs"] = _scalar(get("num_top_log_probs"), int) or 0
    given["echo"] = _scalar(get("echo"), bool)
    given["prompt_logprobs"] = _scalar(get("num_prompt_log_probs"), int)
    salts = _texts(get("cache_salt"), "cache_salt")
    if len(salts) > 1:
        raise InvalidRequest("give one cache_salt", param="cache_salt")
    given["cache_salt"] = salts[0] if salts else None
    given["priority"] = _scalar(get("priority"), int)
    given["stop_token_ids"] = _ids(get("stop_token_ids"))
    given["include_stop_str_in_output"] = _scalar(get("include_stop_str_in_output"), bool)
    given["ignore_eos"] = _scalar(get("ignore_eos"), bool)
    given["skip_special_tokens"] = _scalar(get("skip_special_tokens"), bool)
    allowed = _ids(get("allowed_token_ids"))
    given["allowed_token_ids"] = tuple(dict.fromkeys(allowed)) if allowed else None  # in order, once each
    given["truncate_prompt_tokens"] = _scalar(get("truncate_prompt_tokens"), int)
    if (trouble := beam_width_error(_scalar(get("beam_width"), int))) is not None:
        raise InvalidRequest(trouble, param="beam_width")
    sampling = SamplingParams(**{k: v for k, v in given.items() if v is not None})
    stream = bool(_scalar(get("stream"), bool) or False)
    return TextRequest(prompt=prompts[0], prompt_ids=prompt_ids, sampling=sampling, stream=stream,
                       end_id=_scalar(get("end_id"), int), pad_id=_scalar(get("pad_id"), int),
                       include_prompt=not stream and _scalar(get("exclude_input_in_output"), bool) is False,
                       return_num_input_tokens=bool(_scalar(get("return_num_input_tokens"), bool)),
                       return_num_output_tokens=bool(_scalar(get("return_num_output_tokens"), bool)),
                       return_prompt_token_ids=bool(_scalar(get("return_prompt_token_ids"), bool)),
                       add_special_tokens=_scalar(get("add_special_tokens"), bool) is not False)
