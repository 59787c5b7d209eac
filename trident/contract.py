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
import re
from collections.abc import Callable, Mapping
from typing import Any, Optional

import numpy as np

# -- the llm / ensemble tensors -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: Any  # numpy dtype of the values (BYTES tensors: np.object_ of bytes)
    optional: bool = True
    many: bool = False  # dims [-1] (a list), else [1]


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
)
#: Outputs: text on every response; the counts and finish_reason on the final one.
LLM_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_output", np.object_, optional=False),
    TensorSpec("finish_reason", np.object_),
    TensorSpec("prompt_tokens", np.int32),
    TensorSpec("completion_tokens", np.int32),
    TensorSpec("server", np.object_),  # on the admission response: which Triton took the request
)

#: Environment variable naming a Triton server (``host:grpc port`` by default, set by the
#: launchers); the ``llm`` model puts it in its admission response, the gateway in its metrics
#: and logs.
SERVER_ID_ENV = "TRIDENT_SERVER_ID"

#: Request parameter (bool) of the ``llm`` model: send one empty response as soon as the request
#: is validated and queued, before any text. The gateway asks for it so that a streaming client
#: gets its HTTP 200 and SSE heartbeats while the request waits for the engine, and every
#: validation error still arrives before that as an HTTP status.
ADMISSION_PARAMETER = "trident_admission_ack"

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


# -- errors across the boundary ----------------------------------------------------------------------

INVALID_REQUEST = "invalid_request_error"  # the gateway's 400, naming the param when tagged with one
UNAVAILABLE = "service_unavailable"  # the gateway's 503 with Retry-After
SERVER_ERROR = "server_error"  # the gateway's 500 (also any untagged message)
ERROR_KINDS = (INVALID_REQUEST, UNAVAILABLE, SERVER_ERROR)


def tag_error(kind: str, message: str, param: Optional[str] = None) -> str:
    """``[kind] message`` or ``[kind:param] message``: how an error crosses Triton."""
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}")
    return f"[{kind}:{param}] {message}" if param else f"[{kind}] {message}"


# Triton or the Python backend may put a prefix ending in ": " before the tag.
_TAGGED = re.compile(
    r"(?:^|:\s)\s*\[(?P<kind>" + "|".join(ERROR_KINDS) + r")"
    r"(?::(?P<param>[A-Za-z0-9_.-]+(?:\[\d+\])*))?\]\s*(?P<message>.*)\Z",
    re.S,
)


@dataclasses.dataclass(frozen=True)
class TaggedMessage:
    kind: str
    param: Optional[str]
    message: str


def parse_error(text: str) -> Optional[TaggedMessage]:
    """The tag of an error message, or None when it has none."""
    match = _TAGGED.search(text.strip())
    if match is None:
        return None
    message = match["message"].strip() or match["kind"].replace("_", " ")
    return TaggedMessage(match["kind"], match["param"], message)


