"""The llm model's request loop (trident.llm_service) with a fake engine and fake Triton requests:
admission, streaming, stop sequences, cancellation at every stage, workers that never die."""
import json
import os
import threading
import time

import numpy as np
from testkit import wait_until
import pytest

from trident.cancel_board import CANCEL_DIR_ENV, CancelBoard, default_directory, remove_stale
from trident.contract import ModelLimits
from trident.llm_io import EngineChunk, LlmSettings
from trident.llm_service import LlmService

TIMEOUT = 10


class FakeRequest:
    def __init__(self, prompt="Hello there", *, max_tokens=8, stream=True, stop_words=(), admission=False,
                 fail_on=(), token=None, cancels=None, ping=False):
        self.token, self.target, self.ping = token, cancels, ping
        self.tool, self.special, self.token_strs = None, True, False  # a tokenizer call: "tokenize" | "detokenize"
        self.inputs = {
            "text_input": np.array([[prompt.encode()]], dtype=object),
            "max_tokens": np.array([[max_tokens]], dtype=np.int32),
            "stream": np.array([[stream]]),
        }
        if stop_words:
            self.inputs["stop_words"] = np.array([[w.encode() for w in stop_words]], dtype=object)
        self.admission = admission
        self.fail_on = set(fail_on)  # names of send functions that raise, as for a client gone
        self.cancelled = threading.Event()
        self.sent = []  # (kind, payload)
        self.output_finals = []  # each send_outputs' final flag
        self.choices = []  # ("text" | "end" | "final", choice index, text, tokens)
        self.ended = []  # the TextGeneration of each choice's last response, in order
        self.done = threading.Event()
        self.polls = 0  # is_cancelled() calls
        self.counts = []  # (choice index, NVIDIA's token counts or None) of each text response

    def input(self, name):
        return self.inputs.get(name)

    def wants_admission(self):
        return self.admission

    def cancel_token(self):
        return self.token

    def cancels(self):
        return self.target

    def pings(self):
        return self.ping

    def tokenizer_call(self):
        return self.tool

    def adds_special_tokens(self):
        return self.special

    def wants_token_strs(self):
        return self.token_strs

    def is_cancelled(self):
        self.polls += 1
        return self.cancelled.is_set()

    def _record(self, kind, payload=None, *, final=False):
        if kind in self.fail_on:
            if final:
                self.done.set()
            raise RuntimeError(f"{kind}: the response stream is gone")
        self.sent.append((kind, payload))
        if final:
            self.done.set()

    def send_admission(self, prompt_tokens, prompt_ids=None):
        self._record("send_admission", prompt_tokens if prompt_ids is None else (prompt_tokens, list(prompt_ids)))

    def send_pong(self):
        self._record("send_pong", final=True)

    def send_text(self, text, *, index=0, n=1, tokens=None, counts=None):
        self._record("send_text", text)
        self.choices.append(("text", index, text, tokens))
        self.counts.append((index, counts))

    def send_final(self, text, gen, *, tokens=None, final=True, counts=None):
        self._record("send_final", (text, gen.finish_reason, gen.prompt_tokens, gen.completion_tokens), final=final)
        self.ended.append(gen)
        self.choices.append(("final" if final else "end", gen.index, text, tokens))
        self.counts.append((gen.index, counts))

    def send_error(self, message):
        self._record("send_error", message, final=True)

    def send_outputs(self, arrays, *, final=True):
        self.output_finals.append(final)
        self._record("send_outputs", {k: v.tolist() for k, v in arrays.items()}, final=final)

    def close(self):
        self._record("close", final=True)

    def text(self):
        parts = [p for k, p in self.sent if k == "send_text"]
        finals = [p for k, p in self.sent if k == "send_final"]
        return "".join(parts) + (finals[0][0] if finals else "")


