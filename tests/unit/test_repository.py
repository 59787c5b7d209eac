"""The model-repository builder: placeholders, output layout, and Triton-valid configs."""
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from trident.llm_io import LlmSettings
from trident.repo_builder import TemplateError, build_repository, check_nvidia_names, fill_template, parse_nvidia_names

ROOT = Path(__file__).resolve().parents[2]


def test_fill_template_fails_on_missing_value():
    with pytest.raises(TemplateError, match="no value for placeholder.*b"):
        fill_template("x: ${a} y: ${b}", {"a": 1})


def test_fill_template_fails_on_malformed_placeholder():
    with pytest.raises(TemplateError, match="malformed"):
        fill_template("x: ${a} y: ${ b}", {"a": 1})


def cpu_values(model_dir):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_repository", ROOT / "build/build_repository.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import argparse

    args = argparse.Namespace(model_dir=model_dir, max_seq_len=1024, max_new_tokens_limit=512, max_prompt_chars=65536,
                              max_concurrent=64, max_batch_size=8, dtype="bfloat16", num_threads=0,
                              max_queue_size=32)
    return module.cpu_values(args)


def test_unused_value_is_an_error(tmp_path):
    values = {**cpu_values(tmp_path), "no_such_placeholder": 1}
    with pytest.raises(TemplateError, match="no_such_placeholder"):
        build_repository(flavour="cpu", values=values, out_dir=tmp_path / "repo")


def test_cpu_repository_configs_parse_with_tritons_protobuf(tmp_path):
    tracked_before = {p: p.read_bytes() for p in (ROOT / "model_repository").rglob("*") if p.is_file()}
    out = build_repository(flavour="cpu", values=cpu_values(tmp_path), out_dir=tmp_path / "repo")
    configs = {p.parent.name: p for p in out.glob("*/config.pbtxt")}
    assert set(configs) == {"preprocessing", "llm", "ensemble", "tensorrt_llm"}
    parsed = {}
    for name, path in configs.items():
        text = path.read_text()
        assert "${" not in text
        parsed[name] = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert parsed[name].name == name
        assert (out / name / "1").is_dir()
    assert parsed["llm"].model_transaction_policy.decoupled
    assert parsed["tensorrt_llm"].model_transaction_policy.decoupled
    params = {k: v.string_value for k, v in parsed["llm"].parameters.items()}
    assert params["max_context"] == "1024" and params["tokenizer_dir"] == str(tmp_path.resolve())
    settings = LlmSettings.from_parameters(params)  # what the llm model reads back
    assert (settings.max_concurrent, settings.stream_interval, settings.limits.max_context) == (64, 1, 1024)
    # The ensemble is the llm model under NVIDIA's name: its config but the name, its code.
    ens, llm = parsed["ensemble"], parsed["llm"]
    ens.name = "llm"
    assert ens == llm and not ens.HasField("ensemble_scheduling") and ens.backend == "python"
    assert (out / "ensemble" / "1" / "model.py").read_bytes() == (out / "llm" / "1" / "model.py").read_bytes()
    # Tracked templates are never modified by a build.
    assert {p: p.read_bytes() for p in tracked_before} == tracked_before


def _templates(root: Path, models: dict) -> Path:
    """A template root for the cpu flavour with ``models`` (name -> config text) in common/."""
    for name, config in models.items():
        (root / "common" / name / "1").mkdir(parents=True)
        (root / "common" / name / "config.pbtxt.in").write_text(config)
        (root / "common" / name / "1" / "model.py").write_text(f"# {name}\n")
    (root / "cpu").mkdir(parents=True, exist_ok=True)
    return root


def test_an_alias_is_its_source_renamed(tmp_path):
    root = _templates(tmp_path / "t", {"llm": '# llm\nname: "llm"\nmax_batch_size: ${n}\n'})
    out = build_repository(flavour="cpu", values={"n": 4}, out_dir=tmp_path / "repo", template_root=root)
    config = (out / "ensemble" / "config.pbtxt").read_text()
    assert config.splitlines()[1:] == ["# llm", 'name: "ensemble"', "max_batch_size: 4"]
    assert (out / "ensemble" / "1" / "model.py").read_text() == "# llm\n"
    assert (out / "llm" / "config.pbtxt").read_text() == '# llm\nname: "llm"\nmax_batch_size: 4\n'


