"""The TensorRT-LLM GPU path, checked on CPU: commands, configs, the engine interface, launch.

Nothing here needs a GPU or tensorrt_llm: the build steps are argv lists and JSON edits, and the
commands that would run are faked where a step has to "run".
"""
import json
import re
import shlex
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from trident.contract import Guide, SamplingParams
from trident.engine_tensors import CPU_ENGINE_INPUTS, ENGINE_INPUTS, engine_inputs, stop_inputs
from trident.llm_io import engine_outputs
from trident.repo_builder import PLACEHOLDER, TemplateError, fill_template
from trident.trtllm import TRITON_IMAGE, TRTLLM_VERSION
from trident.trtllm.build import BuildError, run_build
from trident.trtllm.checkpoint import CheckpointError, check_converted, read_model_shape, write_compat_view
from trident.trtllm.checks import (Gpu, GpuSetupError, check_engine_version, explain_failure, list_gpus,
                                   require_pinned_version)
from trident.trtllm.converter import (ConverterNotFound, converter_urls, download_converter, ensure_converter,
                                      find_convert_script, image_paths, download_path)
from trident.trtllm.launch import triton_command, world_size_of
from trident.triton_launcher import GRPC_KEEPALIVE_ARGS
from trident.llm_io import LlmSettings
from trident.trtllm.plan import EngineSettings, PlanError, ServingSettings, check_plan

ROOT = Path(__file__).resolve().parents[2]
CONVERT = "/opt/trtllm/examples/models/core/llama/convert_checkpoint.py"
PY = "/usr/bin/python3"


def write_llama(path: Path, *, heads=32, kv_heads=8, layers=4, rope_theta=500000.0) -> Path:
    """A Llama checkpoint folder as transformers 5 writes it (rope_parameters, TokenizersBackend)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "float32",
        "hidden_size": 64 * heads, "intermediate_size": 128, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "num_hidden_layers": layers, "vocab_size": 1000,
        "max_position_embeddings": 8192, "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "tie_word_embeddings": True,
    }))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "TokenizersBackend", "eos_token": "</s>"}))
    (path / "tokenizer.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    return path


# ---------------------------------------------------------------- dry run: exact commands

def expected_commands(out: Path, *, tp: int) -> tuple[list[str], list[str]]:
    convert = [PY, CONVERT, "--model_dir", f"{out}/hf", "--output_dir", f"{out}/trtllm_checkpoint",
               "--dtype", "bfloat16", "--tp_size", str(tp), "--pp_size", "1"]
    build = ["trtllm-build", "--checkpoint_dir", f"{out}/trtllm_checkpoint", "--output_dir", f"{out}/engines",
             "--gemm_plugin", "auto", "--gpt_attention_plugin", "auto", "--kv_cache_type", "paged",
             "--remove_input_padding", "enable", "--context_fmha", "enable", "--use_paged_context_fmha", "enable",
             "--max_beam_width", "1", "--max_batch_size", "16", "--max_input_len", "1023", "--max_seq_len", "1024",
             "--max_num_tokens", "4096", "--workers", str(tp)]
    return convert, build


def printed_commands(lines):
    return [shlex.split(line.split("$ ", 1)[1]) for line in lines if "$ " in line]


@pytest.mark.parametrize("tp", [1, 2])
def test_dry_run_prints_the_exact_commands(tmp_path, tp):
    model = write_llama(tmp_path / "model")
    out = tmp_path / "out"
    lines = []
    engine = EngineSettings(tp_size=tp, max_batch_size=16, max_seq_len=1024, max_num_tokens=4096)
    layout = run_build(model_dir=model, out_dir=out, engine=engine, serving=ServingSettings(), dry_run=True,
                       convert_script=CONVERT, python=PY, log=lines.append,
                       popen=pytest.fail, gpus=pytest.fail, trtllm_version=pytest.fail)
    assert printed_commands(lines) == list(expected_commands(out.resolve(), tp=tp))
    assert (layout.repository_dir / "tensorrt_llm" / "config.pbtxt").is_file()
    assert not layout.engine_dir.exists() and not layout.stamp.exists()


def test_build_engine_entry_point_dry_run_tp2(tmp_path):
    model = write_llama(tmp_path / "model")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "build/build_engine.py"), "--model-dir", str(model), "--out", str(out),
         "--tp-size", "2", "--max-batch-size", "16", "--max-seq-len", "1024", "--max-num-tokens", "4096",
         "--convert-script", CONVERT, "--dry-run"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    convert, build = expected_commands(out.resolve(), tp=2)
    convert[0] = sys.executable
    assert printed_commands(proc.stdout.splitlines()) == [convert, build]
    # NVIDIA's name for the llm model: ensemble by default (in the dry run's configs too)
    assert sorted(p.name for p in (out / "model_repository").iterdir() if p.is_dir()) == [
        "ensemble", "llm", "preprocessing", "tensorrt_llm"]


def test_build_engine_refuses_an_unknown_nvidia_name(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "build/build_engine.py"), "--model-dir", str(write_llama(tmp_path / "model")),
         "--out", str(tmp_path / "out"), "--convert-script", CONVERT, "--dry-run", "--nvidia-names", "bls"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--nvidia-names: unknown NVIDIA model name(s) bls" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("names, served", [("tensorrt_llm_bls", ["tensorrt_llm_bls"]), ("", []),
                                           ("ensemble,tensorrt_llm_bls", ["ensemble", "tensorrt_llm_bls"])])
def test_build_engine_serves_the_nvidia_names_asked_for(tmp_path, names, served):
    """--nvidia-names: NVIDIA's names served as copies of llm in the TensorRT-LLM repository too."""
    model = write_llama(tmp_path / "model")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "build/build_engine.py"), "--model-dir", str(model), "--out", str(out),
         "--max-batch-size", "16", "--max-seq-len", "1024", "--convert-script", CONVERT, "--dry-run",
         "--nvidia-names", names], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    models = sorted(p.name for p in (out / "model_repository").iterdir() if p.is_dir())
    assert models == sorted(["llm", "preprocessing", "tensorrt_llm", *served])
    for name in served:
        config = (out / "model_repository" / name / "config.pbtxt").read_text()
        assert f'\nname: "{name}"\n' in config and "backend: \"python\"" in config


