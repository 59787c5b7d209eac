"""scripts/load_streams.py's tables: the CPU table sums the CPU of a started server's whole
process group (children included) and names a Python-backend stub by its model; the summary
over rounds takes medians and compares each round with the engine-direct figure of that round."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from load_streams import cpu_by_part, summarize  # noqa: E402

BURN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\ntime.sleep(60)"


def test_cpu_of_a_server_counts_its_children_and_names_stubs_by_model(tmp_path):
    model = tmp_path / "repo" / "llm" / "1" / "model.py"
    model.parent.mkdir(parents=True)
    model.write_text(BURN.format(seconds=0.4))
    # The server (its own session, as trident.child_process.spawn starts it) burns 0.3 s, a
    # plain child 0.2 s, and a child whose command line is a stub's (argv[0] named like Triton's
    # Python-backend stub, the model's path first) 0.4 s.
    parent = f"""
import subprocess, sys
subprocess.Popen([sys.executable, "-c", {BURN.format(seconds=0.2)!r}])
subprocess.Popen(["/opt/tritonserver/backends/python/triton_python_backend_stub", {str(model)!r}],
                 executable=sys.executable)
{BURN.format(seconds=0.3)}
"""
    server = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            parts = cpu_by_part({"triton": server.pid})
            if parts.get("triton", 0) >= 0.5 and parts.get("stub llm", 0) >= 0.4:
                break
            time.sleep(0.1)
        assert set(parts) == {"triton", "stub llm"}  # nothing outside its group (this test process)
        assert parts["stub llm"] >= 0.35
        assert parts["triton"] >= 0.45  # the server and its plain child
    finally:
        subprocess.run(["pkill", "-9", "-g", str(server.pid)], check=False)
        server.wait()


def _row(round_, way, streams, first_batch, cpu=1.0, answered=True):
    if not answered:
        return {"round": round_, "way": way, "streams": streams, "answered": 0}
    return {"round": round_, "way": way, "streams": streams, "answered": streams, "min": first_batch / 2,
            "p50": first_batch * 2, "p99": first_batch * 3, "max": first_batch * 4,
            "first_batch_p50": first_batch, "client_cpu_ms": cpu, "server_cpu_ms": {"triton": cpu * 10}}


def test_the_summary_takes_medians_and_compares_each_round_with_its_own_engine_figure():
    rows = [
        _row(1, "engine", 32, 0.10), _row(1, "gateway", 32, 0.30, cpu=3.0),
        _row(2, "gateway", 32, 0.40, cpu=5.0), _row(2, "engine", 32, 0.20),  # round 2: the other order
        _row(3, "engine", 32, 0.10), _row(3, "gateway", 32, 0.12, cpu=4.0),
        _row(1, "engine", 64, 0.10), _row(1, "gateway", 64, 0.0, answered=False),
        _row(2, "gateway", 64, 0.50), _row(2, "engine", 64, 0.25),
    ]
    summary = {(r["streams"], r["way"]): r for r in summarize(rows)}
    assert list(summary) == [(32, "engine"), (32, "gateway"), (64, "engine"), (64, "gateway")]
    gw = summary[(32, "gateway")]
    # 0.30/0.10, 0.40/0.20, 0.12/0.10: each round against its own engine figure
    assert gw["vs_engine"] == pytest.approx([3.0, 2.0, 1.2])
    assert gw["first_batch_p50"] == 0.30 and gw["client_cpu_ms"] == 4.0 and gw["server_cpu_ms"] == {"triton": 40.0}
    assert gw["p99"] == pytest.approx(0.90) and gw["rounds"] == gw["answered_rounds"] == 3
    assert summary[(32, "engine")]["vs_engine"] == [1.0, 1.0, 1.0]
    late = summary[(64, "gateway")]
    assert (late["rounds"], late["answered_rounds"], late["vs_engine"]) == (2, 1, pytest.approx([2.0]))
    assert summarize([_row(1, "gateway", 32, 0.0, answered=False)]) == [
        {"streams": 32, "way": "gateway", "rounds": 1, "answered_rounds": 0}]


def test_the_first_batch_admission_is_a_median_over_rounds_and_only_where_every_round_has_it(capsys):
    from load_streams import print_table

    rows = [_row(1, "engine", 32, 0.10), {**_row(1, "gateway", 32, 0.30), "first_batch_admitted": 0.12},
            _row(2, "engine", 32, 0.10), {**_row(2, "gateway", 32, 0.20), "first_batch_admitted": 0.08},
            _row(3, "engine", 32, 0.10), {**_row(3, "gateway", 32, 0.25), "first_batch_admitted": 0.30},
            {**_row(1, "gateway", 64, 0.30), "first_batch_admitted": 0.2}, _row(2, "gateway", 64, 0.30)]
    summary = summarize(rows)
    by = {(r["streams"], r["way"]): r for r in summary}
    assert by[(32, "gateway")]["first_batch_admitted"] == 0.12
    assert "first_batch_admitted" not in by[(32, "engine")]
    assert "first_batch_admitted" not in by[(64, "gateway")]  # one round without it: no median of a part
    print_table(summary, 32, 3)
    table = capsys.readouterr().out
    assert "| 32 | gateway | 0.12 / 0.50 / 0.75 / 1.00 | 0.25 | 3.00x / 2.00x / 2.50x | 2.50x | 0.12 | 1.0 ms |" in table
    assert "| 32 | engine | 0.05 / 0.20 / 0.30 / 0.40 | 0.10 | 1.00x / 1.00x / 1.00x | 1.00x | - | 1.0 ms |" in table