class TaggedError(Exception):
    """An error that crosses the boundary with its tag (:func:`tag_error`)."""

    kind = SERVER_ERROR

    def __init__(self, message: str, *, param: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def tagged(self) -> str:
        return tag_error(self.kind, self.message, self.param)


class InvalidRequest(TaggedError):
    kind = INVALID_REQUEST


# -- limits --------------------------------------------------------------------------------------

# Costly fields, bounded the same way on both sides (docs/api.md, "Limits", says why):
MAX_STOP_SEQUENCES = 16  # stop sequences per request
MAX_STOP_CHARS = 256  # characters of one stop sequence: held back and matched at every token
MAX_CHAT_MESSAGES = 512  # messages of one chat request
MAX_JSON_DEPTH = 32  # nesting of a request body (the deepest valid body needs 4)


@dataclasses.dataclass(frozen=True)
class ModelLimits:
    """A served model's limits. One source: the ``llm`` model's config parameters, written by the
    repository build from the engine's own (``max_seq_len``); the gateway reads them from Triton
    (``ModelConfig``), the ``llm`` model from its config."""

    max_context: int = 2048  # prompt + generated tokens
    max_new_tokens: int = 2048
    # Characters a prompt may have before it is tokenized: the context times the longest token
    # of the tokenizer (written by the repository build), so no prompt that fits is refused;
    # 0: not bounded here (the tokenizer's own count still is).
    max_prompt_chars: int = 0

    PARAMETERS = {"max_context": "max_context", "max_new_tokens": "max_new_tokens_limit",
                  "max_prompt_chars": "max_prompt_chars"}

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "ModelLimits":
        values = {field: int(params[key]) for field, key in cls.PARAMETERS.items() if params.get(key)}
        return cls(**values)


def max_tokens_error(value: int, limit: int, param: str = "max_new_tokens") -> str:
    return f"{param} must be between 1 and {limit}, got {value}"


def prompt_chars_error(chars: int, limit: int, param: str = "prompt") -> str:
    return (f"{param} has {chars} characters, more than the {limit} that can fit the model's context "
            f"(checked before tokenizing); shorten it")


def stop_error(stops: tuple[str, ...], param: str = "stop_sequences") -> Optional[str]:
    """The message for stop sequences over the limits, or None."""
    if len(stops) > MAX_STOP_SEQUENCES:
        return f"{param} must have at most {MAX_STOP_SEQUENCES} items, got {len(stops)}"
    for i, stop in enumerate(stops):
        if len(stop) > MAX_STOP_CHARS:
            return f"{param}[{i}] must be at most {MAX_STOP_CHARS} characters, got {len(stop)}"
    return None


def context_error(prompt_tokens: int, max_new_tokens: int, max_context: int) -> str:
    return (f"the prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: together "
            f"{prompt_tokens + max_new_tokens}, over the model's context of {max_context} tokens")


# -- sampling parameters ---------------------------------------------------------------------------

UINT64_MAX = 2**64 - 1
INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling and limits of one generation: the defaults of shared/API.md, the only defaults.

    A gateway caller who leaves a field out and a direct gRPC caller of ``llm`` who sends no
    tensor for it get these same values. ``temperature`` 0 means greedy, as does ``top_k`` 1.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    stop: tuple[str, ...] = ()  # stop sequences (text)
    seed: Optional[int] = None  # None: not seeded
    bad_words: tuple[str, ...] = ()  # words never generated (text; NVIDIA ensemble input)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def check(self, limits: Optional[ModelLimits] = None) -> None:
        """Raise InvalidRequest naming the field when a value is one no engine can serve. The
        gateway's schemas are stricter (shared/API.md's ranges, e.g. temperature at most 2)
        before a request leaves; this guards direct gRPC callers, who keep NVIDIA's ranges."""
        limit = limits.max_new_tokens if limits else None
        if self.max_new_tokens < 1 or (limit is not None and self.max_new_tokens > limit):
            raise InvalidRequest(max_tokens_error(self.max_new_tokens, limit or INT32_MAX), param="max_new_tokens")
        if not self.temperature >= 0.0:  # also NaN
            raise InvalidRequest(f"temperature must be at least 0, got {self.temperature:g}", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be greater than 0 and at most 1, got {self.top_p:g}", param="top_p")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be between 0 and {INT32_MAX}, got {self.top_k}", param="top_k")
        if not self.repetition_penalty > 0.0:
            raise InvalidRequest(f"repetition_penalty must be greater than 0, got {self.repetition_penalty:g}",
                                 param="repetition_penalty")
        if self.seed is not None and not 0 <= self.seed <= UINT64_MAX:
            raise InvalidRequest(f"seed must be between 0 and {UINT64_MAX}, got {self.seed}", param="seed")
        for stops, param in ((self.stop, "stop_sequences"), (self.bad_words, "bad_words")):
            message = stop_error(stops, param)
            if message:
                raise InvalidRequest(message, param=param)

    def log_fields(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "repetition_penalty": self.repetition_penalty, "stop_sequences": len(self.stop),
                "seed": self.seed}


@dataclasses.dataclass(frozen=True, slots=True)
class TextRequest:
    """One generation request at the text level: what the gateway sends and ``llm`` receives."""

    prompt: str = dataclasses.field(repr=False)  # never in logs
    sampling: SamplingParams = SamplingParams()
    stream: bool = False
    model: str = ""  # the public model name (gateway side); not sent to Triton
    end_id: Optional[int] = None  # NVIDIA ensemble overrides of the tokenizer's ids
    pad_id: Optional[int] = None


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
        "text_input": _strings((req.prompt,)),
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
    }
    return {name: value for name, value in values.items() if value is not None}


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


def read_llm_inputs(get: Callable[[str], Optional[np.ndarray]]) -> TextRequest:
    """The request from ``llm``'s input tensors (``get`` returns None for absent ones): absent
    sampling inputs take :class:`SamplingParams`' defaults. Raises InvalidRequest."""
    prompts = _texts(get("text_input"), "prompt")
    if len(prompts) != 1:
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
    }
    sampling = SamplingParams(**{k: v for k, v in given.items() if v is not None})
    return TextRequest(prompt=prompts[0], sampling=sampling, stream=bool(_scalar(get("stream"), bool) or False),
                       end_id=_scalar(get("end_id"), int), pad_id=_scalar(get("pad_id"), int))
