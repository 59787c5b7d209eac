"""/metrics, the per-request record (metrics + one JSON log line), timeouts: in-process, fake backend."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gateway_fakes import FakeBackend, Pause
from testkit import AUTH, KEY, MODEL
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from gateway.backend import Finished
from gateway.errors import timeout_error
from gateway.telemetry import JsonFormatter

ROOT = Path(__file__).resolve().parents[2]




def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def snapshot() -> dict[str, float]:
    gen = {"endpoint": "/generate", "model": MODEL}
    return {
        "ok": value("trident_gateway_requests_total", endpoint="/generate", status="200"),
        "401": value("trident_gateway_requests_total", endpoint="/generate", status="401"),
        "429": value("trident_gateway_requests_total", endpoint="/generate", status="429"),
        "unmatched": value("trident_gateway_requests_total", endpoint="unmatched", status="404"),
        "latency": value("trident_gateway_request_duration_seconds_count", endpoint="/generate"),
        "ttft": value("trident_gateway_time_to_first_token_seconds_count", **gen),
        "itl": value("trident_gateway_inter_token_latency_seconds_count", **gen),
        "prompt": value("trident_gateway_prompt_tokens_total", **gen),
        "completion": value("trident_gateway_completion_tokens_total", **gen),
        "eos": value("trident_gateway_generations_total", **gen, outcome="eos_token"),
        "timeout": value("trident_gateway_generations_total", **gen, outcome="timeout_error"),
        "cancelled": value("trident_gateway_generations_total", **gen, outcome="cancelled"),
        "in_flight": value("trident_gateway_in_flight_requests"),
    }


def delta(before: dict[str, float]) -> dict[str, float]:
    after = snapshot()
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


@pytest.fixture
def request_log():
    """The request log lines, formatted as the gateway writes them (JSON), decoded."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("trident.gateway.request")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    lines: list[dict] = []

    def read() -> list[dict]:
        lines[:] = [json.loads(line) for line in stream.getvalue().splitlines()]
        return lines

    yield read
    logger.removeHandler(handler)
    logger.setLevel(old_level)


# -- /metrics ---------------------------------------------------------------------------------


def test_metrics_need_no_key_and_are_prometheus_text(make_app):
    client = make_app().test_client()
    client.post("/generate", json={"prompt": "Hi there"}, headers=AUTH)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name for f in text_string_to_metric_families(response.get_data(as_text=True))}
    assert {
        "trident_gateway_requests",
        "trident_gateway_request_duration_seconds",
        "trident_gateway_time_to_first_token_seconds",
        "trident_gateway_inter_token_latency_seconds",
        "trident_gateway_prompt_tokens",
        "trident_gateway_completion_tokens",
        "trident_gateway_in_flight_requests",
        "trident_gateway_rate_limited_requests",
    } <= families


def test_streaming_generation_is_measured(make_app):
    client = make_app().test_client()
    before = snapshot()
    response = client.post("/generate", json={"prompt": "Hi there", "stream": True}, headers=AUTH)
    assert response.status_code == 200
    response.get_data()
    response.close()
    # 6 deltas: 1 time to first token, 5 gaps; usage 2 + 6 (gateway_fakes.default_script)
    assert delta(before) == {
        "ok": 1, "latency": 1, "ttft": 1, "itl": 5, "prompt": 2, "completion": 6, "eos": 1,
    }


def test_non_streaming_generation_counts_tokens_but_no_token_timings(make_app):
    client = make_app().test_client()
    before = snapshot()
    assert client.post("/generate", json={"prompt": "a b c"}, headers=AUTH).status_code == 200
    assert delta(before) == {"ok": 1, "latency": 1, "prompt": 3, "completion": 6, "eos": 1}