def test_tp_that_does_not_split_the_heads_is_refused_with_the_sizes_that_work(tmp_path):
    model = write_llama(tmp_path / "model", heads=9, kv_heads=3)  # SmolLM2-135M's shape
    with pytest.raises(PlanError, match=r"9 attention heads.*\[1, 3, 9\]"):
        run_build(model_dir=model, out_dir=tmp_path / "out", engine=EngineSettings(tp_size=2),
                  serving=ServingSettings(), dry_run=True, convert_script=CONVERT, log=lambda _: None)


@pytest.mark.parametrize("engine, message", [
    (EngineSettings(max_seq_len=1024, max_num_tokens=512), "max-num-tokens 512 is below --max-input-len 1023"),
    (EngineSettings(max_seq_len=1024, max_input_len=1024), "below --max-seq-len 1024"),
    (EngineSettings(dtype="float32"), "--dtype float32"),
    (EngineSettings(pp_size=5), "--pp-size 5 is more than the model's 4 layers"),
])
def test_impossible_plans_name_the_knob(tmp_path, engine, message):
    shape = read_model_shape(write_llama(tmp_path / "model"))
    with pytest.raises(PlanError, match=re.escape(message)):
        check_plan(engine=engine, serving=ServingSettings(), shape=shape)


def test_bad_serving_knobs_are_refused(tmp_path):
    shape = read_model_shape(write_llama(tmp_path / "model"))
    with pytest.raises(PlanError, match="kv-cache-free-gpu-mem-fraction 1.5"):
        check_plan(engine=EngineSettings(), serving=ServingSettings(kv_cache_free_gpu_mem_fraction=1.5), shape=shape)
    with pytest.raises(PlanError, match="--stream-interval must be at least 1, got 0"):
        check_plan(engine=EngineSettings(), serving=ServingSettings(stream_interval=0), shape=shape)
    with pytest.raises(PlanError, match="--nvidia-names: unknown NVIDIA model name.s. triton_ensemble"):
        check_plan(engine=EngineSettings(), serving=ServingSettings(nvidia_names=("triton_ensemble",)), shape=shape)


# ---------------------------------------------------------------- the filled repository

@pytest.fixture(scope="module")
def trtllm_repo(tmp_path_factory):
    base = tmp_path_factory.mktemp("trtllm")
    model = write_llama(base / "model")
    layout = run_build(model_dir=model, out_dir=base / "out", dry_run=True, convert_script=CONVERT,
                       engine=EngineSettings(max_batch_size=24, max_seq_len=1024, max_num_tokens=4096),
                       serving=ServingSettings(kv_cache_free_gpu_mem_fraction=0.8, enable_kv_cache_reuse=False,
                                               batch_scheduler_policy="max_utilization", stream_interval=4),
                       log=lambda _: None)
    return layout


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_every_trtllm_config_parses_with_tritons_protobuf(trtllm_repo):
    configs = {p.parent.name: p for p in trtllm_repo.repository_dir.glob("*/config.pbtxt")}
    assert set(configs) == {"preprocessing", "llm", "ensemble", "tensorrt_llm"}
    for name, path in configs.items():
        text = path.read_text()
        assert "${" not in text and not PLACEHOLDER.search(text)
        assert parse(text).name == name
        assert (path.parent / "1").is_dir()
    llm = parse(configs["llm"].read_text())
    params = {k: v.string_value for k, v in llm.parameters.items()}
    assert params["engine_model"] == "tensorrt_llm"
    assert params["max_context"] == "1024" and params["max_new_tokens_limit"] == "1023"
    assert params["tokenizer_dir"] == str(trtllm_repo.hf_dir)
    assert LlmSettings.from_parameters(params).stream_interval == 4  # the llm model reads it back


def engine_config(repo) -> model_config_pb2.ModelConfig:
    return parse((repo.repository_dir / "tensorrt_llm" / "config.pbtxt").read_text())


def backend_bool(value: str) -> bool:
    """ModelState::GetParameter<bool> of the 1.2.x backend: anything else throws."""
    table = {"True": True, "true": True, "TRUE": True, "1": True, "False": False, "false": False, "FALSE": False, "0": False}
    assert value in table, f"the backend cannot read {value!r} as a boolean"
    return table[value]


def test_tensorrt_llm_model_is_the_inflight_batching_backend(trtllm_repo):
    config = engine_config(trtllm_repo)
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert config.backend == "tensorrtllm"
    assert config.model_transaction_policy.decoupled
    assert config.max_batch_size == 24
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["gpt_model_path"] == str(trtllm_repo.engine_dir)
    assert params["max_beam_width"] == "1"
    assert params["batch_scheduler_policy"] == "max_utilization"
    assert float(params["kv_cache_free_gpu_mem_fraction"]) == 0.8
    assert backend_bool(params["enable_kv_cache_reuse"]) is False
    assert backend_bool(params["exclude_input_in_output"]) is True
    # Read without a default by getGuidedDecodingConfigFromParams: missing -> the model fails to load.
    for key in ("tokenizer_dir", "guided_decoding_backend", "xgrammar_tokenizer_info_path"):
        assert key in params, key
    assert params["guided_decoding_backend"] == ""


# ---------------------------------------------------------------- the engine interface

