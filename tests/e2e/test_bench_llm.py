"""scripts/bench_llm.py at a tiny size: the echo engine behind the real ``llm`` model, both
clients and the rows they write. Its figures are per token, so every stream's tokens must be
made and counted, straight from the engine and through ``llm`` alike, also for the streams that
wait for one of the engine's slots."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import repo_dir

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
STREAMS, SLOTS = 5, 2  # three streams wait for a slot
TOKENS = 30  # 0.6 s at 20 ms a step


def test_every_token_is_made_and_counted_with_streams_waiting_for_slots(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts/bench_llm.py"), "--source", str(repo_dir()),
                           "--streams", str(STREAMS), "--slots", str(SLOTS), "--pace-ms", "20",
                           "--seconds", str(TOKENS * 0.02), "--llm-instances", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert sorted(r["way"] for r in rows) == ["engine", "llm"]
    for r in rows:
        assert r["tokens_per_stream"] == TOKENS
        assert r["errors"] == 0 and r["tokens"] == STREAMS * TOKENS, r
        assert r["cpu_us_per_token"]["triton"] > 0 and r["cpu_us_per_token"]["tensorrt_llm"] > 0, r
        # Two slots: the streams ran in three waves of about TOKENS steps each.
        assert r["ttft_ms"]["max"] >= 2 * TOKENS * 20 * 0.9, r
    through_llm = next(r for r in rows if r["way"] == "llm")
    assert through_llm["cpu_us_per_token"]["llm"] > 0
    assert "| 5 (20 ms) | through llm, 1 instance(s) |" in done.stdout