def test_errors_rate_limits_and_unknown_paths_are_counted(make_app):
    client = make_app(DEFAULT_RATE_LIMIT="1/minute").test_client()
    rejected = {"endpoint": "/generate", "key": "default"}
    rejected_before = value("trident_gateway_rate_limited_requests_total", **rejected)
    before = snapshot()
    assert client.post("/generate", json={"prompt": "x"}, headers=AUTH).status_code == 200
    assert client.post("/generate/", json={"prompt": "x"}, headers=AUTH).status_code == 429
    assert client.post("/generate", json={"prompt": "x"}, headers=AUTH).status_code == 429
    assert client.post("/generate", json={"prompt": "x"}).status_code == 401
    assert client.get("/no/such/path/12345").status_code == 404
    changed = delta(before)
    assert changed["ok"] == 1 and changed["429"] == 2 and changed["401"] == 1 and changed["unmatched"] == 1
    assert value("trident_gateway_rate_limited_requests_total", **rejected) - rejected_before == 2
    assert value("trident_gateway_requests_total", endpoint="/no/such/path/12345", status="404") == 0


def test_in_flight_gauge_follows_open_streams(make_app):
    backend = FakeBackend(script=lambda p: ["a", Pause(5), Finished("length", 1, 1)])
    client = make_app(backend=backend).test_client()
    base = value("trident_gateway_in_flight_requests")
    response = client.post("/generate", json={"prompt": "x", "stream": True}, headers=AUTH, buffered=False)
    assert response.status_code == 200
    assert value("trident_gateway_in_flight_requests") == base + 1
    before = snapshot()
    response.close()  # the client went away
    assert value("trident_gateway_in_flight_requests") == base
    assert delta(before) == {"ok": 1, "latency": 1, "cancelled": 1, "in_flight": -1}


# -- timeouts ---------------------------------------------------------------------------------


def test_timeout_before_output_is_504(request_log, make_app):
    backend = FakeBackend(script=lambda p: [timeout_error(2, "rid-t")])
    client = make_app(backend=backend).test_client()
    before = snapshot()
    for stream in (False, True):
        response = client.post("/generate", json={"prompt": "x", "stream": stream},
                               headers={**AUTH, "X-Request-ID": "rid-t"})
        assert response.status_code == 504
        assert response.get_json() == {"error": {
            "message": "Generation did not finish within the request timeout of 2 s (request id rid-t)",
            "type": "timeout_error", "param": None, "code": 504}}
        assert "Retry-After" not in response.headers
    assert delta(before)["timeout"] == 2
    assert [(line["status"], line["error"]) for line in request_log()] == [(504, "timeout_error")] * 2


def test_timeout_mid_stream_is_an_error_event(request_log, make_app):
    backend = FakeBackend(script=lambda p: ["Hello", timeout_error(2, "rid-s")])
    client = make_app(backend=backend).test_client()
    before = snapshot()
    response = client.post("/generate", json={"prompt": "x", "stream": True},
                           headers={**AUTH, "X-Request-ID": "rid-s"})
    assert response.status_code == 200
    raw = response.get_data(as_text=True)
    response.close()
    assert raw.endswith(
        'event: error\ndata: {"error": {"message": "Generation did not finish within the request timeout '
        'of 2 s (request id rid-s)", "type": "timeout_error", "param": null, "code": 504}}\n\n'
    )
    assert delta(before) == {"ok": 1, "latency": 1, "ttft": 1, "timeout": 1}
    (line,) = request_log()
    assert line["status"] == 200 and line["error"] == "timeout_error" and line["finish_reason"] is None


# -- the request log line ---------------------------------------------------------------------


def test_request_log_line_has_ids_counts_and_timings_but_no_secrets(request_log, make_app):
    client = make_app().test_client()
    response = client.post(
        "/generate",
        json={"prompt": "the secret prompt", "stream": True, "temperature": 0.5, "priority": 3},
        headers={**AUTH, "X-Request-ID": "rid-log-1"},
    )
    text = response.get_data(as_text=True)
    response.close()
    (line,) = request_log()
    assert line["request_id"] == "rid-log-1" and line["msg"] == "generation"
    assert line["logger"] == "trident.gateway.request" and line["level"] == "INFO"
    assert line["pid"] == os.getpid()
    assert line["method"] == "POST" and line["path"] == "/generate" and line["endpoint"] == "/generate"
    assert line["status"] == 200 and line["key"] == "default" and line["model"] == MODEL
    assert line["stream"] is True and line["finish_reason"] == "eos_token"
    assert line["prompt_tokens"] == 3 and line["completion_tokens"] == 6
    assert 0 <= line["ttft_s"] <= line["duration_s"] < 5
    assert line["params"]["temperature"] == 0.5 and line["params"]["prompt_chars"] == 17
    assert line["params"]["priority"] == 3  # the request's own (an API key's is the keys file's)
    raw = json.dumps(line)
    assert "secret" not in raw and KEY not in raw and "prompt" not in line and "output" not in line
    assert "Hello" in text and "Hello" not in raw  # the output is not logged either


