"""scripts/load_streams.py's CPU table: it sums the CPU of a started server's whole process group
(children included) and names a Python-backend stub by its model."""
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from load_streams import cpu_by_part  # noqa: E402

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