@pytest.mark.parametrize("names, served", [((), []), (("tensorrt_llm_bls",), ["tensorrt_llm_bls"]),
                                           (("tensorrt_llm_bls", "ensemble"), ["ensemble", "tensorrt_llm_bls"])])
def test_the_nvidia_names_asked_for_are_llm_renamed(tmp_path, names, served):
    root = _templates(tmp_path / "t", {"llm": '# llm\nname: "llm"\n'})
    out = build_repository(flavour="cpu", values={}, out_dir=tmp_path / "repo", template_root=root, nvidia_names=names)
    assert sorted(p.name for p in out.iterdir()) == sorted(["llm", *served])
    for name in served:
        assert (out / name / "config.pbtxt").read_text().splitlines()[1:] == ["# llm", f'name: "{name}"']


def test_nvidia_names_are_checked_before_anything_is_written(tmp_path):
    assert parse_nvidia_names(" tensorrt_llm_bls, ensemble,,tensorrt_llm_bls ") == ("tensorrt_llm_bls", "ensemble")
    assert parse_nvidia_names("") == ()
    assert check_nvidia_names(("ensemble", " ensemble ", "")) == ("ensemble",)
    root = _templates(tmp_path / "t", {"llm": 'name: "llm"\n'})
    with pytest.raises(TemplateError, match="unknown NVIDIA model name.s. llm_bls; choose from ensemble, tensorrt_llm_bls"):
        build_repository(flavour="cpu", values={}, out_dir=tmp_path / "repo", template_root=root, nvidia_names=("llm_bls",))
    assert not (tmp_path / "repo").exists()


def test_build_repository_refuses_an_unknown_nvidia_name(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "build/build_repository.py"), "--model-dir", str(tmp_path),
                           "--out", str(tmp_path / "repo"), "--nvidia-names", "ensemble,bls"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--nvidia-names: unknown NVIDIA model name(s) bls" in proc.stderr, proc.stderr
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("models, message", [
    ({"llm": 'name: "llm"\n', "ensemble": 'name: "ensemble"\n'}, "defined in the templates and as an alias"),
    ({"preprocessing": 'name: "preprocessing"\n'}, "which no template defines"),
    ({"llm": 'name: "other"\n'}, "exactly one top-level line"),
])
def test_an_alias_never_overwrites_or_half_renames(tmp_path, models, message):
    root = _templates(tmp_path / "t", models)
    with pytest.raises(TemplateError, match=message):
        build_repository(flavour="cpu", values={}, out_dir=tmp_path / "repo", template_root=root)
    assert not (tmp_path / "repo").exists()


def test_launcher_sizes_the_python_thread_pool_from_the_llm_concurrency(tmp_path):
    """Each of llm's BLS calls holds a thread of the Python backend's pool until the engine's
    first response, and the pool also sends llm's own responses: the launcher gives it llm's
    max_concurrent_requests (64 here) plus headroom, on CPU and on GPU alike."""
    from trident.triton_launcher import TritonPorts, build_command, python_thread_pool_size
    from trident.trtllm.launch import triton_command

    out = build_repository(flavour="cpu", values=cpu_values(tmp_path), out_dir=tmp_path / "repo")
    assert python_thread_pool_size(out) == 64 + 32
    cmd = build_command(model_repository=out, backend_dir=tmp_path, ports=TritonPorts(1, 2, 3))
    assert "--backend-config=python,thread-pool-size=96" in cmd and "--exit-timeout-secs=30" in cmd
    assert "--backend-config=python,thread-pool-size=96" in triton_command(world_size=1, model_repository=out)


@pytest.mark.parametrize("config, reason", [
    ({"model_type": "gemma2"}, "model_type 'gemma2' is not served"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "dynamic", "factor": 4.0}},
     "unsupported rope type 'dynamic'"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "sliding-window attention"),
])
def test_build_script_refuses_a_checkpoint_the_engine_would_compute_wrongly(tmp_path, config, reason):
    """Refused with the engine's reason when the repository is built, not when Triton loads it."""
    import json
    import subprocess
    import sys

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, **config}))
    (model / "model.safetensors").write_bytes(b"")
    proc = subprocess.run([sys.executable, str(ROOT / "build/build_repository.py"), "--model-dir", str(model),
                           "--out", str(tmp_path / "repo")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "the CPU engine cannot serve this checkpoint" in proc.stderr and reason in proc.stderr
    assert not (tmp_path / "repo").exists()