def test_log_prompts_puts_prompt_and_output_in_the_line(request_log, make_app):
    client = make_app(LOG_PROMPTS="true").test_client()
    response = client.post("/generate", json={"prompt": "the secret prompt", "stream": True}, headers=AUTH)
    response.get_data()
    response.close()
    client.post("/generate", json={"prompt": "plain"}, headers=AUTH)
    streamed, plain = request_log()
    assert streamed["prompt"] == "the secret prompt" and streamed["output"] == "Hello, wor" "ld ✓!"
    assert plain["prompt"] == "plain" and plain["output"] == "Hello, world ✓!"
    assert KEY not in json.dumps(streamed)


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "key"),
    [
        ("post", "/generate", {}, 401, None),
        ("post", "/generate", {"Authorization": "Bearer wrong-secret-key"}, 401, None),
        ("get", "/nope", AUTH, 404, None),
    ],
)
def test_failed_requests_get_a_line_too(request_log, method, path, headers, status, key, make_app):
    client = make_app().test_client()
    getattr(client, method)(path, json={"prompt": "x"}, headers={**headers, "X-Request-ID": "rid-f"})
    (line,) = request_log()
    assert (line["request_id"], line["status"], line["key"], line["msg"]) == ("rid-f", status, key, "request")
    assert "wrong-secret-key" not in json.dumps(line)


def test_probes_log_at_debug_only(request_log, make_app):
    client = make_app().test_client()
    client.get("/healthz")
    client.get("/metrics")
    assert [line["level"] for line in request_log()] == ["DEBUG", "DEBUG"]