class FakeEngine:
    """Streams the token ids of ``reply`` one at a time; ``hold`` keeps every request queued
    (no first response) until it is stopped or released. The final response is empty, unless
    ``last_in_final`` (as both real engines send it: with the last token)."""

    def __init__(self, tokenizer, reply=" one two three four five six seven eight", *, hold=False,
                 last_in_final=False):
        self.ids = tokenizer(reply, add_special_tokens=False).input_ids
        self.hold = hold
        self.last_in_final = last_in_final
        self.release = threading.Event()
        self.streams = []  # engine ids, in submission order
        self.prompts = []  # their input_ids
        self.tensors = []  # their tensors
        self.stops = []
        self.stopped = {}
        self.error = None

    def stream(self, tensors, engine_id, outputs=()):
        self.streams.append(engine_id)
        self.prompts.append(np.asarray(tensors["input_ids"]).reshape(-1).tolist())
        self.tensors.append(tensors)
        self.outputs = tuple(outputs)
        stopped = self.stopped.setdefault(engine_id, threading.Event())
        if self.hold:
            while not (stopped.is_set() or self.release.is_set()):
                time.sleep(0.005)
        if self.error:
            yield EngineChunk(error=self.error)
            return
        limit = int(tensors["request_output_len"][0, 0])
        n = int(tensors["num_return_sequences"][0, 0]) if "num_return_sequences" in tensors else 1
        logprobs = "return_log_probs" in tensors
        top = int(tensors["num_top_log_probs"][0, 0]) if "num_top_log_probs" in tensors else 0
        # the prompt's log-probabilities, in the first response: -0.5 - i/100 for its i-th token
        # (NaN for the first), alternatives: the token itself then id 0 (row 0: none)
        context = int(tensors["num_context_log_probs"][0, 0]) if "num_context_log_probs" in tensors else -1
        prompt = self.prompts[-1]
        steps = min(limit, len(self.ids))
        for step in range(steps):
            for index in range(n):  # choice i says the reply from its i-th token on
                if stopped.is_set():
                    break
                token = self.ids[(step + index) % len(self.ids)]
                extra = {}
                if self.last_in_final and step == steps - 1 and index == n - 1:
                    extra["final"] = True
                    if "return_num_cached_tokens" in tensors:
                        extra["cached_tokens"] = 7
                if logprobs:
                    extra["log_probs"] = [-0.25 * (index + 1)]
                if top:
                    extra["top_ids"] = [[token] + [self.ids[0]] * (top - 1)]
                    extra["top_log_probs"] = [[-0.25 * (index + 1)] + [-5.0] * (top - 1)]
                if context >= 0 and step == 0 and index == 0:
                    extra["context_log_probs"] = [float("nan")] + [-0.5 - i / 100 for i in range(1, len(prompt))]
                    extra["context_top_ids"] = [[-1] * context] + [[t] + [0] * (context - 1) for t in prompt[1:]]
                    extra["context_top_log_probs"] = [[float("nan")] * context] + [
                        [-0.5 - i / 100] + [-9.0] * (context - 1) for i in range(1, len(prompt))]
                    extra["context_ranks"] = [0] + [1] * (len(prompt) - 1)  # each prompt token the best
                yield EngineChunk(token_ids=[token], sequence_index=index, **extra)
                if extra.get("final"):
                    return
        # the final response; with return_num_cached_tokens it says 7 prompt tokens were cached
        yield EngineChunk(token_ids=[], final=True,
                          cached_tokens=7 if "return_num_cached_tokens" in tensors else None)

    def stop(self, engine_id):
        self.stops.append(engine_id)
        self.stopped.setdefault(engine_id, threading.Event()).set()


@pytest.fixture
def make_service(tokenizer):
    services = []

    def make(engine=None, board=None, end_ids=(), service_args=None, **settings):
        engine = engine or FakeEngine(tokenizer)
        defaults = dict(max_concurrent=2, cancel_check_interval=0.02)
        service = LlmService(LlmSettings(**{**defaults, **settings}), tokenizer, engine, board=board, end_ids=end_ids,
                             **(service_args or {}))
        service.start()
        services.append(service)
        return service, engine

    yield make
    for service in services:
        service.stop()


def wait(request):
    assert request.done.wait(TIMEOUT), f"no final response; sent so far: {request.sent}"


def test_streams_deltas_then_a_final_response_with_the_counts(make_service, tokenizer):
    service, engine = make_service()
    request = FakeRequest(max_tokens=4)
    service.accept(request)
    wait(request)
    kinds = [k for k, _ in request.sent]
    assert kinds[-1] == "send_final" and set(kinds[:-1]) == {"send_text"}
    assert request.text() == tokenizer.decode(engine.ids[:4])
    _, reason, prompt_tokens, completion_tokens = request.sent[-1][1]
    assert (reason, completion_tokens) == ("length", 4)
    assert prompt_tokens == len(tokenizer("Hello there").input_ids)


@pytest.mark.parametrize("stream, n, stop_words, last_in_final", [
    (True, 1, (), True),            # the real engines' way: the last token in the final response
    (True, 1, (), False),
    (True, 1, (" four",), True),    # ended by a stop sequence while the engine runs on
    (False, 1, (), True),           # one response: all the tokens
    (True, 2, (), True),            # per choice
])
def test_nvidia_token_counts_on_every_response_add_up(make_service, tokenizer, stream, n, stop_words, last_in_final):
    """return_num_input_tokens / return_num_output_tokens (NVIDIA's ensemble, which Triton's
    OpenAI frontend sends with every request): each text response carries the prompt's tokens
    and the generated tokens it adds, and a choice's add up to its completion_tokens."""
    service, engine = make_service(FakeEngine(tokenizer, last_in_final=last_in_final))
    request = FakeRequest(max_tokens=6, stream=stream, stop_words=stop_words)
    request.inputs.update(return_num_input_tokens=np.array([[True]]), return_num_output_tokens=np.array([[True]]))
    if n > 1:
        request.inputs["num_return_sequences"] = np.array([[n]], dtype=np.int32)
    service.accept(request)
    wait(request)
    prompt = len(tokenizer("Hello there").input_ids)
    assert len(request.counts) == len(request.choices) >= (n if not stream else n + 1)
    for index, counts in request.counts:
        assert counts["num_input_tokens"] == prompt and counts["num_output_tokens"] >= 0
    for gen in request.ended:
        mine = [c["num_output_tokens"] for i, c in request.counts if i == gen.index]
        assert sum(mine) == gen.completion_tokens > 0
        if stream and not stop_words:
            assert all(c == 1 for c in mine[:-1])  # one engine token a response (stream_interval 1)
    if stop_words:
        assert request.ended[0].finish_reason == "stop_sequence" and request.ended[0].completion_tokens < 6
    if not stream:
        assert [c["num_output_tokens"] for _, c in request.counts] == [request.ended[0].completion_tokens]


