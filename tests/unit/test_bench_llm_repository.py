"""scripts/bench_llm.py's repository: the CPU repository's own ``llm`` model (with the asked-for
instances, concurrency and stream interval) in front of the echo engine, whose config keeps the
engine model's interface; every config parses with Triton's protobuf."""
import sys
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from test_repository import cpu_values
from trident.repo_builder import build_repository

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from bench_llm import ECHO_ENGINE, PACING, echo_engine_repository  # noqa: E402


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_echo_engine_behind_the_real_llm_model(tmp_path):
    source = build_repository(flavour="cpu", values=cpu_values(tmp_path), out_dir=tmp_path / "cpu")
    repo = echo_engine_repository(tmp_path / "echo", source, slots=96, interval_ms=12.5, llm_instances=3,
                                  max_concurrent=512, stream_interval=4)
    assert sorted(p.name for p in repo.iterdir()) == ["llm", "tensorrt_llm"]

    llm, original = parse(repo / "llm" / "config.pbtxt"), parse(source / "llm" / "config.pbtxt")
    assert [g.count for g in llm.instance_group] == [3]
    params = {k: v.string_value for k, v in llm.parameters.items()}
    assert params["max_concurrent_requests"] == "512" and params["stream_interval"] == "4"
    assert params["engine_model"] == "tensorrt_llm"
    assert {k: v for k, v in params.items() if k not in ("max_concurrent_requests", "stream_interval")} == {
        k: v.string_value for k, v in original.parameters.items() if k not in ("max_concurrent_requests",
                                                                              "stream_interval")}
    assert (repo / "llm" / "1" / "model.py").read_bytes() == (source / "llm" / "1" / "model.py").read_bytes()

    engine, cpu_engine = parse(repo / "tensorrt_llm" / "config.pbtxt"), parse(source / "tensorrt_llm" / "config.pbtxt")
    assert engine.max_batch_size == 96 and engine.model_transaction_policy.decoupled
    assert engine.input == cpu_engine.input and engine.output == cpu_engine.output
    params = {k: v.string_value for k, v in engine.parameters.items()}
    assert params["max_batch_size"] == "96" and params["interval_ms"] == "12.5"
    assert (repo / "tensorrt_llm" / "1" / "model.py").read_bytes() == (ECHO_ENGINE / "1" / "model.py").read_bytes()
    assert (repo / "tensorrt_llm" / "1" / "pacing.py").read_bytes() == PACING.read_bytes()  # the model imports it


def test_defaults_keep_the_llm_models_stream_interval(tmp_path):
    source = build_repository(flavour="cpu", values=cpu_values(tmp_path), out_dir=tmp_path / "cpu")
    repo = echo_engine_repository(tmp_path / "echo", source, slots=4, interval_ms=20)
    llm = parse(repo / "llm" / "config.pbtxt")
    assert [g.count for g in llm.instance_group] == [1]
    assert {k: v.string_value for k, v in llm.parameters.items()}["stream_interval"] == "1"


def test_the_echo_models_pace_goes_on_after_a_failing_step_and_stops_at_close():
    import threading

    sys.path.insert(0, str(PACING.parent))
    from pacing import Pacer

    steps, enough = [], threading.Event()

    def step():
        steps.append(1)
        if len(steps) == 1:
            raise RuntimeError("a step that fails")
        if len(steps) >= 3:
            enough.set()

    pacer = Pacer(0.005, step)
    assert enough.wait(5), "the pace stopped at the failing step"
    pacer.close()
    after = len(steps)
    assert not pacer._thread.is_alive()
    assert len(steps) == after
