"""scripts/bench_gateway.py's summary over rounds: each figure is the median of its rounds, and
each round's gateway is compared with the floor of that same round, not with another round's
(the machine's speed drifts between rounds); one round prints the table as it always did."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from bench_gateway import summarize, table  # noqa: E402


def row(kind: str, round_: int, cpu_us: float, *, workers: int = 0, streams: int = 200, interval: int = 8,
        ttft: float = 100.0, gap99: float = 50.0) -> dict:
    return {"kind": kind, "workers": workers, "streams": streams, "stream_interval": interval,
            "tokens_per_stream": 300, "pace_ms": 20.0, "tokens": 60000, "responses": 7600, "errors": 0,
            "cpu_s": cpu_us * 60000 / 1e6, "cpu_us_per_token": cpu_us, "relayed_per_s": 9000.0 + round_,
            "offered_per_s": 10000.0, "ttft_ms": {"p50": ttft}, "gap_ms": {"p50": 20.0, "p99": gap99},
            "client_cpu_s": 1.0, "machine_busy": 0.4, "round": round_}


def test_each_round_is_compared_with_its_own_floor_and_the_median_is_reported():
    # The machine is slow in round 2: the floor doubles, and so does the gateway.
    rows = [row("floor", 1, 15), row("gateway", 1, 30, workers=1, ttft=180, gap99=60),
            row("gateway", 2, 66, workers=1, ttft=260, gap99=90), row("floor", 2, 30),
            row("floor", 3, 16), row("gateway", 3, 36, workers=1, ttft=200, gap99=70)]
    summary = summarize(rows)
    floor, gateway = summary
    assert (floor["kind"], gateway["kind"]) == ("floor", "gateway")
    assert gateway["ratios"] == pytest.approx([2.0, 2.2, 2.25])
    assert gateway["vs_floor"] == pytest.approx(2.2)  # not 36 / 16 nor median(gw) / median(floor)
    assert gateway["cpu_us_per_token"] == 36 and floor["cpu_us_per_token"] == 16
    assert gateway["each_cpu_us_per_token"] == [30, 66, 36] and gateway["rounds"] == 3
    assert gateway["ttft_p50_ms"] == 200 and gateway["gap_p99_ms"] == 70
    text = table(rows)
    assert "Medians over 3 rounds" in text
    assert "| 200 (20 ms) | 8 | gateway, 1 worker(s) | 36 us | 2.20x (2.00x / 2.20x / 2.25x) |" in text
    assert "| 200 (20 ms) | 8 | gRPC client (floor) | 16 us | 1.00x |" in text
    assert "(+100.0)" in text  # TTFT added: median gateway 200 against median floor 100


def test_configurations_are_kept_apart():
    rows = [row("floor", 1, 80, interval=1), row("gateway", 1, 120, workers=1, interval=1),
            row("gateway", 1, 110, workers=2, interval=1),
            row("floor", 1, 16, streams=500), row("gateway", 1, 35, workers=1, streams=500)]
    by = {(r["streams"], r["stream_interval"], r["kind"], r["workers"]): r for r in summarize(rows)}
    assert by[(200, 1, "gateway", 1)]["vs_floor"] == pytest.approx(1.5)
    assert by[(200, 1, "gateway", 2)]["vs_floor"] == pytest.approx(110 / 80)
    assert by[(500, 8, "gateway", 1)]["vs_floor"] == pytest.approx(35 / 16)
    assert len(by) == 5


def test_one_round_prints_the_plain_table():
    text = table([row("floor", 1, 15), row("gateway", 1, 30, workers=1)])
    assert "Medians" not in text
    assert "| 200 (20 ms) | 8 | gateway, 1 worker(s) | 30 us | 2.00x | 9001 / 10000 |" in text