# Input names TensorRT-LLM 1.2's C++ backend reads (triton_backend/inflight_batcher_llm/src/
# utils.h, InputFieldsNames, plus kStopInputTensorName and kStreamingInputTensorName). A tensor
# with any other name is accepted by Triton if declared, and then ignored.
BACKEND_INPUTS = {
    "input_ids", "encoder_input_features", "encoder_output_lengths", "input_lengths", "decoder_input_ids",
    "request_output_len", "no_repeat_ngram_size", "num_return_sequences", "end_id", "pad_id",
    "bad_words_list", "stop_words_list", "embedding_bias", "context_phase_params", "cross_attention_mask",
    "skip_cross_attn_blocks", "multimodal_embedding", "return_log_probs", "return_generation_logits",
    "return_context_logits", "exclude_input_in_output", "return_perf_metrics", "return_kv_cache_reuse_stats",
    "beam_width", "runtime_top_k", "runtime_top_p", "runtime_top_k_min", "runtime_top_p_decay",
    "runtime_top_p_reset_ids", "temperature", "len_penalty", "early_stopping", "repetition_penalty",
    "min_tokens", "beam_search_diversity_rate", "presence_penalty", "frequency_penalty", "seed",
    "prompt_embedding_table", "prompt_table_extra_ids", "mrope_rotary_cos_sin", "mrope_position_deltas",
    "lora_task_id", "lora_weights", "lora_config", "draft_input_ids", "draft_logits",
    "draft_acceptance_threshold", "retention_token_range_starts", "retention_token_range_ends",
    "retention_token_range_priorities", "retention_token_range_durations_ms", "retention_decode_priority",
    "retention_decode_duration_ms", "guided_decoding_guide_type", "guided_decoding_guide",
    "lookahead_window_size", "lookahead_ngram_size", "lookahead_verification_set_size",
    "stop", "streaming",
}
TRITON_DTYPES = {np.dtype(np.object_): "TYPE_STRING", np.dtype(np.int32): "TYPE_INT32", np.dtype(np.uint64): "TYPE_UINT64", np.dtype(np.float32): "TYPE_FP32",
                 np.dtype(np.bool_): "TYPE_BOOL", np.dtype(np.int64): "TYPE_INT64"}
def sent_tensors() -> dict:
    """Every tensor the llm model can send (trident.engine_tensors, the functions it calls):
    sampled with every option, greedy, and the stop request."""
    sent = {}
    for sampling in (SamplingParams(max_new_tokens=8, temperature=0.7, top_k=40, top_p=0.9,
                                    repetition_penalty=1.1, seed=7),
                     SamplingParams(max_new_tokens=8, temperature=0.0),
                     # every output control (issue 15); min_p and alternatives: CPU engine only
                     SamplingParams(max_new_tokens=8, n=3, min_tokens=2, presence_penalty=0.5, frequency_penalty=0.5,
                                    logit_bias=((3, 1.0),), min_p=0.1, logprobs=5,
                                    guide=Guide("json_schema", '{"type": "object"}'))):
        sent.update(engine_inputs(sampling, input_ids=[1, 2, 3], end_id=2, pad_id=2, bad_words_ids=[[5, 6], [7]],
                                  vocab_size=10))
    for name, value in stop_inputs().items():
        sent.setdefault(name, value)
    assert set(sent) <= set(ENGINE_INPUTS) | set(CPU_ENGINE_INPUTS)
    return sent


def read_outputs(flavour: str) -> set:
    """What the llm model may ask the engine for (trident.llm_io.engine_outputs)."""
    every = SamplingParams(n=2, logprobs=3) if flavour == "cpu" else SamplingParams(n=2, logprobs=0)
    return set(engine_outputs(every))


def cpu_engine_config():
    path = ROOT / "model_repository/cpu/tensorrt_llm/config.pbtxt.in"
    if not path.is_file():
        pytest.skip("model_repository/cpu/tensorrt_llm/config.pbtxt.in does not exist yet")
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_repository", ROOT / "build/build_repository.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    values = module.cpu_values(argparse.Namespace(
        model_dir=ROOT, max_seq_len=1024, max_new_tokens_limit=512, max_prompt_chars=65536, max_concurrent=64, max_batch_size=8,
        dtype="bfloat16", num_threads=0, max_queue_size=32))
    text = path.read_text()
    values = {**{m.group(1): "1" for m in PLACEHOLDER.finditer(text)}, **values}
    try:
        filled = fill_template(text, values, source=str(path))
    except TemplateError as exc:  # the repo builder would refuse the CPU flavour the same way
        pytest.fail(f"the CPU engine template does not fill: {exc}")
    return parse(filled)


@pytest.fixture(scope="module", params=["trtllm", "cpu"])
def engine(request, trtllm_repo):
    return request.param, engine_config(trtllm_repo) if request.param == "trtllm" else cpu_engine_config()


def shape_fits(config, inp, shape) -> bool:
    dims = ([-1] if config.max_batch_size > 0 else []) + list(inp.dims)
    return len(dims) == len(shape) and all(d in (-1, s) for d, s in zip(dims, shape))


@pytest.mark.parametrize("name", sorted(sent_tensors()))
def test_engine_declares_every_tensor_the_llm_model_sends(engine, name):
    flavour, config = engine
    value = sent_tensors()[name]
    inputs = {i.name: i for i in config.input}
    if flavour == "trtllm" and name in CPU_ENGINE_INPUTS:
        assert name not in inputs  # the llm model refuses such a request on GPU (engine_features)
        return
    assert name in inputs, f"{flavour}: the llm model sends {name!r}, the engine model does not declare it"
    inp = inputs[name]
    assert model_config_pb2.DataType.Name(inp.data_type) == TRITON_DTYPES[value.dtype], name
    assert shape_fits(config, inp, value.shape), f"{name}: sent {value.shape}, declared {list(inp.dims)}"
    if flavour == "trtllm":
        assert name in BACKEND_INPUTS, f"TensorRT-LLM's backend ignores an input named {name!r}"


def test_engine_requires_only_what_every_llm_request_sends(engine):
    flavour, config = engine
    always = set(engine_inputs(SamplingParams(max_new_tokens=1), input_ids=[1], end_id=2, pad_id=2))
    stop = {"input_ids", "input_lengths", "request_output_len", "stop"}
    required = {i.name for i in config.input if not i.optional}
    assert required <= always & stop, f"{flavour}: required inputs {required - (always & stop)} are not always sent"


def test_engine_returns_what_the_llm_model_reads(engine):
    flavour, config = engine
    outputs = {o.name: o for o in config.output}
    for name in read_outputs(flavour):
        assert name in outputs, f"{flavour}: the llm model reads {name!r}"
        dtype = "TYPE_FP32" if "log_probs" in name else "TYPE_INT32"
        assert model_config_pb2.DataType.Name(outputs[name].data_type) == dtype, name
    assert "output_ids" in read_outputs(flavour)
    assert config.model_transaction_policy.decoupled