def test_nvidia_token_counts_only_when_asked(make_service, tokenizer):
    service, _ = make_service()
    plain, inputs_only = FakeRequest(max_tokens=3), FakeRequest(max_tokens=3)
    inputs_only.inputs["return_num_input_tokens"] = np.array([[True]])
    for request in (plain, inputs_only):
        service.accept(request)
        wait(request)
    assert plain.counts and all(counts is None for _, counts in plain.counts)
    assert inputs_only.counts and all(set(counts) == {"num_input_tokens"} for _, counts in inputs_only.counts)


def test_admission_comes_first_and_only_when_asked(make_service):
    service, _ = make_service()
    asked, silent = FakeRequest(admission=True), FakeRequest()
    service.accept(asked)
    service.accept(silent)
    wait(asked)
    wait(silent)
    [final] = [payload for kind, payload in asked.sent if kind == "send_final"]
    assert asked.sent[0] == ("send_admission", final[2]) and final[2] > 0  # the prompt's tokens, as the final says
    assert all(kind != "send_admission" for kind, _ in silent.sent)


def test_a_bad_request_is_refused_before_admission(make_service):
    service, engine = make_service(limits=ModelLimits(max_context=16, max_new_tokens=8))
    request = FakeRequest("word " * 40, max_tokens=8, admission=True)
    service.accept(request)
    wait(request)
    assert [k for k, _ in request.sent] == ["send_error"]
    assert request.sent[0][1].startswith("[invalid_request_error:prompt] the prompt has")
    assert engine.streams == []


def test_a_stop_sequence_stops_the_engine_request(make_service, tokenizer):
    service, engine = make_service()
    request = FakeRequest(stop_words=[" three"])
    service.accept(request)
    wait(request)
    assert request.text() == " one two"
    assert request.sent[-1][1][1] == "stop_sequence"
    assert engine.stops == engine.streams  # the engine was told to stop that request


def test_an_engine_error_is_passed_on_unchanged(make_service, tokenizer):
    engine = FakeEngine(tokenizer)
    engine.error = "[service_unavailable] engine queue is full"
    service, _ = make_service(engine)
    request = FakeRequest()
    service.accept(request)
    wait(request)
    assert request.sent == [("send_error", "[service_unavailable] engine queue is full")]


@pytest.mark.parametrize("failing", ["send_text", "send_final", "send_error", "close"])
def test_a_failing_send_leaves_the_worker_alive(make_service, tokenizer, failing):
    """One worker; its request's response stream breaks (the client went away between the check
    and the send). The next request must still be served by the same worker."""
    engine = FakeEngine(tokenizer)
    if failing in ("send_error",):
        engine.error = "[service_unavailable] engine stopped"
    service, _ = make_service(engine, max_concurrent=1, cancel_check_interval=0.0)
    broken = FakeRequest(fail_on={failing})
    if failing == "close":
        broken.cancelled.set()  # a request found cancelled is closed
    service.accept(broken)
    wait(broken)
    engine.error = None
    healthy = FakeRequest(max_tokens=3)
    service.accept(healthy)
    wait(healthy)
    assert healthy.sent[-1][0] == "send_final"


def test_a_request_cancelled_while_queued_here_never_reaches_the_engine(make_service, tokenizer):
    engine = FakeEngine(tokenizer, hold=True)
    service, _ = make_service(engine, max_concurrent=1)
    first, queued = FakeRequest(), FakeRequest(admission=True)
    service.accept(first)
    service.accept(queued)
    queued.cancelled.set()
    time.sleep(0.1)  # the watcher polls it while it waits for the only worker
    engine.release.set()
    wait(first)
    wait(queued)
    assert len(engine.streams) == 1
    assert [k for k, _ in queued.sent] == ["send_admission", "close"]
    assert service.counters["cancelled_queued"] == 1


def test_a_request_queued_in_the_engine_is_stopped_when_its_client_goes(make_service, tokenizer):
    """No response from the engine yet (queued there): the watcher notices the client is gone
    and sends the engine's stop request for that id, without waiting for a token."""
    engine = FakeEngine(tokenizer, hold=True)
    service, _ = make_service(engine)
    request = FakeRequest(admission=True)
    service.accept(request)
    deadline = time.monotonic() + TIMEOUT
    while not engine.streams and time.monotonic() < deadline:
        time.sleep(0.005)
    request.cancelled.set()
    wait(request)
    assert engine.stops == engine.streams
    assert [k for k, _ in request.sent] == ["send_admission", "close"]
    assert service.counters["cancelled_at_engine"] == 1


