"""Limits and sampling parameters: part of trident.contract (import them from there).

:class:`SamplingParams` is the one parameters object of a generation, from the gateway's
schemas to the engine's sampler; :class:`ModelLimits` the served model's limits, read by both
sides from the ``llm`` model's config parameters.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from .error_tags import InvalidRequest

# -- limits --------------------------------------------------------------------------------------

# Costly fields, bounded the same way on both sides (docs/api.md, "Limits", says why):
MAX_STOP_SEQUENCES = 16  # stop sequences per request
MAX_STOP_CHARS = 256  # characters of one stop sequence: held back and matched at every token
MAX_CHAT_MESSAGES = 512  # messages of one chat request
MAX_JSON_DEPTH = 32  # nesting of a request body (the deepest valid body needs 4)
MAX_CHOICES = 16  # n (and best_of): each choice costs a whole generation
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's limit)
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_STOP_TOKEN_IDS = 64  # entries of stop_token_ids
MAX_BAD_WORDS = 64  # bad words (text) per request: each a token sequence the engine matches at every token
MAX_BIAS = 100.0  # |bias| (OpenAI's range)
MAX_PENALTY = 2.0  # |presence_penalty|, |frequency_penalty| (OpenAI's range)
MAX_GUIDE_CHARS = 65536  # a JSON schema, regex or grammar: compiled against the whole vocabulary
MAX_ALLOWED_TOKEN_IDS = 16384  # entries of allowed_token_ids (a larger choice reads better as a grammar)
#: The bias every token outside ``allowed_token_ids`` gets in the engine's dense ``embedding_bias``:
#: finite (a -inf would turn a row with nothing else left into NaNs, and fp16 holds it), and far
#: below any logit, so that no such token is ever sampled (exp(-10000) is 0 in every float type).
DISALLOWED_BIAS = -10000.0


def beam_width_error(beam_width: Optional[int]) -> Optional[str]:
    """Why a request's ``beam_width`` (NVIDIA's clients send it on every request) cannot be
    served, or None: beam search is not served (the engines are built with max_beam_width 1).
    Checked by ``llm`` (trident.contract) and the CPU engine (trident.engine.triton_io) alike."""
    if beam_width is None or beam_width == 1:
        return None
    return f"beam_width must be 1 (beam search is not served), got {beam_width}"


#: What an engine can do beyond the inputs every engine reads (the llm model's parameter
#: ``engine_features``, comma-separated, written by the repository build): the CPU engine has
#: all; TensorRT-LLM 1.2.1's backend guided decoding only. A request needing one the engine
#: lacks is a 400 naming the field.
FEATURE_TOP_LOGPROBS = "top_logprobs"  # alternatives per token (TensorRT-LLM: the chosen token only)
FEATURE_MIN_P = "min_p"  # the backend reads no min_p input
FEATURE_GUIDED = "guided_decoding"  # XGrammar configured (both engines, when the build could describe the tokenizer)
FEATURE_PROMPT_LOGPROBS = "prompt_logprobs"  # the prompt's log-probabilities (the CPU engine's context outputs)
FEATURE_CACHED_TOKENS = "cached_tokens"  # prompt tokens from the prefix cache, per request (return_num_cached_tokens)
# min_tokens bans the stop tokens too (min_tokens_stop_ids), as vLLM; without it (TensorRT-LLM
# bans only its end id) those tokens are ordinary tokens until min_tokens: served either way.
FEATURE_MIN_TOKENS_STOPS = "min_tokens_stops"
# cache_salt: a request's prefix cache blocks are shared only with requests of the same salt
# (the CPU engine's cache_salt_id; TensorRT-LLM's backend has no such input)
FEATURE_CACHE_SALT = "cache_salt"
# priority: the engine admits waiting requests by priority, then arrival (the CPU engine's input
# priority; TensorRT-LLM's executor sorts its queue by a priority the Triton backend never sets)
FEATURE_PRIORITY = "priority"
ENGINE_FEATURES = (FEATURE_TOP_LOGPROBS, FEATURE_MIN_P, FEATURE_GUIDED, FEATURE_PROMPT_LOGPROBS, FEATURE_CACHED_TOKENS,
                   FEATURE_MIN_TOKENS_STOPS, FEATURE_CACHE_SALT, FEATURE_PRIORITY)
#: The most characters a request's (or an API key's) cache_salt may have at the gateway (vLLM
#: sets none; a salt is an id, not a text); the llm model takes a key's and a request's together.
MAX_CACHE_SALT_CHARS = 1024
MAX_LLM_CACHE_SALT_CHARS = 2 * MAX_CACHE_SALT_CHARS + 1


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
    # What the engine can do beyond TensorRT-LLM's backend (ENGINE_FEATURES); the default, for a
    # config without the parameter, is what every engine does.
    features: frozenset[str] = frozenset()
    vocab_size: int = 0  # token ids are below it (logit_bias); 0: not checked here

    PARAMETERS = {"max_context": "max_context", "max_new_tokens": "max_new_tokens_limit",
                  "max_prompt_chars": "max_prompt_chars", "vocab_size": "vocab_size"}

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "ModelLimits":
        values: dict[str, Any] = {field: int(params[key]) for field, key in cls.PARAMETERS.items() if params.get(key)}
        features = params.get("engine_features", "")
        values["features"] = frozenset(f.strip() for f in features.split(",") if f.strip())
        return cls(**values)


def _check_between(name: str, value: int, low: int, high: int) -> None:
    """An integer field's bounds, inclusive: a 400 naming the field, in the one wording of these checks."""
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}, got {value}", param=name)