def test_json_formatter_includes_tracebacks():
    formatter = JsonFormatter()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("trident.x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    line = json.loads(formatter.format(record))
    assert line["msg"] == "failed here" and line["request_id"] == "-" and "RuntimeError: boom" in line["exc"]


@pytest.mark.parametrize(("setting", "match"), [({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
                                               ({"DEFAULT_RATE_LIMIT": "lots"}, "lots")])
def test_bad_settings_stop_start_up(setting, match, make_app):
    with pytest.raises(ValueError, match=match):
        make_app(**setting)


# -- multiprocess mode (gunicorn workers) -----------------------------------------------------

_WORKER = """
import sys
from gateway import metrics
metrics.REQUESTS.labels("/generate", "200").inc(int(sys.argv[1]))
metrics.LATENCY.labels("/generate").observe(int(sys.argv[1]) / 10)
metrics.IN_FLIGHT.inc()
"""


@pytest.fixture
def gunicorn_conf(tmp_path, monkeypatch):
    """The config module, imported as gunicorn would, but pointed at a test folder (importing it
    sets PROMETHEUS_MULTIPROC_DIR; monkeypatch takes it back)."""
    folder = tmp_path / "conf-metrics"
    folder.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    from gateway import gunicorn_conf

    return gunicorn_conf


def test_multiprocess_metrics_are_summed_over_processes(tmp_path, gunicorn_conf, monkeypatch):
    """Three "workers" write their numbers; another process's /metrics shows the sums. When
    gunicorn's child_exit reports a worker dead, its live gauge is dropped and its counter and
    histogram files are folded into the archives: every sum a scrape shows stays exactly as it
    was, and the folder keeps no file of a dead worker."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    pids = []
    for n in (3, 4, 8):
        proc = subprocess.run([sys.executable, "-c", _WORKER + "import os; print(os.getpid())", str(n)],
                              env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        pids.append(int(proc.stdout))
    render = "from gateway import metrics; import sys; sys.stdout.write(metrics.render().decode())"

    def scrape() -> dict:
        out = subprocess.run([sys.executable, "-c", render], env=env, cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(out) for s in f.samples}

    in_flight = ("trident_gateway_in_flight_requests", ())
    requests_ok = ("trident_gateway_requests_total", (("endpoint", "/generate"), ("status", "200")))
    latency = "trident_gateway_request_duration_seconds"
    before = scrape()
    assert before[requests_ok] == 15 and before[in_flight] == 3
    assert before[(latency + "_sum", (("endpoint", "/generate"),))] == pytest.approx(1.5)
    assert before[(latency + "_bucket", (("endpoint", "/generate"), ("le", "0.5")))] == 2  # 0.3 and 0.4

    class Worker:
        pid = 0

    monkeypatch.setattr(gunicorn_conf, "_multiproc_dir", tmp_path)  # as if the config had made it
    for gone, pid in enumerate(pids[:2], start=1):
        Worker.pid = pid
        gunicorn_conf.child_exit(None, Worker())
        after = scrape()
        assert after.pop(in_flight) == 3 - gone
        # (the same sums, added in another order)
        assert after == pytest.approx({k: v for k, v in before.items() if k != in_flight}, rel=1e-12)
        assert not list(tmp_path.glob(f"*_{pid}.db"))
    names = {p.name for p in tmp_path.glob("*.db")}  # (each scrape's process leaves files too)
    assert {"counter_archive.db", "histogram_archive.db", f"counter_{pids[2]}.db", f"histogram_{pids[2]}.db",
            f"gauge_livesum_{pids[2]}.db"} <= names


def test_a_fold_waits_for_scrapes_but_never_hangs_the_master(tmp_path):
    """While a scrape reads the files (its shared lock), a fold waits; past its wait it leaves
    the dead worker's files in place (still summed) instead of blocking gunicorn's master."""
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    from gateway import metrics_files

    key = mmap_key("c", "c_total", [], [], "help")
    for name in ("counter_11.db", "counter_archive.db"):
        f = MmapedDict(str(tmp_path / name))
        f.write_value(key, 2.0, 0.0)
        f.close()
    with metrics_files.folder_lock(tmp_path, exclusive=False):
        assert metrics_files.fold_dead_process(11, tmp_path, wait=0.2) is False
        assert (tmp_path / "counter_11.db").exists()
    assert metrics_files.fold_dead_process(11, tmp_path, wait=0.2) is True
    assert not (tmp_path / "counter_11.db").exists()
    assert [v for _, v, _, _ in MmapedDict.read_all_values_from_file(str(tmp_path / "counter_archive.db"))] == [4.0]


def test_gunicorn_conf_prepares_the_folder(tmp_path, gunicorn_conf):
    prepare_multiproc_dir = gunicorn_conf.prepare_multiproc_dir

    env: dict[str, str] = {}
    made, fresh = prepare_multiproc_dir(env)
    try:
        assert fresh and made.is_dir() and env["PROMETHEUS_MULTIPROC_DIR"] == str(made)
    finally:
        made.rmdir()
    given = tmp_path / "metrics"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"stale")
    (given / "keep.txt").write_text("not ours")
    env = {"PROMETHEUS_MULTIPROC_DIR": str(given)}
    assert prepare_multiproc_dir(env) == (given, False)
    assert sorted(p.name for p in given.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_of_several_prompts_logs_their_sum(request_log, make_app, stream):
    """/v1/completions with 3 prompts: one log line, the tokens of all three (each prompt's
    generation records its own final event; the line gets the sum), how many prompts and all
    their characters; the token counters count every prompt, the outcome counter the request."""
    client = make_app().test_client()
    labels = {"endpoint": "/v1/completions", "model": MODEL}
    before = [value("trident_gateway_prompt_tokens_total", **labels),
              value("trident_gateway_generations_total", **labels, outcome="eos_token")]
    response = client.post("/v1/completions", json={"prompt": ["one two", "three", "four five six"], "stream": stream},
                           headers={**AUTH, "X-Request-ID": "rid-prompts"})
    response.get_data()
    response.close()
    (line,) = request_log()
    assert line["request_id"] == "rid-prompts" and line["status"] == 200
    assert line["prompt_tokens"] == 6 and line["completion_tokens"] == 18  # the fake: words, 6 deltas each
    assert line["params"]["prompts"] == 3 and line["params"]["prompt_chars"] == 7 + 5 + 13
    after = [value("trident_gateway_prompt_tokens_total", **labels),
             value("trident_gateway_generations_total", **labels, outcome="eos_token")]
    assert [a - b for a, b in zip(after, before)] == [6, 1]  # every prompt's tokens; one outcome a request