def test_a_client_gone_mid_stream_stops_the_engine_and_gets_no_final(make_service, tokenizer):
    engine = FakeEngine(tokenizer)
    service, _ = make_service(engine, cancel_check_interval=0.0)

    class DropsAfterTwo(FakeRequest):
        def send_text(self, text, **kwargs):
            super().send_text(text, **kwargs)
            if len(self.sent) == 2:
                self.cancelled.set()

    request = DropsAfterTwo(max_tokens=8)
    service.accept(request)
    wait(request)
    assert [k for k, _ in request.sent] == ["send_text", "send_text", "close"]
    assert engine.stops == engine.streams


def test_a_cancel_request_ends_a_request_at_the_engine_with_a_final_response(make_service, tokenizer):
    """The gateway's way to end a request whose client left (trident.contract CANCEL_PARAMETER):
    the request named by its token gets the engine's stop and an empty final response, so its
    gRPC call ends without a cancellation; the cancel request gets its own final response."""
    engine = FakeEngine(tokenizer, hold=True)
    service, _ = make_service(engine)
    request, other = FakeRequest(admission=True, token="t-1"), FakeRequest(max_tokens=2, token="t-2")
    service.accept(request)
    deadline = time.monotonic() + TIMEOUT
    while not engine.streams and time.monotonic() < deadline:
        time.sleep(0.005)
    cancel = FakeRequest(cancels="t-1")
    service.accept(cancel)
    assert [k for k, _ in cancel.sent] == ["close"]
    wait(request)
    assert [k for k, _ in request.sent] == ["send_admission", "close"]
    assert engine.stops == engine.streams[:1] and not request.cancelled.is_set()
    assert service.counters["cancelled_at_engine"] == 1 and service.counters["cancel_requests"] == 1
    engine.release.set()
    service.accept(other)
    wait(other)
    assert other.sent[-1][0] == "send_final"  # a token names one request only


def test_a_ping_is_answered_at_once_ahead_of_a_full_queue(make_service, tokenizer):
    """trident.stream_probe's ping: answered on the accepting thread with one final response,
    while every worker is busy and requests wait; it never reaches the engine or the queue."""
    engine = FakeEngine(tokenizer, hold=True)
    service, _ = make_service(engine, max_concurrent=1)
    busy, queued = FakeRequest(), FakeRequest(admission=True)
    service.accept(busy)
    service.accept(queued)
    ping = FakeRequest(ping=True, max_tokens=1, prompt="")  # the required inputs, ignored
    service.accept(ping)
    assert ping.sent == [("send_pong", None)] and ping.done.is_set()
    assert service.counters["pings"] == 1 and service.counters["accepted"] == 2
    engine.release.set()
    wait(busy)
    wait(queued)
    assert len(engine.streams) == 2


def test_a_request_whose_parameters_cannot_be_read_is_a_generation_request(make_service, tokenizer):
    class Unreadable(FakeRequest):
        def pings(self):
            raise ValueError("bad parameters")

    service, _ = make_service(FakeEngine(tokenizer))
    request = Unreadable(max_tokens=2)
    service.accept(request)
    wait(request)
    assert request.sent[-1][0] == "send_final" and service.counters["pings"] == 0


def test_a_cancel_request_ends_a_request_still_queued_here_at_once(make_service, tokenizer):
    engine = FakeEngine(tokenizer, hold=True)
    service, _ = make_service(engine, max_concurrent=1)
    first, queued = FakeRequest(), FakeRequest(admission=True, token="q")
    service.accept(first)
    service.accept(queued)
    service.accept(FakeRequest(cancels="q"))
    wait(queued)  # before the only worker is free
    assert [k for k, _ in queued.sent] == ["send_admission", "close"]
    engine.release.set()
    wait(first)
    assert len(engine.streams) == 1 and service.counters["cancelled_queued"] == 1


def test_a_cancel_request_that_comes_first_ends_its_request_when_it_arrives(make_service, tokenizer):
    """The two requests travel on separate gRPC calls, so the cancel may be first."""
    engine = FakeEngine(tokenizer, hold=True)
    service, _ = make_service(engine)
    service.accept(FakeRequest(cancels="early"))
    late = FakeRequest(admission=True, token="early")
    service.accept(late)
    wait(late)
    assert [k for k, _ in late.sent] == ["send_admission", "close"]
    assert not engine.streams or engine.stops == engine.streams


def test_many_requests_over_few_workers_all_complete(make_service, tokenizer):
    service, engine = make_service(max_concurrent=3)
    requests = [FakeRequest(max_tokens=3, admission=True) for _ in range(20)]
    for request in requests:
        service.accept(request)
    for request in requests:
        wait(request)
        assert request.sent[0][0] == "send_admission" and request.sent[-1][0] == "send_final"
    assert len(engine.streams) == 20


