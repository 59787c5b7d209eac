"""The engine: a thread running continuous (in-flight) batching.

Each loop iteration: poll cancellations, admit waiting requests into the running batch, then run
ONE batched step for every active sequence and emit. Finished sequences leave at once. What a
step is depends on the model (see the two batches): the int4 model runs one kernel call over
every decoding sequence plus chunks of the prompts being prefilled, on a paged KV cache with
prefix reuse (paged_batch.py); the torch-ops model prefills each prompt when it is admitted, then
decodes all sequences from a contiguous slot cache (slot_batch.py).
"""
from __future__ import annotations

import collections
import logging
import threading
import time

import torch

from trident.contract import SERVER_ERROR, UNAVAILABLE

from .config import KV_CACHE_DTYPES, EngineConfig
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
from .sampling import RowSampling, sample
from .sequence import OnOutput, Sequence
from .slot_batch import SlotBatch
from .weights import load_model

log = logging.getLogger("trident.engine")

STOP_MEMORY = 5.0  # seconds a stop for an unknown request id is kept (see Engine._early_stops)


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
        self._cond = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()  # guarded by _cond
        self._rejected: collections.deque[tuple[GenerationRequest, OnOutput, EngineError]] = collections.deque()
        self._cancel_ids: set[str] = set()  # guarded by _cond
        # Stops for ids the engine did not hold yet (the stop overtook its request): a request
        # submitted with such an id within STOP_MEMORY seconds is cancelled, never prefilled.
        self._early_stops: dict[str, float] = {}  # engine thread only
        self._active = self.batch.sequences  # engine thread only
        self._thread: threading.Thread | None = None
        self._stopping = False
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
        try:
            request.validate(vocab_size=self.model.config.vocab_size, max_seq_len=self.max_seq_len)
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
                self._waiting.append(self._new_sequence(request, on_output))
            self._counters["requests_submitted"] += 1
            self._cond.notify_all()

    def cancel(self, request_id: str) -> None:
        """Cancel every queued or running request with this id; takes effect at the next step."""
        with self._cond:
            self._cancel_ids.add(request_id)
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        """requests_finished counts every request that got its final output, whatever the reason."""
        with self._cond:
            out = dict(self._counters)
            out["waiting"] = len(self._waiting)
        out["active"] = len(self._active)
        out["max_batch_size"] = self.config.max_batch_size
        out["max_seq_len"] = self.max_seq_len
        out.update(self.batch.stats())  # int4: KV blocks and prefix-cache counters
        return out

    # ---- engine thread ----

    def _new_sequence(self, request: GenerationRequest, on_output: OnOutput) -> Sequence:
        return Sequence.create(request, on_output, vocab_size=self.model.config.vocab_size)

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
                        self._cond.wait()
                    if self._stopping:
                        return
                    cancel_ids, self._cancel_ids = self._cancel_ids, set()
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
            self._finish(seq, "error", error=str(error), error_type=error.error_type)

    def _poll_cancellations(self, cancel_ids: set[str]) -> None:
        """Stop requests (by id) and clients gone (is_cancelled(), at most once per
        cancel_check_interval per request: with a Triton sender each poll is an IPC round trip)."""
        now = time.monotonic()
        self._early_stops = {i: t for i, t in self._early_stops.items() if now - t < STOP_MEMORY}
        with self._cond:
            waiting = list(self._waiting)
        found: set[str] = set()
        for seq in waiting + self._active:
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
        with self._cond:
            if seq in self._waiting:
                self._waiting.remove(seq)
        log.info("request %s cancelled after %d generated tokens", seq.request.request_id, len(seq.output))
        self._counters["requests_cancelled"] += 1
        self._finish(seq, "cancelled")

    def _client_cancelled(self, seq: Sequence, now: float, *, force: bool = False) -> bool:
        check = seq.request.is_cancelled
        if check is None or (not force and now - seq.cancel_checked < self.config.cancel_check_interval):
            return False
        seq.cancel_checked = now
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
                while self._waiting and self.batch.has_room():
                    n = len(self._waiting[0].request.input_ids)
                    if budget is not None and n > budget and (batch or budget < self.config.prefill_token_budget):
                        break
                    seq = self._waiting.popleft()
                    if self._client_cancelled(seq, time.monotonic(), force=True):
                        gone.append(seq)  # a client gone never reaches prefill
                        continue
                    self.batch.add(seq)
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
                for seq, row in zip(batch, logits if logits is not None else ()):
                    seq.update_bans()
                    self._accept(seq, sample(row[None], [seq.sampling])[0])
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
        for s in seqs:
            s.update_bans()
        next_tokens = sample(logits, [s.sampling for s in seqs])
        for s, t in zip(seqs, next_tokens):
            self._accept(s, t)
        self._remove_finished()

    def _accept(self, seq: Sequence, token: int) -> None:
        reason = seq.append(token)
        if reason != "end_id":
            self._counters["tokens_generated"] += 1
        if reason is not None:
            self._finish(seq, reason)
        elif seq.request.streaming:
            self._emit(seq, finished=False)

    def _finish(self, seq: Sequence, reason: str, *, error: str | None = None,
                error_type: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        self._counters["requests_finished"] += 1
        if reason == "error":
            self._counters["requests_failed"] += 1
        self._emit(seq, finished=True, reason=reason, error=error, error_type=error_type)

    def _emit(self, seq: Sequence, *, finished: bool, reason: str | None = None,
              error: str | None = None, error_type: str | None = None) -> None:
        start = seq.emitted if seq.request.streaming else 0
        out = GenerationOutput(
            request_id=seq.request.request_id,
            token_ids=seq.output[start:],
            finished=finished,
            finish_reason=reason,
            error=error,
            error_type=error_type,
            step=self._counters["steps"],
        )
        seq.emitted = len(seq.output)
        try:
            seq.on_output(out)
        except Exception:
            log.exception("on_output failed for request %s", seq.request.request_id)
            if not finished:  # nobody is listening: stop spending compute on it
                self._finish(seq, "error", error="on_output callback failed", error_type=SERVER_ERROR)

    def _remove_finished(self) -> None:
        self.batch.remove_finished()

    def _fail_active(self, message: str) -> None:
        for seq in self._active:
            self._finish(seq, "error", error=message, error_type=SERVER_ERROR)
        self.batch.clear()

    def _fail_all(self, message: str) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
            rejected, self._rejected = list(self._rejected), collections.deque()
        for request, on_output, error in rejected:
            self._finish(Sequence(request=request, on_output=on_output, sampling=RowSampling()),
                         "error", error=str(error), error_type=error.error_type)
        for seq in waiting:
            self._finish(seq, "error", error=message, error_type=UNAVAILABLE)
        self._fail_active(message)