def test_trtllm_declares_only_inputs_the_backend_reads(trtllm_repo):
    unknown = {i.name for i in engine_config(trtllm_repo).input} - BACKEND_INPUTS
    assert not unknown, f"declared but ignored by TensorRT-LLM 1.2's backend: {unknown}"


# ---------------------------------------------------------------- checkpoint compatibility

def test_compat_view_makes_the_checkpoint_readable_by_transformers_4_57(tmp_path):
    model = write_llama(tmp_path / "model", rope_theta=100000.0)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    view = write_compat_view(model_dir=model, out_dir=tmp_path / "hf")
    config = json.loads((view / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["torch_dtype"] == "float32"
    assert config["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}
    assert "rope_scaling" not in config
    assert json.loads((view / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (view / "model.safetensors").is_symlink()
    assert not (view / "tokenizer.json").is_symlink()
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    write_compat_view(model_dir=model, out_dir=tmp_path / "hf")  # again: replaces, no error


def test_a_llama3_rope_built_unscaled_is_refused(tmp_path):
    """Llama 3.1+: the compat view spells transformers 5's rope_parameters as rope_scaling, the
    converter copies it into rotary_scaling; one without it (or another factor) is refused."""
    path = write_llama(tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    config["rope_parameters"] = {**scaling, "rope_theta": 500000.0}
    (path / "config.json").write_text(json.dumps(config))
    shape = read_model_shape(path)
    assert shape.rope_scaling == ("llama3", 32.0)
    view = write_compat_view(model_dir=path, out_dir=tmp_path / "hf")
    assert json.loads((view / "config.json").read_text())["rope_scaling"] == scaling
    # a null rope_scaling beside rope_parameters would hide the scaling from transformers 4.57
    (path / "config.json").write_text(json.dumps({**config, "rope_scaling": None}))
    assert read_model_shape(path).rope_scaling == ("llama3", 32.0)
    view = write_compat_view(model_dir=path, out_dir=tmp_path / "hf")
    assert json.loads((view / "config.json").read_text())["rope_scaling"] == scaling
    (path / "config.json").write_text(json.dumps(config))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "rank0.safetensors").write_bytes(b"")
    for rotary_scaling, ok in ((scaling, True), ({**scaling, "type": "llama3"}, True), (None, False),
                               ({**scaling, "factor": 8.0}, False)):
        (ckpt / "config.json").write_text(json.dumps({**converted_config(shape), "rotary_scaling": rotary_scaling}))
        if ok:
            check_converted(checkpoint_dir=ckpt, shape=shape, tp_size=1, pp_size=1, dtype="bfloat16")
        else:
            with pytest.raises(CheckpointError, match="rotary_scaling"):
                check_converted(checkpoint_dir=ckpt, shape=shape, tp_size=1, pp_size=1, dtype="bfloat16")


def converted_config(shape, *, rotary_base=None, tp=1):
    """What the family's converter writes (tensorrt_llm/models/{llama,qwen}/config.py: the HF
    architecture kept, rotary_base, and qwen_type from the HF model_type for Qwen)."""
    config = {"architecture": shape.architecture, "dtype": "bfloat16", "num_hidden_layers": shape.num_hidden_layers,
              "num_attention_heads": shape.num_attention_heads, "hidden_size": shape.hidden_size,
              "rotary_base": shape.rope_theta if rotary_base is None else rotary_base,
              "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1}}
    if shape.family == "qwen":
        config["qwen_type"] = shape.model_type
    if shape.family == "phi":  # tensorrt_llm/models/phi3/config.py
        config.update(rotary_pct=shape.partial_rotary_factor, position_embedding_type="rope_gpt_neox",
                      rotary_scaling=None)
        if shape.long_rope is not None:
            short, long, context = shape.long_rope
            config.update(position_embedding_type="long_rope", longrope_scaling_short_factors=list(short),
                          longrope_scaling_long_factors=list(long), original_max_position_embeddings=context)
    return config


def write_qwen(path: Path, model_type: str) -> Path:
    """A Qwen2 / Qwen3 checkpoint folder as transformers 5 writes it."""
    write_llama(path, heads=16, kv_heads=8, rope_theta=1000000.0)
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=[f"{model_type.capitalize()}ForCausalLM"], model_type=model_type)
    if model_type == "qwen3":
        config.update(head_dim=128, attention_bias=False)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_checkpoints_build_with_the_qwen_converter(tmp_path, model_type):
    """The family's own converter (found in the image, or downloaded from the release), its
    converted config checked for the Qwen variant, then the same trtllm-build and repository."""
    shape = read_model_shape(write_qwen(tmp_path / "model", model_type))
    assert (shape.family, shape.model_type, shape.rope_theta) == ("qwen", model_type, 1000000.0)
    tools = FakeTools(shape)
    layout = fake_build(tmp_path, tools)
    assert (layout.engine_dir / "rank0.engine").is_file()
    assert json.loads((layout.hf_dir / "config.json").read_text())["rope_theta"] == 1000000.0
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "rank0.safetensors").write_bytes(b"")
    (ckpt / "config.json").write_text(json.dumps({**converted_config(shape), "qwen_type": "qwen2_moe"}))
    with pytest.raises(CheckpointError, match=f"qwen_type: 'qwen2_moe', expected '{model_type}'"):
        check_converted(checkpoint_dir=ckpt, shape=shape, tp_size=1, pp_size=1, dtype="bfloat16")
    image, downloaded = image_paths("qwen")[0], download_path("qwen")
    assert image == Path("/app/examples/models/core/qwen/convert_checkpoint.py")
    assert downloaded == Path(f"/opt/trident/third_party/tensorrt_llm/{TRTLLM_VERSION}/qwen/convert_checkpoint.py")
    assert converter_urls(family="qwen")[0] == (
        f"https://raw.githubusercontent.com/NVIDIA/TensorRT-LLM/release/{TRTLLM_VERSION}/"
        "examples/models/core/qwen/convert_checkpoint.py")


def write_mistral(path: Path, *, sliding_window) -> Path:
    """A Mistral checkpoint folder as transformers 5 writes it: v0.1 has a window of 4096, v0.2 /
    v0.3 and Mistral-Nemo null."""
    write_llama(path, heads=32, kv_heads=8, rope_theta=1000000.0)
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=sliding_window,
                  max_position_embeddings=32768)
    (path / "config.json").write_text(json.dumps(config))
    return path


def engine_parameters(layout) -> dict[str, str]:
    config = parse((layout.repository_dir / "tensorrt_llm" / "config.pbtxt").read_text())
    return {k: v.string_value for k, v in config.parameters.items()}


@pytest.mark.parametrize("window, max_seq_len, expected", [
    (4096, 8192, "4096"),  # Mistral v0.1 past its window: the backend keeps the last 4096 positions
    (4096, 4096, None),    # sequences no longer than the window: nothing to set
    (None, 8192, None),    # v0.2 / v0.3: no window
])
def test_mistral_builds_with_the_llama_converter_and_its_window(tmp_path, window, max_seq_len, expected):
    """MODEL_MAP sends MistralForCausalLM to LLaMAForCausalLM and the Llama converter keeps the HF
    architecture; the sliding window is the backend's max_attention_window_size, written into the
    tensorrt_llm config only where it limits attention (parsed with Triton's protobuf)."""
    shape = read_model_shape(write_mistral(tmp_path / "model", sliding_window=window))
    assert (shape.family, shape.architecture, shape.sliding_window) == ("llama", "MistralForCausalLM", window)
    lines = []
    layout = run_build(model_dir=tmp_path / "model", out_dir=tmp_path / "out", dry_run=True, convert_script=CONVERT,
                       engine=EngineSettings(max_seq_len=max_seq_len, max_num_tokens=max_seq_len),
                       serving=ServingSettings(), python=PY, log=lines.append,
                       popen=pytest.fail, gpus=pytest.fail, trtllm_version=pytest.fail)
    convert = printed_commands(lines)[0]
    assert convert[:2] == [PY, CONVERT] and "llama" in convert[1]
    assert engine_parameters(layout).get("max_attention_window_size") == expected
    text = (layout.repository_dir / "tensorrt_llm" / "config.pbtxt").read_text()
    assert text.count('key: "max_attention_window_size"') == (expected is not None)
    tools = FakeTools(shape)
    built = fake_build(tmp_path / "built", tools, model_dir=tmp_path / "model")
    assert [Path(c[1]).name for c in tools.calls[:1]] == ["convert_checkpoint.py"]
    assert engine_parameters(built).get("max_attention_window_size") == (
        str(window) if window is not None and window < 512 else None)  # fake_build: max_seq_len 512
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "rank0.safetensors").write_bytes(b"")
    (ckpt / "config.json").write_text(json.dumps({**converted_config(shape), "architecture": "LlamaForCausalLM"}))
    with pytest.raises(CheckpointError, match="architecture: 'LlamaForCausalLM', expected 'MistralForCausalLM'"):
        check_converted(checkpoint_dir=ckpt, shape=shape, tp_size=1, pp_size=1, dtype="bfloat16")


def test_a_short_window_reaches_the_backend_from_the_fake_build(tmp_path):
    """The full (faked) build writes the window too (fake_build's engine has max_seq_len 512)."""
    write_mistral(tmp_path / "model", sliding_window=256)
    layout = fake_build(tmp_path, FakeTools(read_model_shape(tmp_path / "model")))
    assert engine_parameters(layout)["max_attention_window_size"] == "256"


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True,
      "sliding_window": 4096, "max_window_layers": 2}, "use_sliding_window turns on sliding-window attention"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 0},
     "sliding_window must be a positive integer or null, got 0"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": "4096"},
     "sliding_window must be a positive integer or null, got '4096'"),
])
def test_windows_the_build_cannot_set_up_are_refused(tmp_path, change, message):
    path = write_llama(tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message):
        read_model_shape(path)