def test_a_storm_stops_the_waiting_requests_before_a_running_one_frees_its_slot(make_service, tokenizer):
    """Clients often leave together. When a running request is found gone, the requests still
    waiting in the engine whose clients left too are stopped first: the slot the running one
    frees must not go to one of them (it would be prefilled for nobody)."""

    class OneSlot(FakeEngine):
        def stream(self, tensors, engine_id, outputs=()):
            self.streams.append(engine_id)
            stopped = self.stopped.setdefault(engine_id, threading.Event())
            if len(self.streams) > 1:  # waits for the only slot
                stopped.wait(TIMEOUT)
                yield EngineChunk(token_ids=[])
                return
            for token in self.ids * 50:  # runs until stopped
                if stopped.wait(0.01):
                    break
                yield EngineChunk(token_ids=[token])
            yield EngineChunk(token_ids=[])

    engine = OneSlot(tokenizer)
    service, _ = make_service(engine, cancel_check_interval=0.05)
    running, waiting = FakeRequest(max_tokens=400), FakeRequest(max_tokens=400)
    service.accept(running)
    assert wait_until(lambda: len(running.sent) >= 2)
    service.accept(waiting)
    assert wait_until(lambda: len(engine.streams) == 2)
    waiting.cancelled.set()
    running.cancelled.set()
    wait(running)
    wait(waiting)
    assert engine.stops == [engine.streams[1], engine.streams[0]]


def streamed(request):
    """The texts of a request's streamed responses, then its final text."""
    return [p for k, p in request.sent if k == "send_text"], [p[0] for k, p in request.sent if k == "send_final"]