def max_tokens_error(value: int, limit: int, param: str = "max_new_tokens", *, echo: bool = True) -> str:
    """``echo``: the caller could have sent echo (then 0 is allowed with it, and the message says so)."""
    hint = " (0 only with echo: the prompt scored, nothing generated)" if value == 0 and echo else ""
    return f"{param} must be between 1 and {limit}, got {value}{hint}"


def prompt_chars_error(chars: int, limit: int, param: str = "prompt") -> str:
    return (f"{param} has {chars} characters, more than the {limit} that can fit the model's context "
            f"(checked before tokenizing); shorten it")


def stop_error(stops: tuple[str, ...], param: str = "stop_sequences", most: int = MAX_STOP_SEQUENCES) -> Optional[str]:
    """The message for stop sequences (or bad words: ``most``) over the limits, or None."""
    if len(stops) > most:
        return f"{param} must have at most {most} items, got {len(stops)}"
    for i, stop in enumerate(stops):
        if len(stop) > MAX_STOP_CHARS:
            return f"{param}[{i}] must be at most {MAX_STOP_CHARS} characters, got {len(stop)}"
    return None


def context_error(prompt_tokens: int, max_new_tokens: int, max_context: int) -> str:
    return (f"the prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: together "
            f"{prompt_tokens + max_new_tokens}, over the model's context of {max_context} tokens")


def token_ids_error(ids: Sequence[int], vocab_size: int, param: str = "prompt") -> Optional[str]:
    """The message for the first id that is not a token of a model of ``vocab_size`` tokens (0:
    any non-negative id), or None."""
    for i, token in enumerate(ids):
        if token < 0 or (vocab_size and token >= vocab_size):
            bound = f"below {vocab_size}" if vocab_size else "non-negative"
            return f"{param}: token id {token} (at {i}) is not a token of the model (ids are {bound})"
    return None


def prompt_ids_error(ids: tuple[int, ...], max_new_tokens: int, limits: ModelLimits,
                     param: str = "prompt") -> Optional[str]:
    """The message for a prompt given as token ids (at least one: both callers' readers refuse
    none) that no engine can take (an id that is not a token of the model, or more tokens than
    the context holds with ``max_new_tokens``), or None. Checked by the gateway before the
    request leaves and by ``llm`` for direct gRPC callers."""
    trouble = token_ids_error(ids, limits.vocab_size, param)
    if trouble is None and len(ids) + max_new_tokens > limits.max_context:
        trouble = context_error(len(ids), max_new_tokens, limits.max_context)
    return trouble


# -- sampling parameters ---------------------------------------------------------------------------