def test_windows_of_other_families_are_not_read(tmp_path):
    """Qwen2's sliding_window without use_sliding_window is off (transformers reads it so): no
    parameter, as for a Llama config."""
    path = write_qwen(tmp_path / "model", "qwen2")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "sliding_window": 64, "use_sliding_window": False}))
    assert read_model_shape(path).sliding_window is None


def write_phi3(path: Path, *, long_rope: bool, partial: float = 1.0, window: int | None = None) -> Path:
    """A Phi-3 checkpoint folder written by transformers 5's own Phi3Config (rope_parameters):
    Phi-3-mini-4k (no LongRoPE, window 2047), Phi-3.5-mini (LongRoPE), Phi-4-mini (LongRoPE over
    3/4 of each head, tied embeddings)."""
    import transformers

    write_llama(path)
    head_dim, heads = 64, 8
    pairs = int(head_dim * partial) // 2
    kwargs = dict(max_position_embeddings=4096)
    if long_rope:
        kwargs = dict(max_position_embeddings=131072, original_max_position_embeddings=4096, rope_scaling={
            "rope_type": "longrope", "short_factor": [1.0 + i / 100 for i in range(pairs)],
            "long_factor": [2.0 + i / 10 for i in range(pairs)]})
    transformers.Phi3Config(
        hidden_size=head_dim * heads, num_attention_heads=heads, num_key_value_heads=4, num_hidden_layers=4,
        intermediate_size=128, vocab_size=1000, rope_theta=10000.0, partial_rotary_factor=partial,
        sliding_window=window, tie_word_embeddings=partial != 1.0, architectures=["Phi3ForCausalLM"],
        bos_token_id=1, eos_token_id=2, pad_token_id=2, **kwargs).save_pretrained(path)
    return path


