"""The small interface routes depend on (STYLE 5), and the events it yields.

Routes never import tritonclient or grpc: they take a :class:`Backend`. The Triton gRPC client
(``gateway.triton_backend.TritonBackend``) is one implementation; the in-process tests use a
fake (``tests/unit/fakes.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from trident.contract import ModelLimits, TextRequest


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The tokens of one piece of text (their texts concatenate to it), with log-probabilities
    and, when asked for, each one's best alternatives ``(text, logprob)``, best first, and their
    ids (``top_ids``, where the llm model sent them)."""

    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    top: tuple[tuple[tuple[str, float], ...], ...] | None = None
    top_ids: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True, slots=True)
class PromptLogprobs:
    """One prompt's tokens with their log-probabilities (vLLM's prompt_logprobs): each token's
    text decoded alone, id and log-probability given the tokens before it (NaN for the first,
    which has none), with the best alternatives at its position (none for the first), and its
    rank there (``ranks``: 1 the most likely; 0 for the first)."""

    tokens: TokenLogprobs
    ranks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TextDelta:
    """The next piece of generated text of choice ``index``: whole UTF-8 characters, never the
    prompt, never a (possibly partial) stop sequence; with ``logprobs`` its tokens."""

    text: str
    index: int = 0
    logprobs: TokenLogprobs | None = None
    tokens: int | None = None  # the generated tokens it accounts for, when the backend says (num_output_tokens)


@dataclass(frozen=True, slots=True)
class ChoiceEnd:
    """How one choice ended: its finish reason, its own completion tokens and, with logprobs,
    the sum of its tokens' log-probabilities."""

    index: int
    finish_reason: str
    completion_tokens: int
    cum_logprob: float | None = None
    # what stopped it (vLLM's stop_reason): the stop sequence matched or the stop token, when the llm model says
    stop: str | int | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of every successful generation: choice 0's finish reason, the prompt's
    tokens and every choice's completion tokens together; ``choices`` says how each choice
    ended (empty: one choice, as the fields say)."""

    finish_reason: str  # one of trident.contract.FINISH_REASONS
    prompt_tokens: int
    completion_tokens: int
    choices: tuple[ChoiceEnd, ...] = ()
    cached_tokens: int | None = None  # of prompt_tokens, from the engine's prefix cache (when it says)
    # each prompt's ids as the engine got them, when asked for (TextRequest.return_prompt_token_ids)
    prompt_token_ids: tuple[tuple[int, ...], ...] | None = None
    # each prompt's tokens with their log-probabilities, when asked for (SamplingParams.prompt_logprobs)
    prompt_logprobs: tuple[PromptLogprobs, ...] | None = None

    @property
    def ends(self) -> tuple[ChoiceEnd, ...]:
        """Every choice's end, by index."""
        return self.choices or (ChoiceEnd(0, self.finish_reason, self.completion_tokens),)

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    @property
    def openai_usage(self) -> dict[str, Any]:
        """OpenAI's usage: ``prompt_tokens_details.cached_tokens`` too, when the engine said."""
        usage: dict[str, Any] = self.usage
        if self.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage


@dataclass(frozen=True, slots=True)
class Admitted:
    """The server validated and queued the request; text follows. Optional: a backend whose
    server cannot say so yields its first text (or error) instead. ``server`` names the server
    that took it and ``prompt_tokens`` the prompt's token count, when it says."""

    server: str | None = None
    prompt_tokens: int | None = None
    # each prompt's ids as the engine got them, when asked for (TextRequest.return_prompt_token_ids)
    prompt_token_ids: tuple[tuple[int, ...], ...] | None = None
    # with several prompts (gateway.prompts): each one's token count
    prompts_tokens: tuple[int, ...] | None = None


ADMITTED = Admitted()

Event = TextDelta | Finished | Admitted


@runtime_checkable
class Generation(Protocol):
    """One running generation: iterate it for events, ``close()`` it when done.

    Streaming contract:

    * Iteration may first yield :data:`ADMITTED` (at most once, before anything else): the
      server accepted the request (it passed every check a request can fail on before it
      runs). Then zero or more :class:`TextDelta` and exactly one :class:`Finished`, which is
      last. Concatenating the deltas of one choice (``index``; several with ``sampling.n``)
      gives its whole generated text, whether or not ``params.stream`` was set (without it, a
      backend may yield each choice's text as one delta).
    * Failures are raised from the iterator as ``gateway.errors.ClientError`` (e.g. a prompt too
      long for the context: 400 with ``param``) or ``ServerError`` (503 with ``Retry-After`` when
      the server is unreachable or not ready, else 500), at any point: before the first event
      (the route then still answers with that HTTP status) or after some deltas.
    * Reading the next event blocks until it arrives; under gunicorn's gevent worker this blocks
      only the calling greenlet. Iteration may happen on another thread (greenlet) than the one
      that called ``generate``, but never on two at once.
    * ``close()`` may be called at any time, from any thread, more than once. It cancels the
      generation on the server (a client that went away must not cost more tokens) and makes a
      blocked iteration end soon, by stopping or raising; after ``close()`` nothing more is
      read.
    """

    def __iter__(self) -> Iterator[Event]: ...

    def close(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """Runs generations for the gateway.

    ``generate`` starts one generation and returns without waiting for its output; it may raise
    the same typed errors as iteration. ``params.model`` is the public model name. ``check_ready`` returns when the server and every served
    model are ready and raises a 503 ``ServerError`` (with the reason) otherwise; it must answer
    within a short deadline, never hang.
    """

    def generate(self, params: TextRequest, *, request_id: str) -> Generation: ...

    def check_ready(self) -> None: ...

    def tokenize(self, model: str, text: str, *, add_special_tokens: bool, request_id: str) -> list[int]:
        """The ids the served model's tokenizer gives ``text`` (a prompt of it is given the same);
        raises the typed errors."""

    def tokenize_pieces(self, model: str, text: str, *, add_special_tokens: bool,
                        request_id: str) -> tuple[list[int], list[str]]:
        """As :meth:`tokenize`, with each id's piece of the vocabulary (vLLM's ``token_strs``)."""

    def detokenize(self, model: str, ids: list[int], *, request_id: str) -> str:
        """The text of ``ids`` (special tokens included); raises the typed errors."""

    def limits(self, model: str) -> ModelLimits:
        """The limits of a served (backend-side) model, as the server states them; may raise a
        503 ``ServerError`` when it cannot be asked. Cached: cheap after the first call."""
