"""The ``llm`` Triton model's request loop, as plain code (``model.py`` only adapts Triton to it).

One request goes through three stages:

1. **accept** (in ``execute``, on Triton's thread): parse and validate the inputs, tokenize,
   check the context. A bad request is answered with a tagged error at once; a good one gets an
   *admission* response when the caller asked for it (request parameter
   :data:`ADMISSION_PARAMETER`: the gateway does, so it can answer HTTP 200 and start SSE
   heartbeats while the request waits for the engine) and joins the work queue.
2. **wait for a worker**: at most ``max_concurrent`` requests stream from the engine at once,
   one worker thread each (an engine stream blocks its thread; see "Thread budget" below).
3. **stream** from the engine model (``EngineClient``: over Triton's gRPC endpoint in the
   model, trident.engine_grpc): detokenize, hold back possible stop sequences,
   stop the engine request on a match, send text deltas, then the final response with
   ``finish_reason`` and token counts. A choice's first text goes out at once, later ones every
   ``stream_interval`` engine tokens (1 by default: every token as it comes).

Cancellation at every stage: a watcher thread polls ``is_cancelled()`` of every request that has
not heard from the engine for ``cancel_check_interval`` seconds (queued here, queued in the
engine, in a long prefill); workers poll it as tokens arrive, at the same rate. A request with
a cancel token (the gateway's) is polled :data:`TOKEN_POLL_FACTOR` times less often: its client
leaving reaches it as a cancel request, and the poll is only the fallback. A cancelled
request still queued here is dropped when a worker takes it; one at the engine gets the engine's
``stop`` request (TensorRT-LLM's way, by request id; the CPU engine shares it), which also
removes it from the engine's waiting queue, so it never reaches prefill.

Thread budget (why requests beyond ``max_concurrent`` wait here): each engine stream blocks
one worker thread until its final response, and a request that waits here costs nothing at the
engine and is dropped before reaching it when its client leaves. The engine's own queue stays
the place where requests wait for a slot (TensorRT-LLM's scheduler, the CPU engine's waiting
list); ``max_concurrent`` (config.pbtxt's ``max_concurrent_requests``, 256 by default) only
bounds this model's threads.

Workers never die: every failure, including a failing ``send`` on a request whose client is
gone, ends that request only.

Several instances of the model (one stub process each) share cancel requests through a
:class:`trident.cancel_board.CancelBoard`: Triton may hand a cancel request to an instance that
does not hold the request it names.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .contract import (
    SERVER_ERROR,
    InvalidRequest,
    TaggedError,
    TextRequest,
    FEATURE_CACHED_TOKENS,
    FEATURE_MIN_TOKENS_STOPS,
    context_error,
    detokenize_outputs,
    prompt_chars_error,
    read_llm_inputs,
    read_tokenizer_inputs,
    tag_error,
    token_ids_error,
    tokenize_outputs,
)
from .cancel_board import CancelBoard
from .engine_tensors import engine_inputs
from .generation import TextGeneration, TokenLogprob, prompt_tokens
from . import grammar
from .grammar import check_guide
from .llm_io import EngineClient, EngineFailure, LlmSettings, Request, engine_outputs, prompt_logprob_tensors

log = logging.getLogger("trident.llm")

#: Seconds a cancel request that found no job is remembered, for the job it names to arrive.
EARLY_CANCEL_SECONDS = 10.0
#: How many times less often ``is_cancelled()`` is polled for a request that carries a cancel token
#: (the gateway sends one with every request, and a cancel request when the client leaves): a
#: poll is a round trip to Triton's process (about 23 us of this process's CPU, measured), and
#: for those requests it only catches what the cancel request cannot (the gateway's last-resort
#: cancel of the call, a gateway process that died).
TOKEN_POLL_FACTOR = 5


class _AwaitGuides(Exception):
    """The request has a guide and XGrammar is not loaded yet (LlmService._await_guides)."""


@dataclasses.dataclass(eq=False)
class Job:
    """A request accepted by the service, from the queue to its last response."""

    request: Request
    text: TextRequest
    tensors: dict[str, np.ndarray]
    prompt_tokens: int
    engine_id: str
    input_ids: list[int] = dataclasses.field(default_factory=list, repr=False)  # the prompt's, as sent
    truncated: bool = False  # truncate_prompt_tokens cut the prompt: input_ids are what is left of it
    last_check: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False
    at_engine: bool = False
    stop_sent: bool = False
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)
    # Guards the last response against is_cancelled(): the Python backend (24.10) reads the
    # request's response factory, which Triton frees with the final response; a poll after it
    # crashed Triton (use after free in TRITONBACKEND_ResponseFactoryIsCancelled).
    final_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)
    closed: bool = False  # the final response was sent
    token: Optional[str] = None  # its cancel token (trident.contract CANCEL_TOKEN_PARAMETER)
    cancel_requested: bool = False  # a cancel request named it: its client is gone
    via_board: bool = False  # ... which reached another instance, and came here by its board
    running: bool = False  # the engine has answered (it holds a slot for it)
    # Choice index -> its generated tokens already counted in num_output_tokens
    reported: dict[int, int] = dataclasses.field(default_factory=dict, repr=False)


def model_end_ids(model_dir: str | Path) -> tuple[int, ...]:
    """The end tokens of the model's ``generation_config.json`` (``eos_token_id``: one id or a
    list): transformers' ``generate`` and vLLM end a generation at any of them. Llama 3.x lists
    ``<|end_of_text|>``, ``<|eom_id|>`` and ``<|eot_id|>``; Qwen2.5 / Qwen3 ``<|im_end|>`` and
    ``<|endoftext|>``; the tokenizer names one. () without the file."""
    path = Path(model_dir) / "generation_config.json"
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return ()
    values = value if isinstance(value, list) else [value]
    return tuple(sorted({v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0}))


class LlmService:
    """Accepts requests (``accept``), streams them from the engine on worker threads."""

    def __init__(self, settings: LlmSettings, tokenizer: Any, engine: "EngineClient", *,
                 clock: Callable[[], float] = time.monotonic, board: Optional[CancelBoard] = None,
                 end_ids: Iterable[int] = (), load_guides: Callable[[], None] = grammar.load,
                 guides_loaded: Optional[bool] = None) -> None:
        """``load_guides`` imports XGrammar for :func:`check_guide`, at the first request with a
        guide unless ``guides_loaded`` (by default: whether it is imported already)."""
        self.settings = settings
        self.tokenizer = tokenizer
        self.engine = engine
        self.clock = clock
        # The other instances' cancel requests (None with one instance).
        self.board = board
        self.end_id = tokenizer.eos_token_id
        # The model's other end tokens (model_end_ids): a choice ends at them as at end_id.
        self.end_ids = frozenset(end_ids) - {self.end_id}
        # Token ids are below it: the config's vocab_size, else the tokenizer's (read once).
        self.vocab_size = settings.limits.vocab_size or len(tokenizer)
        self.limits = dataclasses.replace(settings.limits, vocab_size=self.vocab_size)  # what requests are checked against
        # The engine says how many prompt tokens its prefix cache served (the CPU engine's feature).
        self.report_cached = FEATURE_CACHED_TOKENS in settings.limits.features
        # The engine bans the stop tokens (not only its end id) before min_tokens (CPU engine).
        self.ban_stops = FEATURE_MIN_TOKENS_STOPS in settings.limits.features
        # A token's text on its own (logprobs' alternatives); the same few ids come back often.
        self._token_text = functools.lru_cache(maxsize=65536)(
            lambda token: tokenizer.decode([token], skip_special_tokens=False))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id
        # Engine request ids are decimal strings: TensorRT-LLM's backend matches a "stop"
        # request to the running one by this id.
        self._ids = itertools.count(random.randrange(1, 2**31) << 20)
        self._queue: queue.SimpleQueue[Optional[Job]] = queue.SimpleQueue()
        self._jobs: set[Job] = set()  # accepted and not finished; the watcher's list
        self._jobs_lock = threading.Lock()
        self._last_sweep = float("-inf")
        # Cancel requests that came before the request they name (two gRPC calls, no order):
        # token -> when, kept for EARLY_CANCEL_SECONDS.
        self._early_cancels: dict[str, float] = {}
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        # Requests with a guide that came before XGrammar was loaded: accepted again once it is.
        self._load_guides = load_guides
        self._guides_ready = grammar.loaded() if guides_loaded is None else guides_loaded
        self._guides_lock = threading.Lock()
        self._guides_waiting: list[Request] = []
        self._guides_loader: Optional[threading.Thread] = None
        self.counters = dict.fromkeys(("accepted", "rejected", "cancelled_queued", "cancelled_at_engine",
                                       "completed", "failed", "cancel_requests", "cancels_posted",
                                       "cancels_from_board", "pings", "tokenize",
                                       "detokenize"), 0)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        # Daemon threads: a worker still waiting on the engine must not hold the stub process
        # open at unload.
        for i in range(self.settings.max_concurrent):
            self._threads.append(threading.Thread(target=self._worker, name=f"llm-{i}", daemon=True))
        self._threads.append(threading.Thread(target=self._watch, name="llm-cancel-watch", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        for _ in range(self.settings.max_concurrent):
            self._queue.put(None)
        if self.board is not None:
            self.board.close()

    # -- stage 1: accept (Triton's execute thread) -----------------------------------------------

    def accept(self, request: Request) -> None:
        """Validate, answer errors at once, acknowledge, queue. Never raises."""
        # Unreadable parameters: a generation request, validated below.
        ping, target = _read(request, "pings", False), _read(request, "cancels", None)
        if ping:  # answered here, ahead of every queue: a probe of this stub and Triton's stream path
            self.counters["pings"] += 1
            _safely(request.send_pong)
            return
        if target is not None:
            self._cancel_request(target)
            _safely(request.close)
            return
        tool = _read(request, "tokenizer_call", None)
        if tool is not None:  # answered here too: the tokenizer is quick, and no engine is involved
            self.counters[tool] += 1
            try:
                outputs = self._tokenize(request) if tool == "tokenize" else self._detokenize(request)
            except TaggedError as exc:
                _safely(request.send_error, exc.tagged())
                return
            except Exception:
                log.exception("llm: a %s request failed", tool)
                _safely(request.send_error, tag_error(SERVER_ERROR, f"internal error in {tool}"))
                return
            _safely(request.send_outputs, outputs)
            return
        try:
            job = self._prepare(request)
        except _AwaitGuides:
            self._await_guides(request)
            return
        except TaggedError as exc:
            self.counters["rejected"] += 1
            _safely(request.send_error, exc.tagged())
            return
        except Exception:  # a bug, not the client's fault: a 500 with no internals
            log.exception("llm: accepting a request failed")
            self.counters["failed"] += 1
            _safely(request.send_error, tag_error(SERVER_ERROR, "internal error while accepting the request"))
            return
        self.counters["accepted"] += 1
        # The admission response; asked for by the gateway, or sent for the prompt's ids alone.
        ids = job.input_ids if job.text.return_prompt_token_ids else None
        if (request.wants_admission() or ids is not None) and not _safely(request.send_admission, job.prompt_tokens,
                                                                           ids):
            return  # the client is already gone
        with self._jobs_lock:
            if job.token is not None and self._early_cancels.pop(job.token, None) is not None:
                job.cancel_requested = True
            self._jobs.add(job)
        if job.token is not None and not job.cancel_requested and self._take_from_board(job.token):
            job.cancel_requested = job.via_board = True  # another instance got its cancel request first
        self._queue.put(job)

    def _await_guides(self, request: Request) -> None:
        """A request with a guide before XGrammar is loaded (a stub's first): it waits, unanswered,
        while a thread of its own imports XGrammar (and torch: about 1.3 s of CPU), then is
        accepted again; the execute thread goes on with other requests meanwhile."""
        with self._guides_lock:
            if not self._guides_ready:
                self._guides_waiting.append(request)
                if self._guides_loader is None:
                    self._guides_loader = threading.Thread(target=self._load_guides_then_accept,
                                                           name="llm-load-xgrammar", daemon=True)
                    self._guides_loader.start()
                return
        self.accept(request)  # loaded since its check

    def _load_guides_then_accept(self) -> None:
        started = time.monotonic()
        try:
            self._load_guides()
        except Exception:  # its requests then fail as internal errors (check_guide cannot import it)
            log.exception("llm: loading XGrammar failed")
        else:
            log.info("llm: XGrammar loaded for the first request with a guide in %.1f s", time.monotonic() - started)
        with self._guides_lock:
            self._guides_ready = True
            waiting, self._guides_waiting = self._guides_waiting, []
        for request in waiting:
            self.accept(request)

    def _cancel_request(self, token: str) -> None:
        """A cancel request for the job with this token: it is ended as if its client had been
        found gone (at its next poll, within ``cancel_check_interval``)."""
        now = self.clock()
        with self._jobs_lock:
            jobs = [job for job in self._jobs if job.token == token]
            if not jobs:
                self._early_cancels = {t: at for t, at in self._early_cancels.items()
                                       if now - at < EARLY_CANCEL_SECONDS}
                self._early_cancels[token] = now
            for job in jobs:
                job.cancel_requested = True
        self.counters["cancel_requests"] += 1
        if not jobs and self.board is not None:
            # Not here: maybe at another instance (or not arrived yet: then the note above, or
            # the board, ends it when it comes).
            try:
                if self.board.post(token):
                    self.counters["cancels_posted"] += 1
            except OSError:
                log.exception("llm: could not post the cancel request for token %r", token)

    def _tokenize(self, request: Request) -> dict[str, np.ndarray]:
        """``/tokenize``: the text's ids, as a prompt of that text is given them; a text longer
        than any prompt the model can take is refused (it would hold this thread)."""
        text, _ = read_tokenizer_inputs(request.input)
        limit = self.settings.limits.max_prompt_chars
        if limit and len(text) > limit:
            raise InvalidRequest(prompt_chars_error(len(text), limit), param="prompt")
        special = _read(request, "adds_special_tokens", True)
        ids = self.tokenizer(text, add_special_tokens=special).input_ids
        strs = self.tokenizer.convert_ids_to_tokens(ids) if _read(request, "wants_token_strs", False) else None
        return tokenize_outputs(ids, strs)

    def _detokenize(self, request: Request) -> dict[str, np.ndarray]:
        """``/detokenize``: the ids' text, special tokens included."""
        _, ids = read_tokenizer_inputs(request.input)
        trouble = token_ids_error(ids, self.vocab_size, param="tokens")
        if trouble is not None:
            raise InvalidRequest(trouble, param="tokens")
        return detokenize_outputs(self.tokenizer.decode(list(ids)), len(ids))

    def _prepare(self, request: Request) -> Job:
        text = read_llm_inputs(request.input)
        limits = self.limits
        text.sampling.check(limits)
        new_tokens = text.sampling.engine_tokens
        if text.prompt_ids is not None:  # used as given: ids of this model
            if (trouble := token_ids_error(text.prompt_ids, self.vocab_size)) is not None:
                raise InvalidRequest(trouble, param="prompt")
            input_ids = list(text.prompt_ids)
        else:
            if limits.max_prompt_chars and len(text.prompt) > limits.max_prompt_chars:
                raise InvalidRequest(prompt_chars_error(len(text.prompt), limits.max_prompt_chars), param="prompt")
            input_ids = self.tokenizer(text.prompt, add_special_tokens=text.add_special_tokens).input_ids
        kept = text.sampling.kept_prompt_tokens(len(input_ids), limits.max_context)
        truncated = kept < len(input_ids)
        if truncated:  # truncate_prompt_tokens: the last ones
            input_ids = input_ids[len(input_ids) - kept:]
        if len(input_ids) + new_tokens > limits.max_context:
            raise InvalidRequest(context_error(len(input_ids), new_tokens, limits.max_context), param="prompt")
        bad_ids = [self.tokenizer(w, add_special_tokens=False).input_ids for w in text.sampling.bad_words]
        if text.sampling.guide is not None:
            if not self._guides_ready:
                raise _AwaitGuides
            check_guide(text.sampling.guide)  # a schema XGrammar cannot take: 400 here, on CPU and GPU
        # What ends a choice besides the end id (TextGeneration): banned with it before min_tokens.
        # (With ignore_eos the model's other end tokens end nothing: only stop_token_ids then.)
        others = self.end_ids if text.end_id is None and not text.sampling.ignore_eos else ()
        stop_ids = (*text.sampling.stop_token_ids, *others)
        tensors = engine_inputs(text.sampling, input_ids=input_ids,
                                end_id=self.end_id if text.end_id is None else text.end_id,
                                pad_id=self.pad_id if text.pad_id is None else text.pad_id,
                                bad_words_ids=[b for b in bad_ids if b],
                                vocab_size=self.vocab_size, report_cached=self.report_cached,
                                min_tokens_stop_ids=stop_ids if self.ban_stops else ())
        return Job(request=request, text=text, tensors=tensors, prompt_tokens=len(input_ids),
                   engine_id=str(next(self._ids)), last_check=self.clock(), token=request.cancel_token(),
                   input_ids=list(input_ids), truncated=truncated)

    # -- cancellation ---------------------------------------------------------------------------

    def _poll(self, job: Job, *, force: bool = False) -> bool:
        """True when the job is (now found) cancelled; polls the client at most once per interval."""
        if job.cancelled:
            return True
        if job.cancel_requested:
            self._cancel(job)
            return True
        now = self.clock()
        interval = self.settings.cancel_check_interval * (TOKEN_POLL_FACTOR if job.token is not None else 1)
        if not force and now - job.last_check < interval:
            return False
        job.last_check = now
        with job.final_lock:
            if job.closed:
                return job.cancelled
            try:
                gone = job.request.is_cancelled()
            except Exception:  # a broken probe: nobody can receive the answer
                log.exception("llm: is_cancelled() failed for %s", job.engine_id)
                gone = True
        if gone:
            self._cancel(job)
        return gone

    def _cancel(self, job: Job) -> None:
        with job.lock:
            if job.cancelled:
                return
            job.cancelled = True
            at_engine = job.at_engine
        self.counters["cancelled_at_engine" if at_engine else "cancelled_queued"] += 1
        log.info("request %s cancelled by the client (%s, %s)", job.engine_id,
                 "at the engine" if at_engine else "before reaching the engine",
                 ("cancel request via another instance" if job.via_board else "cancel request")
                 if job.cancel_requested else "found gone")
        if at_engine:
            if job.running:
                self._sweep_waiting()
            self._stop_engine(job)
        elif job.cancel_requested:
            # Still queued here: end its call now (a worker that takes it later drops it).
            _final(job, job.request.close)

    def _sweep_waiting(self) -> None:
        """Before a running request's stop frees a slot: stop the requests waiting in the engine
        whose clients are gone too (clients often leave together), so that the slot never goes
        to one of them. At most once per 10 ms."""
        now = self.clock()
        with self._jobs_lock:
            if now - self._last_sweep < 0.01:
                return
            self._last_sweep = now
            waiting = [j for j in self._jobs if j.at_engine and not j.running and not j.cancelled]
        if self.board is not None and waiting:  # their cancel requests may be at another instance
            self._read_board(waiting)
        for job in waiting:  # a job with a cancel token hears of its client by its cancel request
            self._poll(job, force=job.token is None)

    def _stop_engine(self, job: Job) -> None:
        with job.lock:
            if job.stop_sent:
                return
            job.stop_sent = True
        try:
            self.engine.stop(job.engine_id)
        except Exception:
            log.exception("llm: could not stop engine request %s", job.engine_id)

    def _take_from_board(self, token: str) -> bool:
        """True when another instance posted ``token`` (the post is then removed)."""
        if self.board is None:
            return False
        try:
            if not self.board.has(token):
                return False
            self.board.take(token)
        except OSError:
            log.exception("llm: could not read the cancel board")
            return False
        self.counters["cancels_from_board"] += 1
        return True

    def _read_board(self, jobs: list[Job]) -> None:
        """Mark this instance's jobs whose cancel request reached another instance."""
        try:
            posted = self.board.posted()
        except OSError:
            log.exception("llm: could not read the cancel board")
            return
        if not posted:
            return
        with self._jobs_lock:
            found = [job for job in jobs if job.token in posted and not job.cancel_requested]
            for job in found:
                job.cancel_requested = job.via_board = True
        for job in found:
            self.counters["cancels_from_board"] += 1
            try:
                self.board.take(job.token)
            except OSError:
                pass  # it expires

    def _watch(self) -> None:
        interval = self.settings.cancel_check_interval
        while not self._stopping.wait(max(interval / 2, 0.01)):
            with self._jobs_lock:
                jobs = list(self._jobs)
            if self.board is not None:
                self._read_board(jobs)
            for job in jobs:
                try:
                    self._poll(job)
                except Exception:  # never let the watcher die
                    log.exception("llm: cancellation watch failed for %s", job.engine_id)

    # -- stages 2 and 3: workers ----------------------------------------------------------------

    def _worker(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                self._serve(job)
            except BaseException:  # never let a worker die: the request ends, the thread stays
                log.exception("llm: request %s failed", job.engine_id)
                self.counters["failed"] += 1
                _final(job, job.request.send_error, tag_error(SERVER_ERROR, "internal error during generation"))
            finally:
                with self._jobs_lock:
                    self._jobs.discard(job)

    def _serve(self, job: Job) -> None:
        self._poll(job)  # a request whose client is gone by now never reaches the engine
        with job.lock:
            cancelled = job.cancelled
            job.at_engine = not cancelled
        if cancelled:
            _final(job, job.request.close)
            return
        try:
            self._generate(job)
        except EngineFailure as exc:  # already tagged by the engine model (e.g. queue full)
            if job.cancelled:
                _final(job, job.request.close)
            else:
                self.counters["failed"] += 1
                _final(job, job.request.send_error, str(exc))
        except TaggedError as exc:
            _final(job, job.request.send_error, exc.tagged())

    def _generate(self, job: Job) -> None:
        request, text = job.request, job.text
        n = text.sampling.n
        # A request that names its own end id (direct gRPC) ends at it alone.
        end_ids = self.end_ids if text.end_id is None else frozenset()
        gens = [TextGeneration(self.tokenizer, text, prompt_tokens=job.prompt_tokens, index=i,
                               token_text=self._token_text, end_ids=end_ids) for i in range(n)]
        # A choice's released text and tokens wait here until they are sent: without streaming,
        # for its last response; streaming, for every ``stream_interval``-th engine token (its
        # first text at once).
        parts: list[list[str]] = [[] for _ in range(n)]
        held: list[list[TokenLogprob]] = [[] for _ in range(n)]
        unsent = [0] * n  # engine tokens of each choice since its last streamed response
        started = [False] * n  # the choice has streamed something
        interval = self.settings.stream_interval
        stopping = False
        # echo: every choice's text starts with the prompt; with logprobs its tokens come from the
        # engine's first response (the prompt's log-probabilities)
        echo_tokens = text.sampling.echo and text.sampling.logprobs is not None
        if text.sampling.echo and not echo_tokens:
            prompt = self._prompt_text(job)
            parts = [[prompt] for _ in range(n)]
        prompt_logprobs = text.sampling.prompt_logprobs  # k, until the prompt's response is sent
        # max_new_tokens 0 (echo only: the prompt scored): the engine's one token is not the reply's
        scoring = text.sampling.max_new_tokens == 0
        outputs = engine_outputs(text.sampling, cached_tokens=self.report_cached)
        for chunk in self.engine.stream(job.tensors, job.engine_id, outputs):
            job.running = True
            if chunk.error is not None:
                raise EngineFailure(chunk.error)
            if chunk.cached_tokens is not None:  # the engine's final response: choices not ended yet
                for gen in gens:
                    gen.cached_tokens = chunk.cached_tokens
            if prompt_logprobs is not None:  # before any text: the engine's first response has them
                arrays = prompt_logprob_tensors(job.input_ids, chunk, prompt_logprobs, self._token_text)
                prompt_logprobs = None
                if not _safely(request.send_outputs, arrays, final=False):
                    self._cancel(job)  # the response stream is gone: so is the client
                    stopping = True
            if echo_tokens:
                echo_tokens = False
                if chunk.context_log_probs is None:
                    raise EngineFailure("the engine sent no log-probabilities of the prompt (echo)")
                k = text.sampling.logprobs  # the engine's rows hold prompt_logprobs' k when that is more
                tokens = prompt_tokens(self.tokenizer, job.input_ids, chunk.context_log_probs,
                                       _first(chunk.context_top_ids, k), _first(chunk.context_top_log_probs, k),
                                       token_text=self._token_text)
                prompt = "".join(t.text for t in tokens)
                parts, held = [[prompt] for _ in range(n)], [list(tokens) for _ in range(n)]
            if stopping or scoring or not 0 <= chunk.sequence_index < n:
                continue  # drain the engine stream up to its final response
            gen = gens[chunk.sequence_index]
            if gen.ended:
                continue  # a choice ended by a stop sequence: the engine may still run it
            delta = gen.push(chunk.token_ids, chunk.log_probs, chunk.top_ids, chunk.top_log_probs)
            tokens = gen.take_tokens() if gen.logprobs else None
            if self._poll(job):
                stopping = True
                continue
            i = gen.index
            parts[i].append(delta)
            if tokens:
                held[i].extend(tokens)
            unsent[i] += len(chunk.token_ids)
            if gen.stopped and n > 1:  # this choice is done; the others go on
                if not self._end_choice(job, gen, parts, held, "", None, last=False):
                    stopping = True
                if all(g.ended or g.stopped for g in gens):
                    stopping = True
                    self._stop_engine(job)
                continue
            if gen.stopped:
                stopping = True
                self._stop_engine(job)
            # The engine's final response (both engines put the last token in it) is answered by
            # the choice's last response alone: it carries the text, one message fewer through
            # this stub, Triton and the gateway for every request.
            if text.stream and not chunk.final and (unsent[i] >= interval or not started[i]):
                out = "".join(parts[i])
                if out or held[i]:
                    out_tokens = held[i] if gen.logprobs else None
                    parts[i], held[i], unsent[i], started[i] = [], [], 0, True
                    if not _safely(request.send_text, out, index=i, n=n, tokens=out_tokens,
                                   counts=self._counts(job, gen)):
                        self._cancel(job)  # the response stream is gone: so is the client
                        stopping = True
        if job.cancelled or self._poll(job):
            _final(job, request.close)  # Triton may refuse a send on a cancelled request
            return
        left = [g for g in gens if not g.ended]
        for k, gen in enumerate(left):
            tail = gen.finish()
            tokens = gen.take_tokens() if gen.logprobs else None
            if not self._end_choice(job, gen, parts, held, tail, tokens, last=k == len(left) - 1):
                return
        if not left:  # every choice ended early: the request still needs its final flag
            _final(job, request.close)
            return
        self.counters["completed"] += 1

    def _end_choice(self, job: Job, gen: TextGeneration, parts: list[list[str]], held: list[list[TokenLogprob]],
                    tail: str, tokens: Optional[list[TokenLogprob]], *, last: bool) -> bool:
        """Send a choice's last response (the request's last one when ``last``), with whatever of
        it was not sent yet."""
        gen.ended = True
        if gen.finish_reason is None:  # ended by a stop sequence before the engine finished it
            gen.finish()
        tail = "".join(parts[gen.index]) + tail
        if job.text.include_prompt and not job.text.sampling.echo:  # not streaming: the choice's whole text
            tail = self._prompt_text(job) + tail
        tokens = held[gen.index] + (tokens or []) if gen.logprobs else None
        parts[gen.index], held[gen.index] = [], []
        counts = self._counts(job, gen)
        if last:
            return _final(job, job.request.send_final, tail, gen, tokens=tokens, counts=counts)
        if not _safely(job.request.send_final, tail, gen, tokens=tokens, final=False, counts=counts):
            self._cancel(job)
            return False
        return True

    @staticmethod
    def _counts(job: Job, gen: TextGeneration) -> Optional[dict[str, int]]:
        """NVIDIA's token counts for the response of ``gen``'s choice about to be sent, those the
        request asked for: the prompt's tokens, and the generated tokens not counted in an
        earlier response of that choice (so they add up to its completion_tokens)."""
        text = job.text
        if not (text.return_num_input_tokens or text.return_num_output_tokens):
            return None
        counts = {}
        if text.return_num_input_tokens:
            counts["num_input_tokens"] = job.prompt_tokens
        if text.return_num_output_tokens:
            counts["num_output_tokens"] = gen.completion_tokens - job.reported.get(gen.index, 0)
            job.reported[gen.index] = gen.completion_tokens
        return counts

    def _prompt_text(self, job: Job) -> str:
        """The prompt as text: as given, or its ids decoded (special tokens included); a prompt
        that truncate_prompt_tokens cut is the text of the tokens left."""
        text = job.text
        if job.truncated:
            return self.tokenizer.decode(job.input_ids)
        return text.prompt if text.prompt_ids is None else self.tokenizer.decode(list(text.prompt_ids))


def _final(job: Job, send: Callable[..., None], *args: Any, **kwargs: Any) -> bool:
    """Send a job's final response, once; never while its is_cancelled() is being asked."""
    with job.final_lock:
        if job.closed:
            return False
        job.closed = True
        return _safely(send, *args, **kwargs)


def _read(request: Request, name: str, default: Any) -> Any:
    """``request.<name>()``, or ``default`` when that fails."""
    try:
        return getattr(request, name)()
    except Exception:
        return default


def _first(rows: Optional[Sequence[Sequence]], k: int) -> Optional[list]:
    """The first ``k`` of each row (alternatives best first), or None."""
    return None if rows is None else [row[:k] for row in rows]


def _safely(send: Callable[..., None], *args: Any, **kwargs: Any) -> bool:
    """Call a response function; a failure (the client is gone) is logged, never raised."""
    try:
        send(*args, **kwargs)
        return True
    except Exception as exc:
        log.info("llm: %s failed: %s", getattr(send, "__name__", "send"), exc)
        return False
