"""The engine: a thread running continuous (in-flight) batching.

Each loop iteration: poll cancellations, admit waiting requests into the running batch, then run
ONE batched step for every active sequence and emit. Finished sequences leave at once. What a
step is depends on the model (see the two batches): the int4 model runs one kernel call over
every decoding sequence plus chunks of the prompts being prefilled, on a paged KV cache with
prefix reuse (paged_batch.py); the torch-ops model prefills each prompt when it is admitted, then
decodes all sequences from a contiguous slot cache (slot_batch.py).

Waiting requests are admitted by priority, then in arrival order (waiting.py). A request with
num_return_sequences n > 1 is admitted only when n slots are free (nothing passes the head of the
queue, so smaller requests do not starve it), prefilled once, then forked into n sequences sharing the prompt's KV
(sequence.Group).
"""
from __future__ import annotations

import collections
import logging
import threading
import time

import torch

from trident.contract import SERVER_ERROR, UNAVAILABLE

from .config import KV_CACHE_DTYPES, EngineConfig
from .guided import GuideCompiler
from .kv_cache import KVCache
from .paged_batch import PagedBatch
from .paged_cache import PagedKVCache
from .request import (
    EngineError,
    EngineStoppedError,
    GenerationOutput,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
)
from .sampling import RowSampling, TokenLogprobs, sample_step
from .sequence import OnOutput, Sequence, fork_leaders
from .slot_batch import SlotBatch
from .waiting import WaitingQueue
from .weights import load_model

log = logging.getLogger("trident.engine")