@pytest.mark.parametrize("long_rope, partial, window, max_seq_len, expected_window", [
    (False, 1.0, 2047, 4096, "2047"),    # Phi-3-mini-4k: its window is the backend's
    (True, 1.0, 262144, 8192, None),     # Phi-3.5-mini: LongRoPE, a window longer than any sequence
    (True, 0.75, 262144, 8192, None),    # Phi-4-mini: LongRoPE over 3/4 of each head
])
def test_phi3_builds_with_the_phi_converter(tmp_path, long_rope, partial, window, max_seq_len, expected_window):
    """The Phi converter (examples/models/core/phi) reads transformers 4.57's Phi3Config: the compat
    view writes LongRoPE as the three-field rope_scaling it accepts and the context and partial
    factor at the top level; the converted config is checked for LongRoPE (which TensorRT-LLM
    turns on only from 128000 positions), both factor lists, the context and rotary_pct."""
    model = write_phi3(tmp_path / "model", long_rope=long_rope, partial=partial, window=window)
    shape = read_model_shape(model)
    assert (shape.family, shape.partial_rotary_factor, shape.sliding_window) == ("phi", partial, window)
    pairs = int(64 * partial) // 2
    if long_rope:
        short, long, context = shape.long_rope
        assert (len(short), len(long), context, long[1]) == (pairs, pairs, 4096, 2.1)
    else:
        assert shape.long_rope is None
    layout = run_build(model_dir=model, out_dir=tmp_path / "out", dry_run=True, convert_script=CONVERT,
                       engine=EngineSettings(max_seq_len=max_seq_len, max_num_tokens=max_seq_len),
                       serving=ServingSettings(), python=PY, log=lambda _: None,
                       popen=pytest.fail, gpus=pytest.fail, trtllm_version=pytest.fail)
    view = json.loads((layout.hf_dir / "config.json").read_text())
    assert view["rope_theta"] == 10000.0 and view["partial_rotary_factor"] == partial
    if long_rope:
        # transformers 4.57.3's Phi3Config._rope_scaling_validation: exactly these three fields
        assert view["rope_scaling"] == {"type": "longrope", "short_factor": list(short), "long_factor": list(long)}
        assert view["original_max_position_embeddings"] == 4096
    else:
        assert "rope_scaling" not in view
    assert engine_parameters(layout).get("max_attention_window_size") == expected_window
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "rank0.safetensors").write_bytes(b"")
    good = converted_config(shape)
    (ckpt / "config.json").write_text(json.dumps(good))
    check_converted(checkpoint_dir=ckpt, shape=shape, tp_size=1, pp_size=1, dtype="bfloat16")
    wrongs = [({"rotary_pct": 1.0 if partial != 1.0 else 0.5}, "rotary_pct")]
    if long_rope:
        wrongs += [({"position_embedding_type": "rope_gpt_neox"}, "position_embedding_type: 'rope_gpt_neox', "
                                                                  "expected 'long_rope'"),
                   ({"longrope_scaling_long_factors": list(short)}, "longrope_scaling_long_factors"),
                   ({"original_max_position_embeddings": 131072}, "original_max_position_embeddings: 131072")]
    else:
        wrongs += [({"position_embedding_type": "long_rope"}, "expected 'rope_gpt_neox'")]
    for change, message in wrongs:
        (ckpt / "config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(CheckpointError, match=re.escape(message)):
            check_converted(checkpoint_dir=ckpt, shape=shape, tp_size=1, pp_size=1, dtype="bfloat16")
    tools = FakeTools(shape)
    built = fake_build(tmp_path / "built", tools, model_dir=model)
    assert (built.engine_dir / "rank0.engine").is_file()
    with pytest.raises(PlanError, match="Phi converter has no pipeline parallelism"):
        check_plan(engine=EngineSettings(pp_size=2), serving=ServingSettings(), shape=shape)


def test_phi3_long_rope_the_converter_would_drop_or_refuse_is_refused(tmp_path):
    path = write_phi3(tmp_path / "model", long_rope=True)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 65536}))
    with pytest.raises(CheckpointError, match="builds LongRoPE only from 128000 positions up"):
        read_model_shape(path)
    params = {**config["rope_parameters"], "short_factor": [1.0] * 5}
    (path / "config.json").write_text(json.dumps({**config, "rope_parameters": params}))
    with pytest.raises(CheckpointError, match="LongRoPE with 32 short and 32 long factors"):
        read_model_shape(path)
    # a null rope_scaling beside transformers 5's rope_parameters would hide LongRoPE from 4.57
    (path / "config.json").write_text(json.dumps({**config, "rope_scaling": None}))
    assert read_model_shape(path).long_rope is not None
    view = write_compat_view(model_dir=path, out_dir=tmp_path / "hf-null")
    assert json.loads((view / "config.json").read_text())["rope_scaling"]["type"] == "longrope"
    # a config.json already in transformers 4's spelling (as the Hub's Phi-3 ones) is kept as it is
    old = {k: v for k, v in config.items() if k != "rope_parameters"}
    old.update(rope_theta=10000.0, rope_scaling={"type": "su", "short_factor": [1.0] * 32, "long_factor": [2.0] * 32})
    (path / "config.json").write_text(json.dumps(old))
    shape = read_model_shape(path)
    assert shape.long_rope == ((1.0,) * 32, (2.0,) * 32, 4096)
    view = write_compat_view(model_dir=path, out_dir=tmp_path / "hf")
    assert json.loads((view / "config.json").read_text())["rope_scaling"] == old["rope_scaling"]


def test_the_family_picks_the_converter_found_in_the_image(tmp_path):
    found = {family: tmp_path / family / "convert_checkpoint.py" for family in ("llama", "phi", "qwen")}
    for path in found.values():
        path.parent.mkdir()
        path.write_text(CONVERTER_TEXT)
    for family, path in found.items():
        assert find_convert_script(env={}, candidates=(path,), family=family) == path
    assert find_convert_script(env={"TRIDENT_TRTLLM_CONVERT_SCRIPT": "/mine.py"}, family="qwen") == Path("/mine.py")
    assert image_paths("phi")[0] == Path("/app/examples/models/core/phi/convert_checkpoint.py")
    assert download_path("phi") == Path(f"/opt/trident/third_party/tensorrt_llm/{TRTLLM_VERSION}/phi/convert_checkpoint.py")


