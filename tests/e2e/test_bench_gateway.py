"""``make bench-gateway`` at a tiny size: its echo model, both clients and the row it writes.
The benchmark's figures are only as good as its token counts, so every stream's tokens must
arrive, whole and counted, through the floor client and the gateway alike, in as many
responses as the stream interval gives (the first token alone, then N to a response)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
STREAMS = 3
SECONDS = 2.4  # at 20 ms a token: 120 tokens a stream, some responses of 8 three-digit tokens (32 bytes)


def test_every_token_is_relayed_and_counted_at_each_stream_interval(tmp_path):
    out = tmp_path / "bench.png"
    done = subprocess.run([sys.executable, str(ROOT / "scripts/bench_gateway.py"), "--streams", str(STREAMS),
                           "--workers", "1", "--seconds", str(SECONDS), "--stream-interval", "1,8", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())
    assert out.exists()
    assert sorted((r["kind"], r["stream_interval"]) for r in rows) == [
        ("floor", 1), ("floor", 8), ("gateway", 1), ("gateway", 8)]
    for r in rows:
        tokens = r["tokens_per_stream"]
        assert tokens == 120
        assert r["errors"] == 0 and r["tokens"] == STREAMS * tokens, r
        per_stream = 1 + math.ceil((tokens - 1) / r["stream_interval"])
        assert r["responses"] == STREAMS * per_stream, r
        assert r["cpu_us_per_token"] > 0 and r["relayed_per_s"] > 0
    assert "| 3 (20 ms) | 8 | gateway, 1 worker(s) |" in done.stdout