STOP_MEMORY = 5.0  # seconds a stop for an unknown request id is kept (see Engine._early_stops)
#: Seconds the loop may go without finishing a turn while it has requests before health() says
#: it is stuck. A turn is one prefill of at most prefill_token_budget tokens and one decode
#: step: well under a second here (docs/cpu_engine.md), so a minute is no busy engine.
STALL_LIMIT = 60.0


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self._threads = torch.get_num_threads()  # for large steps; see EngineConfig.small_batch_size
        self._threads_now = 0
        self.model, self.config = load_model(config)  # int4 may fall back to float32
        self.max_seq_len = self.model.max_seq_len
        self.batch = self._make_batch()
        self.cache = self.batch.cache
        self.guides = GuideCompiler(config.xgrammar_tokenizer_info_path, vocab_size=self.model.config.vocab_size,
                                    cache_bytes=config.guide_cache_mb << 20)
        self._cond = threading.Condition()
        self._waiting = WaitingQueue()  # guarded by _cond; by priority, then arrival
        self._rejected: collections.deque[tuple[GenerationRequest, OnOutput, EngineError]] = collections.deque()
        self._cancel_ids: set[str] = set()  # guarded by _cond
        # Stops for ids the engine did not hold yet (the stop overtook its request): a request
        # submitted with such an id within STOP_MEMORY seconds is cancelled, never prefilled.
        self._early_stops: dict[str, float] = {}  # engine thread only
        self._active = self.batch.sequences  # engine thread only
        self._unforked: set[Sequence] = set()  # admitted group leaders still prefilling (engine thread)
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Since when the loop owes progress (guarded by _cond): the start of its turn, or the first
        # submit while it waited; None while it waits with nothing to do.
        self._owed_since: float | None = None
        self._counters = dict.fromkeys(
            ("steps", "tokens_generated", "requests_submitted", "requests_prefilled", "requests_finished",
             "requests_cancelled", "requests_failed", "requests_rejected"), 0
        )

    def _make_batch(self) -> PagedBatch | SlotBatch:
        c, m = self.config, self.model.config
        common = dict(max_batch_size=c.max_batch_size, use_threads=self._use_threads,
                      prefill_token_budget=c.prefill_token_budget)
        if self.model.batch_invariant:  # the fused int4 model
            cache = PagedKVCache(num_layers=m.num_layers, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                                 max_slots=c.max_batch_size, max_seq_len=self.max_seq_len, block_size=c.kv_block_size,
                                 dtype=KV_CACHE_DTYPES[c.kv_cache_dtype], cache_bytes=c.prefix_cache_mb << 20,
                                 reuse=c.prefix_reuse)
            return PagedBatch(self.model, cache, **common)
        cache = KVCache()
        cache.setup(num_layers=m.num_layers, max_batch_size=c.max_batch_size, num_kv_heads=m.num_kv_heads,
                    max_seq_len=self.max_seq_len, head_dim=m.head_dim, dtype=c.torch_dtype)
        return SlotBatch(self.model, cache, **common)

    # ---- public API (any thread) ----

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="trident-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop, join the thread; requests still queued or running get an error output."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._fail_all("engine stopped")

    def submit(self, request: GenerationRequest, on_output: OnOutput) -> None:
        """Queue a request; on_output is called from the engine thread.

        Raises QueueFullError when max_queue_size requests are already waiting and
        EngineStoppedError after stop(). An invalid request is not raised here: it gets one error
        output (finish_reason "error", error_type "invalid_request_error") from the engine thread.
        """
        error: EngineError | None = None
        matchers = None
        try:
            request.validate(vocab_size=self.model.config.vocab_size, max_seq_len=self.max_seq_len,
                             max_batch_size=self.config.max_batch_size)
            if request.sampling.guide is not None:  # here, never in the engine's loop (milliseconds)
                request.grammar = self.guides.compile(request.sampling.guide)
                matchers = self.guides.matchers(request.grammar, request.sampling.n, request.end_id)
        except InvalidRequestError as e:
            error = e
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the engine is stopped")
            if request.request_id and request.request_id in self._early_stops:
                self._cancel_ids.add(request.request_id)  # polled before the next admission
            if error is not None:
                self._rejected.append((request, on_output, error))
            else:
                if len(self._waiting) >= self.config.max_queue_size:
                    raise QueueFullError(
                        f"engine queue is full ({self.config.max_queue_size} requests waiting); retry later"
                    )
                self._waiting.append(self._new_sequence(request, on_output, matchers))
            if self._owed_since is None:
                self._owed_since = time.monotonic()
            self._counters["requests_submitted"] += 1
            self._cond.notify_all()

    def health(self) -> str | None:
        """Any thread: None while the loop serves, else why it does not: its thread ended (a
        BaseException: the loop catches every Exception), or it holds requests and has neither
        finished its turn nor taken them up for more than :data:`STALL_LIMIT` seconds (a hang: a
        deadlock, a kernel that never returns, a lost wake-up).
        Answered to the stream probe's stop ping (trident.stream_probe), so that a Triton whose
        engine cannot serve is restarted; the ping itself never waits for the loop."""
        thread = self._thread
        if thread is None or self._stopping:
            return None
        if not thread.is_alive():
            return "the engine's loop thread has ended"
        with self._cond:
            held = len(self._waiting) + len(self._active)
            since = self._owed_since
        stuck = 0.0 if since is None else time.monotonic() - since
        if held and stuck > STALL_LIMIT:
            return (f"the engine's loop has made no progress for {stuck:.0f} s (the limit is {STALL_LIMIT:g} s) "
                    f"with {held} request(s) waiting or running")
        return None

    def cancel(self, request_id: str) -> None:
        """Cancel every queued or running request with this id; takes effect at the next step."""
        with self._cond:
            self._cancel_ids.add(request_id)
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        """requests_finished counts every request that got its final output, whatever the reason
        (a request of n sequences counts once, as it is prefilled once); prompt_tokens_prefilled
        counts the prompt tokens the model computed (int4: those not taken from the prefix cache)."""
        with self._cond:
            out = dict(self._counters)
            out["waiting"] = len(self._waiting)
        out["active"] = len(self._active)
        out["max_batch_size"] = self.config.max_batch_size
        out["max_seq_len"] = self.max_seq_len
        out.update(self.batch.stats())  # int4: KV blocks and prefix-cache counters
        out["guide_cache_bytes"] = self.guides.cache_bytes()
        return out

    # ---- engine thread ----

    def _new_sequence(self, request: GenerationRequest, on_output: OnOutput, matchers=None) -> Sequence:
        return Sequence.create(request, on_output, vocab_size=self.model.config.vocab_size, matchers=matchers)

    def _use_threads(self, rows: int) -> None:
        """OpenMP's thread count is per calling thread: set it here, in the engine thread."""
        c = self.config
        want = c.small_batch_threads if c.small_batch_threads and rows < c.small_batch_rows else self._threads
        if want != self._threads_now:
            torch.set_num_threads(want)
            self._threads_now = want

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._active or self._rejected
                               or self._cancel_ids):
                        self._owed_since = None
                        self._cond.wait()
                    if self._stopping:
                        return
                    cancel_ids, self._cancel_ids = self._cancel_ids, set()
                    self._owed_since = time.monotonic()
                try:
                    self._reject_invalid()
                    self._poll_cancellations(cancel_ids)
                    self._admit()
                    if self._active:
                        self._step()
                except Exception:  # a bug in the loop itself: fail what is running, keep serving
                    log.exception("engine step failed")
                    self._fail_active("internal error in the engine step")

    def _reject_invalid(self) -> None:
        while True:
            with self._cond:
                if not self._rejected:
                    return
                request, on_output, error = self._rejected.popleft()
            self._counters["requests_rejected"] += 1
            seq = Sequence(request=request, on_output=on_output, sampling=RowSampling())
            self._finish(seq, "error", error=str(error), error_type=error.error_type, error_param=error.param)

    def _poll_cancellations(self, cancel_ids: set[str]) -> None:
        """Stop requests (by id) and clients gone (is_cancelled(), at most once per
        cancel_check_interval per request: with a Triton sender each poll is an IPC round trip)."""
        now = time.monotonic()
        self._early_stops = {i: t for i, t in self._early_stops.items() if now - t < STOP_MEMORY}
        with self._cond:
            waiting = list(self._waiting)
        found: set[str] = set()
        for seq in waiting + self._active:
            if seq.finished:  # a member of a group cancelled by another member
                continue
            stopped = seq.request.request_id in cancel_ids
            if stopped:
                found.add(seq.request.request_id)
            if stopped or self._client_cancelled(seq, now):
                self._cancel(seq)
        for request_id in cancel_ids - found:
            if request_id:
                self._early_stops[request_id] = now
        self._remove_finished()

    def _cancel(self, seq: Sequence) -> None:
        """Cancel a request: every unfinished sequence of it (each ends with its tokens so far)."""
        with self._cond:
            self._waiting.discard(seq)
        members = [m for m in seq.group.members if not m.finished] if seq.group is not None else [seq]
        log.info("request %s cancelled after %d generated tokens", seq.request.request_id,
                 sum(len(m.output) for m in (seq.group.members if seq.group is not None else [seq])))
        self._counters["requests_cancelled"] += 1
        for m in members:
            self._finish(m, "cancelled")

    def _client_cancelled(self, seq: Sequence, now: float, *, force: bool = False) -> bool:
        check = seq.request.is_cancelled
        holder = seq.group if seq.group is not None else seq  # one poll for all n
        if check is None or (not force and now - holder.cancel_checked < self.config.cancel_check_interval):
            return False
        holder.cancel_checked = now
        try:
            return bool(check())
        except Exception:  # a broken probe means nobody can receive the answer anyway
            log.exception("is_cancelled() failed for request %s", seq.request.request_id)
            return True

    def _admit(self) -> None:
        """Move waiting requests into the batch while it has room. The slot batch prefills them
        at once, at most prefill_token_budget prompt tokens per call (at least one request); the
        paged batch only finds their cached prefix: its steps prefill the rest in chunks."""
        budget = self.batch.admission_budget
        together = self.model.batch_invariant
        while self.batch.has_room() and (budget is None or budget > 0):
            batch: list[Sequence] = []
            gone: list[Sequence] = []
            with self._cond:
                # in order (priority, then arrival): a request of n sequences waits for n free
                # slots, and nothing passes it
                while self._waiting and self.batch.has_room(self._waiting[0].request.sampling.n):
                    n = len(self._waiting[0].request.input_ids)
                    if budget is not None and n > budget and (batch or budget < self.config.prefill_token_budget):
                        break
                    seq = self._waiting.popleft()
                    if self._client_cancelled(seq, time.monotonic(), force=True):
                        gone.append(seq)  # a client gone never reaches prefill
                        continue
                    self.batch.add(seq)
                    if seq.group is not None:
                        self._unforked.add(seq)
                    batch.append(seq)
                    if budget is not None:
                        budget -= n
                    if not together:
                        break
            for seq in gone:
                self._cancel(seq)
            if not batch:
                if gone:
                    continue
                return
            self._counters["requests_prefilled"] += len(batch)
            try:
                logits = self.batch.prefill(batch)  # (n, V), or None: the steps prefill them
                if logits is not None:
                    self._sample(batch, logits)
            except Exception as e:
                log.exception("prefill failed for request(s) %s", [seq.request.request_id for seq in batch])
                for seq in batch:
                    self._finish(seq, "error", error=f"prefill failed: {e}", error_type=SERVER_ERROR)
            self._remove_finished()

    def _step(self) -> None:
        seqs, logits = self.batch.step()
        self._counters["steps"] += 1
        if not seqs:
            return
        self._sample(seqs, logits)
        self._remove_finished()

    def _sample(self, seqs: list[Sequence], logits) -> None:
        """One token for each sequence from its logits row (B, V)."""
        if self._unforked:
            seqs, logits = fork_leaders(seqs, logits, self._unforked, self.batch)
        rows = []
        for s in seqs:
            if s.sampling.dynamic_bans:
                s.update_bans()
            rows.append(s.sampling)
        tokens, logprobs = sample_step(logits, rows)
        for b, (s, t) in enumerate(zip(seqs, tokens)):
            self._accept(s, t, logprobs.get(b) if logprobs else None)

    def _accept(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None = None) -> None:
        reason = seq.append(token, logprobs)
        if reason != "end_id":
            self._counters["tokens_generated"] += 1
        if reason is not None:
            self._finish(seq, reason)
        elif seq.request.streaming:
            self._emit(seq, finished=False)

    def _finish(self, seq: Sequence, reason: str, *, error: str | None = None,
                error_type: str | None = None, error_param: str | None = None) -> None:
        """A sequence ends. With n > 1 only the last member's output is the request's final one;
        an error (or an end before the fork) ends every member with one output."""
        if seq.finished:
            return
        seq.finished = True
        group = seq.group
        final = True
        if group is not None:
            if reason == "error" or not group.forked:
                for m in group.members:
                    m.finished = True
                group.running = 0
                self._unforked.discard(group.members[0])
            else:
                group.running -= 1
                final = group.running == 0
        if final:
            self._counters["requests_finished"] += 1
            if reason == "error":
                self._counters["requests_failed"] += 1
        self._emit(seq, finished=final, reason=reason, error=error, error_type=error_type, error_param=error_param)

    def _emit(self, seq: Sequence, *, finished: bool, reason: str | None = None,
              error: str | None = None, error_type: str | None = None, error_param: str | None = None) -> None:
        start = seq.emitted if seq.request.streaming else 0
        out = GenerationOutput(
            request_id=seq.request.request_id,
            token_ids=seq.request.input_ids + seq.output if seq.request.include_input else seq.output[start:],
            finished=finished,
            finish_reason=reason,
            error=error,
            error_type=error_type,
            error_param=error_param,
            step=self._counters["steps"],
            sequence_index=seq.index,
        )
        if seq.log_probs is not None:
            out.log_probs, out.cum_log_prob = seq.log_probs[start:], seq.cum_log_prob
            if seq.top_ids is not None:
                out.top_ids, out.top_log_probs = seq.top_ids[start:], seq.top_log_probs[start:]
        if finished and seq.request.report_cached and error is None:
            out.cached_tokens = seq.cached_prompt
        ctx = seq.context
        if ctx is not None and not ctx.sent and ctx.ready and error is None:  # the request's first output
            ctx.sent = True
            out.context_log_probs, out.context_top_ids, out.context_top_log_probs, out.context_ranks = (
                ctx.log_probs, ctx.top_ids, ctx.top_log_probs, ctx.ranks)
        seq.emitted = len(seq.output)
        try:
            seq.on_output(out)
        except Exception:
            log.exception("on_output failed for request %s", seq.request.request_id)
            if not finished:  # nobody is listening: stop spending compute on it (on all n)
                self._finish_request(seq, "on_output callback failed")

    def _finish_request(self, seq: Sequence, message: str) -> None:
        """End a request with an error: one output, whatever is left of its n sequences."""
        if seq.group is not None:
            seq = next((m for m in seq.group.members if not m.finished), None)
            if seq is None:
                return
        self._finish(seq, "error", error=message, error_type=SERVER_ERROR)

    def _remove_finished(self) -> None:
        self.batch.remove_finished()

    def _fail_active(self, message: str) -> None:
        for seq in self._active:
            self._finish(seq, "error", error=message, error_type=SERVER_ERROR)
        self.batch.clear()

    def _fail_all(self, message: str) -> None:
        with self._cond:
            waiting = self._waiting.clear()
            rejected, self._rejected = list(self._rejected), collections.deque()
        for request, on_output, error in rejected:
            self._finish(Sequence(request=request, on_output=on_output, sampling=RowSampling()),
                         "error", error=str(error), error_type=error.error_type, error_param=error.param)
        for seq in waiting:
            self._finish(seq, "error", error=message, error_type=UNAVAILABLE)
        self._fail_active(message)