def test_other_architectures_are_refused_with_the_supported_ones(tmp_path):
    path = write_llama(tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["Gemma2ForCausalLM"]}))
    with pytest.raises(CheckpointError, match="supports LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        read_model_shape(path)


def test_converted_checkpoint_with_the_default_rope_base_is_refused(tmp_path):
    shape = read_model_shape(write_llama(tmp_path / "model", rope_theta=100000.0))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "rank0.safetensors").write_bytes(b"")
    (ckpt / "config.json").write_text(json.dumps(converted_config(shape)))
    check_converted(checkpoint_dir=ckpt, shape=shape, tp_size=1, pp_size=1, dtype="bfloat16")
    (ckpt / "config.json").write_text(json.dumps(converted_config(shape, rotary_base=10000.0)))
    with pytest.raises(CheckpointError, match="rotary_base: 10000.0, expected 100000.0"):
        check_converted(checkpoint_dir=ckpt, shape=shape, tp_size=1, pp_size=1, dtype="bfloat16")
    (ckpt / "config.json").write_text(json.dumps(converted_config(shape, tp=2)))
    with pytest.raises(CheckpointError, match="rank1.safetensors"):
        check_converted(checkpoint_dir=ckpt, shape=shape, tp_size=2, pp_size=1, dtype="bfloat16")


# ---------------------------------------------------------------- a full (faked) build

class FakeProcess:
    def __init__(self, lines, returncode):
        self.stdout = iter(line + "\n" for line in lines)
        self.returncode = returncode

    def wait(self):
        return self.returncode