@pytest.mark.parametrize("interval, groups", [
    (1, [1, 1, 1, 1, 1, 1, 1, 1]),  # every token as it comes (the default)
    (3, [1, 3, 3]),  # the first text at once, then every third token; the eighth rides the final
    (100, [1]),  # everything after the first token comes with the final response
])
def test_stream_interval_sends_the_first_text_at_once_then_every_nth_token(make_service, tokenizer, interval, groups):
    service, engine = make_service(stream_interval=interval)
    request = FakeRequest(max_tokens=8)
    service.accept(request)
    wait(request)
    texts, finals = streamed(request)
    bounds = [sum(groups[:k]) for k in range(len(groups) + 1)]
    assert texts == [tokenizer.decode(engine.ids[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert finals == [tokenizer.decode(engine.ids[bounds[-1]:8])]
    assert request.text() == tokenizer.decode(engine.ids[:8])
    assert request.sent[-1][1][1:] == ("length", request.sent[-1][1][2], 8)  # counts every token


def test_stream_interval_holds_text_back_for_a_stop_sequence_as_before(make_service, tokenizer):
    service, engine = make_service(stream_interval=2)
    request = FakeRequest(stop_words=[" four"])
    service.accept(request)
    wait(request)
    assert request.text() == " one two three"
    assert request.sent[-1][1][1] == "stop_sequence"
    assert engine.stops == engine.streams


@pytest.mark.parametrize("interval", [1, 3])
def test_the_engines_last_token_goes_out_in_the_final_response(make_service, tokenizer, interval):
    engine = FakeEngine(tokenizer, last_in_final=True)
    service, _ = make_service(engine, stream_interval=interval)
    request = FakeRequest(max_tokens=7)
    service.accept(request)
    wait(request)
    texts, finals = streamed(request)
    # Every token but the last streamed as before; the last (with any held back) only in the
    # final response: no text response of its own.
    assert "".join(texts) + finals[0] == tokenizer.decode(engine.ids[:7]) == request.text()
    assert finals[0] and finals[0].endswith(tokenizer.decode(engine.ids[6:7]))
    assert len(texts) == (6 if interval == 1 else 2)  # tokens 1..6; (1), (2-4) with their interval
    assert request.sent[-1][1][1:] == ("length", request.sent[-1][1][2], 7)


def test_a_one_token_stream_is_its_final_response_alone(make_service, tokenizer):
    engine = FakeEngine(tokenizer, last_in_final=True)
    service, _ = make_service(engine)
    request = FakeRequest(max_tokens=1, admission=True)
    service.accept(request)
    wait(request)
    assert [k for k, _ in request.sent] == ["send_admission", "send_final"]
    assert request.text() == tokenizer.decode(engine.ids[:1])


def test_stream_interval_without_streaming_changes_nothing(make_service, tokenizer):
    service, engine = make_service(stream_interval=3)
    request = FakeRequest(max_tokens=8, stream=False)
    service.accept(request)
    wait(request)
    assert streamed(request) == ([], [tokenizer.decode(engine.ids[:8])])


@pytest.mark.parametrize("stream", [False, True])
def test_exclude_input_in_output_false_puts_the_prompt_in_front_of_a_non_streaming_text(make_service, tokenizer,
                                                                                        stream):
    """NVIDIA's ensemble semantics (its end_to_end_grpc_client.py sends false by default): the
    prompt, then the completion, in one non-streaming text_output; a stream never repeats it."""
    service, engine = make_service()
    request = FakeRequest("Tell me", max_tokens=8, stream=stream)
    request.inputs["exclude_input_in_output"] = np.array([[False]])
    request.inputs["beam_width"] = np.array([[1]], dtype=np.int32)
    service.accept(request)
    wait(request)
    completion = tokenizer.decode(engine.ids[:8])
    assert request.text() == (completion if stream else "Tell me" + completion)


def _ids_request(ids, **kwargs):
    request = FakeRequest("", **kwargs)
    request.inputs["input_ids"] = np.array([ids], dtype=np.int32)
    return request


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_of_token_ids_reaches_the_engine_as_given(make_service, tokenizer, stream):
    """/v1/completions' prompt of token ids: not detokenized and tokenized again (which need not
    give the same ids), counted as they are; with exclude_input_in_output false, their text."""
    service, engine = make_service()
    ids = tokenizer("Tell me", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    request = _ids_request(ids, max_tokens=8, stream=stream)
    request.inputs["exclude_input_in_output"] = np.array([[False]])
    service.accept(request)
    wait(request)
    assert engine.prompts == [ids]
    assert request.sent[-1][0] == "send_final" and request.sent[-1][1][2] == len(ids)  # prompt_tokens
    completion = tokenizer.decode(engine.ids[:8])
    assert request.text() == (completion if stream else tokenizer.decode(ids) + completion)


@pytest.mark.parametrize("ids, message", [
    ([5, 49152], "[invalid_request_error:prompt] prompt: token id 49152 (at 1) is not a token of the model "
                 "(ids are below 49152)"),
    ([-3], "[invalid_request_error:prompt] prompt: token id -3 (at 0) is not a token of the model"),
    ([7] * 10, "[invalid_request_error:prompt] the prompt has 10 tokens and max_new_tokens is 8: together 18, "
               "over the model's context of 16 tokens"),
    ([], "[invalid_request_error:prompt] input_ids must hold at least one token id"),
])
def test_a_prompt_of_token_ids_the_model_cannot_take_is_refused_before_the_engine(make_service, ids, message):
    service, engine = make_service(limits=ModelLimits(max_context=16, max_new_tokens=8))
    request = _ids_request(ids, max_tokens=8, admission=True)
    service.accept(request)
    wait(request)
    assert [k for k, _ in request.sent] == ["send_error"]
    assert request.sent[0][1].startswith(message), request.sent[0][1]
    assert engine.streams == []


def test_a_prompt_as_both_text_and_token_ids_is_refused(make_service):
    service, engine = make_service()
    request = _ids_request([5, 6])
    request.inputs["text_input"] = np.array([[b"Hello"]], dtype=object)
    service.accept(request)
    wait(request)
    assert request.sent == [("send_error", "[invalid_request_error:prompt] give the prompt as text_input or as "
                                           "input_ids, not both")]
    assert engine.streams == []


def test_tokenize_answers_at_once_with_the_ids_a_prompt_is_given(make_service, tokenizer):
    """The gateway's /tokenize: ahead of a full engine, one final response, nothing at the engine."""
    service, engine = make_service()
    request = FakeRequest("Hello there, Paris")
    request.tool = "tokenize"
    service.accept(request)
    ids = tokenizer("Hello there, Paris").input_ids
    assert request.sent == [("send_outputs", {"text_output": [[b""]], "output_token_ids": [ids],
                                              "prompt_tokens": [[len(ids)]]})]
    request = FakeRequest("Hello")
    request.tool, request.special = "tokenize", False
    service.accept(request)
    assert request.sent[0][1]["output_token_ids"] == [tokenizer("Hello", add_special_tokens=False).input_ids]
    empty = FakeRequest("")
    empty.tool = "tokenize"
    service.accept(empty)
    assert empty.sent == [("send_outputs", {"text_output": [[b""]], "output_token_ids": [[]], "prompt_tokens": [[0]]})]
    pieces = FakeRequest("Hello there, Paris é")  # return_token_strs: the vocabulary's pieces too
    pieces.tool, pieces.token_strs = "tokenize", True
    service.accept(pieces)
    ids = tokenizer("Hello there, Paris é").input_ids
    answer = pieces.sent[0][1]
    assert answer["output_token_ids"] == [ids]
    assert answer["token_strs"] == [[t.encode() for t in tokenizer.convert_ids_to_tokens(ids)]]
    assert b"\xc4\xa0there" in answer["token_strs"][0]  # byte-level BPE's piece of " there"
    assert engine.streams == [] and service.counters["tokenize"] == 4


def test_add_special_tokens_false_leaves_out_the_bos_a_tokenizer_adds(checkpoint_dir):
    """A tokenizer whose post-processor adds a BOS (Llama 3's): a prompt rendered by a chat
    template, which holds its BOS already, is tokenized without it (add_special_tokens false,
    vLLM's default for chat); a completion's prompt with it (the default). Only one BOS either way."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
    bos = tokenizer.convert_tokens_to_ids("<|im_start|>")
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A",
                                                             special_tokens=[("<|im_start|>", bos)])
    engine = FakeEngine(tokenizer)
    service = LlmService(LlmSettings(max_concurrent=2, cancel_check_interval=0.02), tokenizer, engine)
    service.start()
    try:
        rendered = FakeRequest("<|im_start|>user\nHi")
        rendered.inputs["add_special_tokens"] = np.array([[False]])
        plain = FakeRequest("Hi")
        for request in (rendered, plain):
            service.accept(request)
            wait(request)
    finally:
        service.stop()
    assert engine.prompts[0] == [bos] + tokenizer("user\nHi", add_special_tokens=False).input_ids
    assert engine.prompts[1] == [bos] + tokenizer("Hi", add_special_tokens=False).input_ids
    assert [ids.count(bos) for ids in engine.prompts] == [1, 1]


def test_tokenize_refuses_a_text_longer_than_any_prompt(make_service):
    service, _ = make_service(limits=ModelLimits(max_prompt_chars=10))
    request = FakeRequest("x" * 11)
    request.tool = "tokenize"
    service.accept(request)
    assert request.sent == [("send_error", "[invalid_request_error:prompt] prompt has 11 characters, more than the 10 "
                                           "that can fit the model's context (checked before tokenizing); shorten it")]


def test_detokenize_answers_with_the_text_of_the_ids(make_service, tokenizer):
    service, engine = make_service()
    ids = tokenizer("<|im_start|>user\nHi", add_special_tokens=False).input_ids
    request = _ids_request(ids)
    request.tool = "detokenize"
    service.accept(request)
    assert request.sent == [("send_outputs", {"text_output": [["<|im_start|>user\nHi".encode()]],
                                              "prompt_tokens": [[len(ids)]]})]
    bad = _ids_request([1, len(tokenizer)])
    bad.tool = "detokenize"
    service.accept(bad)
    assert bad.sent == [("send_error", f"[invalid_request_error:tokens] tokens: token id {len(tokenizer)} (at 1) is "
                                       f"not a token of the model (ids are below {len(tokenizer)})")]
    assert engine.streams == []


def test_a_client_gone_between_grouped_responses_stops_the_engine(make_service, tokenizer):
    engine = FakeEngine(tokenizer)
    service, _ = make_service(engine, cancel_check_interval=0.0, stream_interval=2)
    request = FakeRequest(max_tokens=8, fail_on={"send_text"})
    service.accept(request)
    wait(request)
    assert [k for k, _ in request.sent] == ["close"]
    assert engine.stops == engine.streams


@pytest.mark.parametrize("value", [0, -3])
def test_stream_interval_below_one_is_refused(value):
    with pytest.raises(ValueError, match="stream_interval"):
        LlmSettings(stream_interval=value)
    assert LlmSettings.from_parameters({"stream_interval": "4"}).stream_interval == 4
    assert LlmSettings.from_parameters({}).stream_interval == 1


# -- several instances: cancel requests through the board (trident.cancel_board) --------------------


@pytest.fixture
def board_dir(tmp_path):
    return tmp_path / "cancels"


def test_a_cancel_request_at_another_instance_stops_the_request_at_the_engine(make_service, tokenizer, board_dir):
    """Triton hands a cancel request to any instance of llm: the one without the request posts
    its token, the one holding it stops the engine request and ends the call. Without the board
    the request ran on (until the gateway cancelled the gRPC call, seconds later)."""
    engine = FakeEngine(tokenizer, hold=True)
    holder, _ = make_service(engine, board=CancelBoard(board_dir, keep=10))
    other, _ = make_service(FakeEngine(tokenizer), board=CancelBoard(board_dir, keep=10))
    request = FakeRequest(admission=True, token="t-at-engine")
    holder.accept(request)
    assert wait_until(lambda: engine.streams, TIMEOUT)
    cancel = FakeRequest(cancels="t-at-engine")
    other.accept(cancel)
    assert [k for k, _ in cancel.sent] == ["close"]
    wait(request)
    assert [k for k, _ in request.sent] == ["send_admission", "close"]
    assert engine.stops == engine.streams and not request.cancelled.is_set()
    assert other.counters["cancels_posted"] == 1 and holder.counters["cancels_from_board"] == 1
    assert holder.counters["cancelled_at_engine"] == 1
    assert wait_until(lambda: not list(board_dir.iterdir()), TIMEOUT)  # taken off the board


def test_a_cancel_request_at_another_instance_before_its_request_keeps_it_from_the_engine(
        make_service, tokenizer, board_dir):
    engine = FakeEngine(tokenizer, hold=True)
    holder, _ = make_service(engine, board=CancelBoard(board_dir, keep=10))
    other, _ = make_service(FakeEngine(tokenizer), board=CancelBoard(board_dir, keep=10))
    other.accept(FakeRequest(cancels="t-early"))
    late = FakeRequest(admission=True, token="t-early")
    holder.accept(late)
    wait(late)
    assert [k for k, _ in late.sent] == ["send_admission", "close"]
    assert engine.streams == [] and holder.counters["cancelled_queued"] == 1


def test_a_cancel_request_for_a_request_here_is_not_posted(make_service, tokenizer, board_dir):
    engine = FakeEngine(tokenizer, hold=True)
    service, _ = make_service(engine, board=CancelBoard(board_dir, keep=10))
    request = FakeRequest(token="t-here")
    service.accept(request)
    service.accept(FakeRequest(cancels="t-here"))
    wait(request)
    assert service.counters["cancels_posted"] == 0 and list(board_dir.iterdir()) == []


def test_the_board_keeps_a_token_for_its_time_then_drops_it(board_dir):
    now = [1000.0]
    board = CancelBoard(board_dir, keep=10, clock=lambda: now[0])
    assert board.post("abc123") and board.has("abc123")
    now[0] += 9
    assert board.posted() == {"abc123"}
    now[0] += 2
    assert not board.has("abc123") and board.posted() == set()
    assert list(board_dir.iterdir()) == []  # removed by the reader that found it expired
    board.close()
    assert not board_dir.exists()


@pytest.mark.parametrize("token", ["", "../escape", "a/b", ".hidden", "x" * 129, "sp ace"])
def test_tokens_that_are_not_plain_file_names_are_not_posted(board_dir, token):
    board = CancelBoard(board_dir, keep=10)
    assert not board.post(token) and not board.has(token)
    assert list(board_dir.iterdir()) == []


def test_a_board_whose_directory_went_away_still_takes_posts(board_dir):
    """Another instance that unloaded removes the directory once empty."""
    board = CancelBoard(board_dir, keep=10)
    CancelBoard(board_dir, keep=10).close()
    assert board.posted() == set()
    assert board.post("t") and board.posted() == {"t"}


def test_boards_of_tritons_that_are_gone_are_removed(tmp_path):
    """A killed Triton never unloads llm, which would remove its board."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    mine = tmp_path / f"trident-cancels-{os.getppid()}-llm"
    stale = tmp_path / f"trident-cancels-{gone}-llm"
    live = tmp_path / f"trident-cancels-{os.getpid()}-llm"  # another live server's
    other_model = tmp_path / f"trident-cancels-{gone}-other"
    for path in (mine, stale, live, other_model):
        path.mkdir()
    (stale / "token").touch()
    assert remove_stale(mine) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (mine, live, other_model))
    assert remove_stale(tmp_path / "cancels") == []  # a directory of the operator's: left alone


def test_the_board_directory_is_per_triton_process_and_model(monkeypatch, tmp_path):
    monkeypatch.delenv(CANCEL_DIR_ENV, raising=False)
    path = default_directory("llm")
    assert path.name == f"trident-cancels-{os.getppid()}-llm"
    assert default_directory("llm", {CANCEL_DIR_ENV: str(tmp_path)}) == tmp_path


def test_a_request_with_a_cancel_token_is_polled_less_often_and_still_noticed(make_service, tokenizer):
    """The gateway's requests carry a cancel token and end by cancel requests; their
    is_cancelled() (a round trip to Triton's process) is only the fallback, polled
    TOKEN_POLL_FACTOR times less often, and still notices a client found gone that way."""
    engine = FakeEngine(tokenizer, hold=True)
    service, _ = make_service(engine, cancel_check_interval=0.02)
    plain, tokened = FakeRequest(), FakeRequest(token="t-polled")
    service.accept(plain)
    service.accept(tokened)
    assert wait_until(lambda: len(engine.streams) == 2, TIMEOUT)
    plain0, tokened0, t0 = plain.polls, tokened.polls, time.monotonic()
    time.sleep(1.0)
    plain1, tokened1, t1 = plain.polls, tokened.polls, time.monotonic()
    # At most one poll per 5 x 0.02 s (its rate limit); the plain request gets one per 0.02 s.
    assert tokened1 - tokened0 <= (t1 - t0) / (5 * 0.02) + 1, (tokened1 - tokened0, plain1 - plain0)
    tokened.cancelled.set()  # its call cancelled (say the gateway's process died)
    wait(tokened)
    assert [k for k, _ in tokened.sent] == ["close"] and len(engine.stops) == 1
    plain.cancelled.set()
    wait(plain)


def test_model_end_ids_reads_generation_config(tmp_path):
    from trident.llm_service import model_end_ids

    assert model_end_ids(tmp_path) == ()  # no generation_config.json
    path = tmp_path / "generation_config.json"
    for value, ids in (([128001, 128008, 128009], (128001, 128008, 128009)), (2, (2,)), (None, ()),
                       ([151645, True, -1, "x", 151643], (151643, 151645))):
        path.write_text(json.dumps({"eos_token_id": value}))
        assert model_end_ids(tmp_path) == ids
    path.write_text("not json")
    assert model_end_ids(tmp_path) == ()