# TensorRT-LLM's guided_decoding_guide_type values
GUIDE_JSON = "json"  # any JSON value (XGrammar's built-in JSON grammar)
GUIDE_JSON_SCHEMA = "json_schema"
GUIDE_REGEX = "regex"
GUIDE_EBNF = "ebnf_grammar"
GUIDE_TYPES = (GUIDE_JSON, GUIDE_JSON_SCHEMA, GUIDE_REGEX, GUIDE_EBNF)
#: OpenAI's ``{"type": "json_object"}``: any JSON object (TensorRT-LLM's "json" allows any value)
JSON_OBJECT_SCHEMA = '{"type": "object"}'


@dataclasses.dataclass(frozen=True, slots=True)
class Guide:
    """Constrained decoding: the output must match ``text`` (a JSON schema, a regex, an EBNF
    grammar; empty for ``json``), compiled by XGrammar (trident.grammar)."""

    type: str
    text: str = ""

UINT64_MAX = 2**64 - 1
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)


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
    # Output controls (issue 15), with OpenAI's and TensorRT-LLM's meanings:
    n: int = 1  # choices (TensorRT-LLM's num_return_sequences), each its own random stream
    # No end of the choice before this many tokens: the end token is banned (both engines), so are
    # the model's other end tokens and stop_token_ids on an engine with FEATURE_MIN_TOKENS_STOPS
    # (elsewhere they do not end it), and no stop sequence is matched in the text of those first
    # tokens (vLLM's meaning).
    min_tokens: int = 0
    # vLLM's: the end tokens (the engine's and the model's others) never end the choice: it runs
    # to max_new_tokens unless a stop sequence or a stop_token_ids token ends it. The engines get
    # it as min_tokens = max_new_tokens (TensorRT-LLM has no ignore_eos).
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # ... times the number of times it was generated
    min_p: float = 0.0  # keep tokens with probability >= min_p x the most likely one's; 0: off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: Optional[int] = None  # None: none; 0: the chosen token's; k: also the k best
    guide: Optional[Guide] = None  # structured output
    # The prompt in front of the text (OpenAI's echo); with logprobs, each prompt token comes
    # with its log-probability and the alternatives asked for (the first token has none).
    echo: bool = False
    # vLLM's prompt_logprobs: each prompt token's log-probability and rank with the k best tokens
    # at its position, sent before the text (CPU engine); None: not asked.
    prompt_logprobs: Optional[int] = None
    # vLLM's: token ids that end a choice like a stop sequence (the end token always does), and
    # whether the matched stop sequence or stop token stays at the end of the text.
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    # vLLM's: False keeps the tokenizer's special tokens (<|im_start|>, tool-call markers) in the text.
    skip_special_tokens: bool = True
    # vLLM's: only these token ids can be generated (empty: any). The engines get it in the dense
    # embedding_bias: DISALLOWED_BIAS for every other token, logit_bias still applies to these.
    allowed_token_ids: tuple[int, ...] = ()
    # vLLM's: keep only the prompt's last k tokens (left truncation, after tokenizing, special
    # tokens included); -1: as many of the last tokens as fit the context with the tokens asked
    # for. None: not truncated (a prompt that does not fit is a 400).
    truncate_prompt_tokens: Optional[int] = None
    # vLLM's cache_salt: the prompt's K/V are reused only by requests with the same salt (a
    # tenant's), so that no one can tell from the speed of an answer which prompts others sent.
    cache_salt: Optional[str] = dataclasses.field(default=None, repr=False)
    # vLLM's priority: waiting requests are admitted to the engine's batch the lower values first,
    # then in arrival order (None: 0, first come, first served); one admitted is never preempted.
    priority: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def engine_tokens(self) -> int:
        """The tokens the engine is asked for, and the room they need in the context: at least
        one. ``max_new_tokens`` 0 is an echo that only scores the prompt (OpenAI's legacy
        ``echo`` with ``max_tokens`` 0, vLLM's too): the engine's one token is dropped by ``llm``."""
        return max(self.max_new_tokens, 1)

    @property
    def engine_min_tokens(self) -> int:
        """The engine's ``min_tokens``: the tokens before which it bans its end token."""
        return self.max_new_tokens if self.ignore_eos else self.min_tokens

    def kept_prompt_tokens(self, prompt_tokens: int, max_context: int) -> int:
        """How many of a prompt's ``prompt_tokens`` tokens the engine is given: all of them, or
        the last ``truncate_prompt_tokens`` (-1: as many as fit ``max_context`` with the tokens
        asked for; at least one)."""
        keep = self.truncate_prompt_tokens
        if keep is None:
            return prompt_tokens
        if keep == -1:
            keep = max(max_context - self.engine_tokens, 1)
        return min(prompt_tokens, keep)

    def check(self, limits: Optional[ModelLimits] = None) -> None:
        """Raise InvalidRequest naming the field when a value is one no engine can serve. The
        gateway's schemas are stricter (shared/API.md's ranges, e.g. temperature at most 2)
        before a request leaves; this guards direct gRPC callers, who keep NVIDIA's ranges."""
        limit = limits.max_new_tokens if limits else None
        least = 0 if self.echo else 1
        if self.max_new_tokens < least or (limit is not None and self.max_new_tokens > limit):
            raise InvalidRequest(max_tokens_error(self.max_new_tokens, limit or INT32_MAX), param="max_new_tokens")
        if not self.temperature >= 0.0:  # also NaN
            raise InvalidRequest(f"temperature must be at least 0, got {self.temperature:g}", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be greater than 0 and at most 1, got {self.top_p:g}", param="top_p")
        _check_between("top_k", self.top_k, 0, INT32_MAX)
        if not self.repetition_penalty > 0.0:
            raise InvalidRequest(f"repetition_penalty must be greater than 0, got {self.repetition_penalty:g}",
                                 param="repetition_penalty")
        if self.seed is not None:
            _check_between("seed", self.seed, 0, UINT64_MAX)
        for stops, param, most in ((self.stop, "stop_sequences", MAX_STOP_SEQUENCES),
                                   (self.bad_words, "bad_words", MAX_BAD_WORDS)):
            message = stop_error(stops, param, most)
            if message:
                raise InvalidRequest(message, param=param)
        self._check_output_controls(limits)

    def _check_output_controls(self, limits: Optional[ModelLimits]) -> None:
        _check_between("n", self.n, 1, MAX_CHOICES)
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InvalidRequest(f"min_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
                                 f"got {self.min_tokens}", param="min_tokens")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise InvalidRequest(f"{name} must be between -{MAX_PENALTY:g} and {MAX_PENALTY:g}, got {value:g}",
                                     param=name)
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest(f"min_p must be between 0 and 1, got {self.min_p:g}", param="min_p")
        features = limits.features if limits is not None else frozenset(ENGINE_FEATURES)
        if self.min_p and FEATURE_MIN_P not in features:
            raise InvalidRequest("min_p is not supported by this deployment's engine (TensorRT-LLM's backend "
                                 "has no min_p input); leave it at 0", param="min_p")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(f"stop_token_ids must have at most {MAX_STOP_TOKEN_IDS} entries, got "
                                 f"{len(self.stop_token_ids)}", param="stop_token_ids")
        vocab = limits.vocab_size if limits is not None else 0
        if (trouble := token_ids_error(self.stop_token_ids, vocab, "stop_token_ids")) is not None:
            raise InvalidRequest(trouble, param="stop_token_ids")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias must have at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}",
                                 param="logit_bias")
        if (trouble := token_ids_error([t for t, _ in self.logit_bias], vocab, "logit_bias")) is not None:
            raise InvalidRequest(trouble, param="logit_bias")
        for token, bias in self.logit_bias:
            if not -MAX_BIAS <= bias <= MAX_BIAS:
                raise InvalidRequest(f"logit_bias: the bias of token {token} must be between -{MAX_BIAS:g} and "
                                     f"{MAX_BIAS:g}, got {bias:g}", param="logit_bias")
        if len(self.allowed_token_ids) > MAX_ALLOWED_TOKEN_IDS:
            raise InvalidRequest(f"allowed_token_ids must have at most {MAX_ALLOWED_TOKEN_IDS} entries, got "
                                 f"{len(self.allowed_token_ids)}", param="allowed_token_ids")
        if (trouble := token_ids_error(self.allowed_token_ids, vocab, "allowed_token_ids")) is not None:
            raise InvalidRequest(trouble, param="allowed_token_ids")
        if self.truncate_prompt_tokens is not None:
            most = limits.max_context if limits is not None else INT32_MAX
            if self.truncate_prompt_tokens != -1 and not 1 <= self.truncate_prompt_tokens <= most:
                raise InvalidRequest(f"truncate_prompt_tokens must be -1 (as many as fit) or between 1 and "
                                     f"{most} (the model's context), got {self.truncate_prompt_tokens}",
                                     param="truncate_prompt_tokens")
        if self.cache_salt is not None:
            if not self.cache_salt or len(self.cache_salt) > MAX_LLM_CACHE_SALT_CHARS:
                raise InvalidRequest(f"cache_salt must be a non-empty string of at most {MAX_LLM_CACHE_SALT_CHARS} "
                                     f"characters, got {len(self.cache_salt)}", param="cache_salt")
            if FEATURE_CACHE_SALT not in features:
                raise InvalidRequest("cache_salt is not supported by this deployment's engine (TensorRT-LLM's "
                                     "backend takes no salt for its KV cache reuse)", param="cache_salt")
        if self.priority is not None:
            _check_between("priority", self.priority, INT32_MIN, INT32_MAX)
            if self.priority != 0 and FEATURE_PRIORITY not in features:  # vLLM: 0 without priority scheduling
                raise InvalidRequest("priority other than 0 is not supported by this deployment's engine "
                                     "(TensorRT-LLM's Triton backend sets no request priority)", param="priority")
        if self.logprobs is not None:
            _check_between("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS)
            if self.logprobs and FEATURE_TOP_LOGPROBS not in features:
                raise InvalidRequest("top log-probabilities are not supported by this deployment's engine "
                                     "(TensorRT-LLM returns the chosen token's only): ask for 0 alternatives",
                                     param="logprobs")
        if self.echo and self.logprobs is not None and FEATURE_PROMPT_LOGPROBS not in features:
            raise InvalidRequest("the prompt's log-probabilities (echo with logprobs) are not supported by this "
                                 "deployment's engine", param="echo")
        if self.prompt_logprobs is not None:
            _check_between("prompt_logprobs", self.prompt_logprobs, 0, MAX_TOP_LOGPROBS)
            if FEATURE_PROMPT_LOGPROBS not in features:
                raise InvalidRequest("the prompt's log-probabilities (prompt_logprobs) are not supported by this "
                                     "deployment's engine", param="prompt_logprobs")
        if self.guide is not None:
            if FEATURE_GUIDED not in features:
                raise InvalidRequest("structured output is not configured on this deployment (its repository has "
                                     "no tokenizer description for XGrammar)", param="guided_decoding_guide_type")
            if self.guide.type not in GUIDE_TYPES:
                raise InvalidRequest(f"guided_decoding_guide_type must be one of {', '.join(GUIDE_TYPES)}, "
                                     f"got {self.guide.type!r}", param="guided_decoding_guide_type")
            if self.guide.type != GUIDE_JSON and not self.guide.text:
                raise InvalidRequest(f"a {self.guide.type} guide needs guided_decoding_guide",
                                     param="guided_decoding_guide")
            if len(self.guide.text) > MAX_GUIDE_CHARS:
                raise InvalidRequest(f"guided_decoding_guide must be at most {MAX_GUIDE_CHARS} characters, "
                                     f"got {len(self.guide.text)}", param="guided_decoding_guide")

    def log_fields(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "repetition_penalty": self.repetition_penalty, "stop_sequences": len(self.stop),
                "bad_words": len(self.bad_words), "seed": self.seed, "n": self.n, "logprobs": self.logprobs, "echo": self.echo,
                "prompt_logprobs": self.prompt_logprobs,
                "guide": None if self.guide is None else self.guide.type,
                "allowed_token_ids": len(self.allowed_token_ids), "truncate_prompt_tokens": self.truncate_prompt_tokens,
                "priority": self.priority}