class FakeTools:
    """Stands in for convert_checkpoint.py and trtllm-build: writes what they would write."""

    def __init__(self, shape, *, version=TRTLLM_VERSION, build_output=("[I] built",), build_rc=0):
        self.shape, self.version, self.calls = shape, version, []
        self.build_output, self.build_rc = build_output, build_rc

    def __call__(self, argv, **kwargs):
        self.calls.append(argv)
        opts = dict(zip(argv[1::1], argv[2::1]))
        if argv[0] == "trtllm-build":
            if self.build_rc:
                return FakeProcess(self.build_output, self.build_rc)
            out = Path(opts["--output_dir"])
            out.mkdir(parents=True)
            (out / "config.json").write_text(json.dumps({"version": self.version, "pretrained_config": {
                "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1}}}))
            (out / "rank0.engine").write_bytes(b"engine")
            return FakeProcess(self.build_output, 0)
        out = Path(opts["--output_dir"])
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps(converted_config(self.shape)))
        (out / "rank0.safetensors").write_bytes(b"")
        return FakeProcess(["converted"], 0)


def fake_build(tmp_path, tools, model_dir=None, **kwargs):
    script = tmp_path / "convert_checkpoint.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("")
    return run_build(model_dir=model_dir or tmp_path / "model", out_dir=tmp_path / "out",
                     engine=EngineSettings(max_seq_len=512),
                     serving=ServingSettings(), convert_script=str(script), log=lambda _: None, popen=tools,
                     gpus=lambda: [Gpu(0, "NVIDIA H100", 81559, "580.95")],
                     trtllm_version=lambda python: TRTLLM_VERSION, **kwargs)


def test_build_runs_convert_then_trtllm_build_and_skips_a_matching_rebuild(tmp_path):
    shape = read_model_shape(write_llama(tmp_path / "model"))
    tools = FakeTools(shape)
    layout = fake_build(tmp_path, tools, skip_existing=True)
    assert [c[0] for c in tools.calls] == [sys.executable, "trtllm-build"]
    assert (layout.engine_dir / "rank0.engine").is_file()
    assert not layout.checkpoint_dir.exists()  # the intermediate checkpoint is removed
    stamp = json.loads(layout.stamp.read_text())
    assert stamp["tensorrt_llm"] == TRTLLM_VERSION and stamp["image"] == TRITON_IMAGE
    assert stamp["gpus"] == ["NVIDIA H100"]
    assert world_size_of(layout.repository_dir) == 1
    fake_build(tmp_path, tools, skip_existing=True)
    assert len(tools.calls) == 2  # nothing rebuilt
    fake_build(tmp_path, tools, skip_existing=False)
    assert len(tools.calls) == 4


def test_out_of_memory_in_trtllm_build_says_what_to_lower(tmp_path):
    shape = read_model_shape(write_llama(tmp_path / "model"))
    tools = FakeTools(shape, build_output=("[TRT] [E] 2: [virtualMemoryBuffer.cpp::resizePhysical] CUDA error: "
                                           "out of memory",), build_rc=1)
    with pytest.raises(BuildError, match=r"trtllm-build failed: it ran out of memory\. Lower --max-batch-size"):
        fake_build(tmp_path, tools)
    assert not (tmp_path / "out" / "build.json").exists()


def test_engines_from_another_tensorrt_llm_are_refused(tmp_path):
    shape = read_model_shape(write_llama(tmp_path / "model"))
    with pytest.raises(BuildError, match="built by TensorRT-LLM 1.1.0, the runtime here is 1.2.1"):
        fake_build(tmp_path, FakeTools(shape, version="1.1.0"))


# ---------------------------------------------------------------- the converter script

CONVERTER_TEXT = ("import tensorrt_llm\nparser.add_argument('--model_dir')\nparser.add_argument('--output_dir')\n"
                  "parser.add_argument('--tp_size')\n")


class FakeRemote:
    """Serves ``pages`` by URL; any other URL is a 404, as raw.githubusercontent.com answers a missing ref."""

    def __init__(self, pages):
        self.pages, self.asked = pages, []

    def __call__(self, url):
        self.asked.append(url)
        if url not in self.pages:
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)
        return self.pages[url]


def test_converter_urls_try_the_release_ref_before_the_tag():
    release, tag = converter_urls()
    assert release == ("https://raw.githubusercontent.com/NVIDIA/TensorRT-LLM/release/1.2.1/"
                       "examples/models/core/llama/convert_checkpoint.py")
    assert tag == release.replace("/release/1.2.1/", "/v1.2.1/")


def test_the_images_own_converter_comes_before_the_downloaded_one(tmp_path):
    image, downloaded = tmp_path / "app/convert_checkpoint.py", tmp_path / "third_party/convert_checkpoint.py"
    for path in (image, downloaded):
        path.parent.mkdir(parents=True)
        path.write_text(CONVERTER_TEXT)
    candidates = (image, downloaded)
    assert find_convert_script(env={}, candidates=candidates) == image
    image.unlink()
    assert find_convert_script(env={}, candidates=candidates) == downloaded
    env = {"TRIDENT_TRTLLM_CONVERT_SCRIPT": "/mine.py"}
    assert find_convert_script(env=env, candidates=candidates) == Path("/mine.py")
    assert find_convert_script(explicit="/flag.py", env=env, candidates=candidates) == Path("/flag.py")
    downloaded.unlink()
    assert find_convert_script(env={}, candidates=candidates) is None


def test_ensure_converter_downloads_nothing_when_the_image_has_one(tmp_path):
    image = tmp_path / "app/convert_checkpoint.py"
    image.parent.mkdir()
    image.write_text(CONVERTER_TEXT)
    remote = FakeRemote({})
    got = ensure_converter(dest=tmp_path / "dl/convert_checkpoint.py", image_candidates=(image,), fetch=remote,
                           log=lambda _: None)
    assert got == image and remote.asked == [] and not (tmp_path / "dl").exists()


def test_download_falls_back_to_the_tag_when_the_release_ref_is_missing(tmp_path):
    release, tag = converter_urls()
    dest = tmp_path / "dl/convert_checkpoint.py"
    remote = FakeRemote({tag: CONVERTER_TEXT})
    got = ensure_converter(dest=dest, image_candidates=(tmp_path / "none.py",), fetch=remote, log=lambda _: None)
    assert got == dest and dest.read_text() == CONVERTER_TEXT
    assert remote.asked == [release, tag]
    remote = FakeRemote({release: CONVERTER_TEXT, tag: CONVERTER_TEXT})
    dest.unlink()
    assert download_converter(dest=dest, urls=[release, tag], fetch=remote, log=lambda _: None) == release
    assert remote.asked == [release]


def test_a_download_that_is_not_the_converter_is_refused_and_not_saved(tmp_path):
    release, tag = converter_urls()
    dest = tmp_path / "dl/convert_checkpoint.py"
    remote = FakeRemote({release: "<html>moved</html>"})
    with pytest.raises(ConverterNotFound) as info:
        download_converter(dest=dest, urls=[release, tag], fetch=remote, log=lambda _: None)
    message = str(info.value)
    assert f"{release}: not TensorRT-LLM's convert_checkpoint.py" in message
    assert f"{tag}: HTTP 404" in message and "TRIDENT_TRTLLM_CONVERT_SCRIPT" in message
    assert not dest.exists() and not dest.parent.exists()


# ---------------------------------------------------------------- checks

def test_explain_failure_tells_oom_from_other_failures():
    assert "ran out of memory" in explain_failure(step="x", returncode=1, output_tail=["torch.OutOfMemoryError: CUDA"])
    assert "host ran out of memory" in explain_failure(step="x", returncode=-9, output_tail=["Loading"])
    other = explain_failure(step="x", returncode=2, output_tail=["KeyError: 'lm_head'"])
    assert "exit code 2" in other and "KeyError" in other and "memory" not in other


def test_list_gpus_parses_nvidia_smi_and_explains_a_missing_driver():
    ok = subprocess.CompletedProcess([], 0, stdout="0, NVIDIA H100 80GB HBM3, 81559, 580.95.05\n", stderr="")
    assert list_gpus(run=lambda *a, **k: ok) == [Gpu(0, "NVIDIA H100 80GB HBM3", 81559, "580.95.05")]

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")
    with pytest.raises(GpuSetupError, match="--gpus all"):
        list_gpus(run=missing)
    failed = subprocess.CompletedProcess([], 9, stdout="", stderr="NVIDIA-SMI has failed")
    with pytest.raises(GpuSetupError, match="NVIDIA-SMI has failed"):
        list_gpus(run=lambda *a, **k: failed)


def test_version_checks(tmp_path):
    require_pinned_version(TRTLLM_VERSION)
    with pytest.raises(GpuSetupError, match="pinned to 1.2.1"):
        require_pinned_version("1.3.0")
    with pytest.raises(GpuSetupError, match="not an engine folder"):
        check_engine_version(engine_dir=tmp_path, runtime_version="1.2.1")
    (tmp_path / "config.json").write_text(json.dumps({"version": "1.2.1"}))
    check_engine_version(engine_dir=tmp_path, runtime_version="1.2.1")


# ---------------------------------------------------------------- launch

def rank(i, repo, extra=()):
    return ["/opt/tritonserver/bin/tritonserver", f"--model-repository={repo}", "--grpc-port=8001",
            "--http-port=8000", "--metrics-port=8002", *extra, "--disable-auto-complete-config",
            f"--backend-config=python,shm-region-prefix-name=prefix{i}_",
            "--backend-config=python,thread-pool-size=288",  # no llm config at /r: 256 + 32
            "--exit-timeout-secs=30"]


def test_world_size_one_runs_tritonserver_without_mpi():
    assert triton_command(world_size=1, model_repository=Path("/r")) == rank(0, "/r", ["--log-verbose=0", *GRPC_KEEPALIVE_ARGS])


def test_world_size_two_runs_one_tritonserver_per_rank_under_mpirun():
    assert triton_command(world_size=2, model_repository=Path("/r")) == [
        "mpirun", "--allow-run-as-root",
        "-n", "1", *rank(0, "/r", ["--log-verbose=0", *GRPC_KEEPALIVE_ARGS]),
        ":", "-n", "1", *rank(1, "/r", ["--model-control-mode=explicit", "--load-model=tensorrt_llm"]),
    ]


def test_launcher_reads_the_world_size_from_the_engines(tmp_path, trtllm_repo):
    engines = trtllm_repo.engine_dir
    engines.mkdir(exist_ok=True)
    (engines / "config.json").write_text(json.dumps(
        {"version": "1.2.1", "pretrained_config": {"mapping": {"world_size": 2, "tp_size": 2, "pp_size": 1}}}))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/launch_triton_gpu.py"), "--model-repository",
                           str(trtllm_repo.repository_dir), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout.strip()) == triton_command(world_size=2, model_repository=trtllm_repo.repository_dir)
