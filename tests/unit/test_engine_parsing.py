"""Engine pieces that need no model: Triton tensor parsing, sampling, config, the KV cache."""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from trident.engine import (
    EngineConfig,
    InvalidRequestError,
    LlamaConfig,
    decode_word_list,
    error_message,
    is_stop_request,
    output_arrays,
    request_from_tensors,
)
from trident.engine.config import RopeScaling
from trident.engine.kv_cache import KVCache
from trident.engine.weights import map_weight_name
from trident.contract import SamplingParams
from trident.engine_tensors import (
    CONTEXT_OUTPUTS,
    CPU_ENGINE_INPUTS,
    CPU_ENGINE_OUTPUTS,
    ENGINE_INPUTS,
    ENGINE_OUTPUTS,
    LOG_PROB_OUTPUTS,
    SEQUENCE_INDEX,
)
from trident.engine.sampling import RowSampling, apply_penalties, make_generator, sample

TEMPLATE = Path(__file__).resolve().parents[2] / "model_repository" / "cpu" / "tensorrt_llm" / "config.pbtxt.in"


def i32(*rows):
    return np.array(rows, dtype=np.int32)


def base(**extra):
    tensors = {"input_ids": i32([5, 6, 7, 8]), "input_lengths": i32([4]), "request_output_len": i32([[9]])}
    tensors.update(extra)
    return tensors


# ---------------------------------------------------------------- word lists

@pytest.mark.parametrize(
    "arr, words",
    [
        ([[[5, 6, 7, 0], [2, 3, -1, -1]]], [[5, 6], [7]]),  # [1, 2, L] as clients send it
        ([[5, 6, 7], [3, -1, -1]], [[5, 6, 7]]),  # [2, L] after a reshape
        ([[[9], [1]]], [[9]]),
        ([[[0, 0], [-1, -1]]], []),  # all padding: no words
    ],
)
def test_decode_word_list(arr, words):
    assert decode_word_list(np.array(arr, dtype=np.int32)) == words


@pytest.mark.parametrize(
    "arr, message",
    [
        ([[[5, 6], [3, -1]]], "offsets must increase"),  # offset past the ids
        ([[[5, 6], [2, 1]]], "offsets must increase"),  # decreasing
        ([[[5, 6]]], "expected shape"),
        ([[[5, 6], [1, 2]], [[5, 6], [1, 2]]], "batch size 2"),
    ],
)
def test_decode_word_list_rejects(arr, message):
    with pytest.raises(InvalidRequestError, match=message):
        decode_word_list(np.array(arr, dtype=np.int32))


# ---------------------------------------------------------------- request tensors

def test_defaults_are_greedy_without_end_id():
    req = request_from_tensors("r1", base())
    assert (req.request_id, req.input_ids, req.max_new_tokens) == ("r1", [5, 6, 7, 8], 9)
    assert req.temperature == 0.0 and req.end_id is None and req.seed is None
    assert req.stop_words == [] and req.bad_words == [] and req.streaming is False


@pytest.mark.parametrize(
    "extra, temperature, top_k, top_p",
    [
        ({"runtime_top_k": i32([1]), "temperature": np.float32([0.7])}, 0.0, 1, 0.0),  # top_k 1: greedy
        ({"temperature": np.float32([0.7])}, 0.0, 0, 0.0),  # neither top_k nor top_p: greedy
        ({"runtime_top_p": np.float32([0.9]), "temperature": np.float32([0.7])}, 0.7, 0, 0.9),
        ({"runtime_top_k": i32([40])}, 1.0, 40, 0.0),  # temperature defaults to 1
        ({"runtime_top_k": i32([40]), "temperature": np.float32([0.0])}, 0.0, 40, 0.0),
    ],
)
def test_sampling_semantics_follow_tensorrt_llm(extra, temperature, top_k, top_p):
    req = request_from_tensors("r", base(**extra))
    assert req.temperature == pytest.approx(temperature)
    assert (req.top_k, req.top_p) == (top_k, pytest.approx(top_p))


def test_all_optional_tensors():
    req = request_from_tensors("r", base(
        input_ids=i32([5, 6, 7, 8, 0, 0]),  # padded: input_lengths says 4
        end_id=i32([2]), pad_id=i32([0]),
        stop_words_list=i32([[5, 6, 7, 0], [2, 3, -1, -1]]).reshape(1, 2, 4),
        bad_words_list=i32([[9], [1]]).reshape(1, 2, 1),
        repetition_penalty=np.float32([1.2]), random_seed=np.array([[2**63 + 5]], dtype=np.uint64),
        streaming=np.array([[True]]),
    ))
    assert req.input_ids == [5, 6, 7, 8] and req.end_id == 2 and req.pad_id == 0
    assert req.stop_words == [[5, 6], [7]] and req.bad_words == [[9]]
    assert req.repetition_penalty == pytest.approx(1.2) and req.seed == 2**63 + 5 and req.streaming


def test_seed_is_read_under_tensorrt_llm_names():
    u64 = lambda v: np.array([[v]], dtype=np.uint64)  # noqa: E731
    assert request_from_tensors("r", base(seed=u64(7))).seed == 7
    assert request_from_tensors("r", base(random_seed=u64(8))).seed == 8
    assert request_from_tensors("r", base(seed=u64(7), random_seed=u64(8))).seed == 7
    assert request_from_tensors("r", base()).seed is None


def test_negative_end_id_means_none():
    assert request_from_tensors("r", base(end_id=i32([-1]))).end_id is None


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"input_ids": i32([5])}, "required"),
        (base(input_ids=i32([5, 6], [7, 8])), "batch size 2"),
        (base(input_lengths=i32([7])), "input_lengths 7"),
        (base(temperature=np.float32([0.5, 0.6])), "temperature: expected one value"),
    ],
)
def test_bad_tensors(tensors, message):
    with pytest.raises(InvalidRequestError, match=message):
        request_from_tensors("r", tensors)


def test_stop_flag():
    assert is_stop_request({"stop": np.array([[True]])})
    assert not is_stop_request({"stop": np.array([[False]])})
    assert not is_stop_request(base())


def test_output_arrays_shapes_and_error_prefix():
    out = output_arrays([4, 5, 6])
    assert out["output_ids"].dtype == np.int32 and out["output_ids"].shape == (1, 1, 3)
    assert out["sequence_length"].tolist() == [[3]] and out["sequence_length"].dtype == np.int32
    assert output_arrays([])["output_ids"].shape == (1, 1, 0)
    assert error_message("service_unavailable", "queue full") == "[service_unavailable] queue full"


def test_template_placeholders():
    text = TEMPLATE.read_text()
    assert set(re.findall(r"\$\{(\w+)\}", text)) == {
        "checkpoint_dir", "engine_max_batch_size", "max_seq_len", "engine_dtype", "engine_weight_dtype",
        "num_threads", "max_queue_size", "xgrammar_tokenizer_info_path",
    }
    assert 'backend: "python"' in text and "decoupled: true" in text and "KIND_CPU" in text
    for name in (*ENGINE_INPUTS, *CPU_ENGINE_INPUTS, *ENGINE_OUTPUTS, *LOG_PROB_OUTPUTS, *CPU_ENGINE_OUTPUTS,
                 *CONTEXT_OUTPUTS, SEQUENCE_INDEX):
        assert f'name: "{name}"' in text


# ---------------------------------------------------------------- sampling

def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([True, True, False, False])
    apply_penalties(logits, [RowSampling(SamplingParams(temperature=0.0, repetition_penalty=2.0), seen=seen)])
    assert logits.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_bans_and_greedy_rows():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0], [3.0, 1.0, 2.0, 0.0]])
    rows = [RowSampling(SamplingParams(temperature=0.0), banned=[1]), RowSampling(SamplingParams(temperature=1.0, top_k=1), generator=make_generator(0))]
    assert sample(logits, rows) == [2, 0]


def test_top_k_and_top_p_restrict_the_draw():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    top_k = [sample(logits[None].clone(), [RowSampling(SamplingParams(temperature=1.0, top_k=2), generator=make_generator(s))])[0]
             for s in range(200)]
    assert set(top_k) == {0, 1}
    # top_p 0.6: tokens 0 (0.5) and 1 (reaching 0.8) kept, the rest never drawn
    top_p = [sample(logits[None].clone(), [RowSampling(SamplingParams(temperature=1.0, top_p=0.6), generator=make_generator(s))])[0]
             for s in range(200)]
    assert set(top_p) == {0, 1}
    full = [sample(logits[None].clone(), [RowSampling(SamplingParams(temperature=1.0), generator=make_generator(s))])[0]
            for s in range(400)]
    assert set(full) == {0, 1, 2, 3}


def test_row_draw_is_independent_of_the_batch():
    logits = torch.randn(3, 1000)
    alone = sample(logits[1:2].clone(), [RowSampling(SamplingParams(temperature=1.0), generator=make_generator(7))])
    rows = [RowSampling(SamplingParams(temperature=0.5, top_p=0.9), generator=make_generator(s)) for s in (1, 7, 3)]
    rows[1] = RowSampling(SamplingParams(temperature=1.0), generator=make_generator(7))
    assert sample(logits.clone(), rows)[1] == alone[0]


# ---------------------------------------------------------------- config, weights, cache

def test_llama_config_reads_both_rope_layouts():
    raw = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1}
    assert LlamaConfig.from_dict({**raw, "rope_parameters": {"rope_theta": 1e5}}).rope_theta == 1e5
    assert LlamaConfig.from_dict({**raw, "rope_theta": 5e5}).rope_theta == 5e5
    assert LlamaConfig.from_dict(raw).head_dim == 4
    llama3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    assert (LlamaConfig.from_dict({**raw, "rope_parameters": {**llama3, "rope_theta": 5e5}}).rope_scaling
            == LlamaConfig.from_dict({**raw, "rope_theta": 5e5, "rope_scaling": llama3}).rope_scaling
            == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192))
    assert LlamaConfig.from_dict({**raw, "rope_scaling": {"type": "linear", "factor": 2.0}}).rope_scaling.factor == 2.0
    with pytest.raises(ValueError, match="needs factor, low_freq_factor"):
        LlamaConfig.from_dict({**raw, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e5}})
    yarn = LlamaConfig.from_dict({**raw, "max_position_embeddings": 4096,
                                  "rope_scaling": {"type": "yarn", "factor": 4.0}}).rope_scaling
    assert yarn == RopeScaling("yarn", 4.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                               attention_factor=0.1 * math.log(4.0) + 1, truncate=True)
    given = LlamaConfig.from_dict({**raw, "original_max_position_embeddings": 512, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e5, "factor": 2.0, "original_max_position_embeddings": 1024,
        "beta_fast": 16, "beta_slow": 2, "attention_factor": 1.5, "truncate": False}}).rope_scaling
    assert given == RopeScaling("yarn", 2.0, original_max_position_embeddings=1024, beta_fast=16.0, beta_slow=2.0,
                                attention_factor=1.5, truncate=False)  # the RoPE dict's context (below)
    deepseek = LlamaConfig.from_dict({**raw, "rope_scaling": {"type": "yarn", "factor": 40.0, "mscale": 1.0,
                                                              "mscale_all_dim": 0.5}}).rope_scaling
    assert deepseek.attention_factor == pytest.approx((0.1 * math.log(40) + 1) / (0.05 * math.log(40) + 1))
    for refused in ({"rope_type": "longrope", "factor": 4.0}, {"rope_type": "dynamic", "factor": 2.0},
                    {"rope_type": "yarn"}):
        with pytest.raises(ValueError, match="rope|rotary"):
            LlamaConfig.from_dict({**raw, "rope_parameters": refused})


def test_longrope_is_read_as_transformers_reads_phi3s():
    """Phi-3.5-mini's settings: the pre-training context at the top level (it wins over the RoPE
    dict's for phi3, 4096 when absent), factor the context over it, the attention factor
    sqrt(1 + ln(factor) / ln(context)), as transformers' Phi3Config and longrope computation."""
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = {"model_type": "phi3", "vocab_size": 10, "hidden_size": 32, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
           "max_position_embeddings": 131072, "original_max_position_embeddings": 4096}
    short, long = [1.0 + i / 10 for i in range(8)], [2.0 + i for i in range(8)]
    longrope = {"type": "longrope", "short_factor": short, "long_factor": long}
    for extra, rope in (({}, longrope), ({"original_max_position_embeddings": 2048}, longrope),
                        ({"original_max_position_embeddings": None}, longrope),
                        ({}, {**longrope, "original_max_position_embeddings": 8192}),
                        ({}, {**longrope, "factor": 4.0, "attention_factor": 1.25})):
        config = {k: v for k, v in {**raw, **extra, "rope_scaling": rope}.items() if v is not None}
        ours = LlamaConfig.from_dict(config).rope_scaling
        hf = Phi3Config(**copy.deepcopy(config))  # it writes its defaults into the dict it is given
        inv_freq, attention = ROPE_INIT_FUNCTIONS["longrope"](hf, "cpu")
        assert ours.original_max_position_embeddings == hf.rope_parameters["original_max_position_embeddings"]
        assert ours.attention_factor == attention
        assert (ours.short_factor, ours.long_factor) == (tuple(short), tuple(long))
    phi35 = LlamaConfig.from_dict({**raw, "rope_scaling": longrope})
    assert phi35.long_rope == 4096 and phi35.rope_scaling.factor == 32.0
    assert phi35.rope_scaling.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert LlamaConfig.from_dict(raw).long_rope is None
    with pytest.raises(ValueError, match="rotary dim / 2 = 8 factors, got 7"):
        LlamaConfig.from_dict({**raw, "rope_scaling": {**longrope, "short_factor": short[:7], "long_factor": long[:7]}})
    with pytest.raises(ValueError, match="differ in length"):
        LlamaConfig.from_dict({**raw, "rope_scaling": {**longrope, "long_factor": long[:7]}})
    with pytest.raises(ValueError, match="needs short_factor, long_factor"):
        LlamaConfig.from_dict({**raw, "rope_scaling": {"type": "longrope", "short_factor": short}})
    # Phi-4-mini: LongRoPE over 3/4 of each head, the factor at config.json's top level (or in the
    # RoPE dict, which wins); the factors are per rotary dimension pair
    mini = LlamaConfig.from_dict({**raw, "partial_rotary_factor": 0.75,
                                  "rope_scaling": {**longrope, "short_factor": short[:6], "long_factor": long[:6]}})
    assert (mini.head_dim, mini.rotary_dim) == (16, 12)
    assert LlamaConfig.from_dict({**raw, "partial_rotary_factor": 0.75, "rope_scaling": {
        **longrope, "partial_rotary_factor": 1.0}}).rotary_dim == 16
    with pytest.raises(ValueError, match="rotary dim / 2 = 6 factors, got 8"):
        LlamaConfig.from_dict({**raw, "partial_rotary_factor": 0.75, "rope_scaling": longrope})
    for bad in (0.0, 1.5, 0.0625, 0.3125):  # none, more than the head, 1 and 5 dimensions
        with pytest.raises(ValueError, match="rotary dimensions"):
            LlamaConfig.from_dict({**raw, "partial_rotary_factor": bad})


def test_rope_rows_pick_longropes_long_tables_by_the_sequences_length():
    """transformers' choice per forward call (the longest position + 1: the whole prompt at
    prefill, each step's own position in decode) made per row: prompts within the context and
    their decode steps up to it take the short rows, everything else the long ones."""
    from trident.engine.llama import rope_rows

    raw = {"vocab_size": 10, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "max_position_embeddings": 64, "original_max_position_embeddings": 16,
           "model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8,
                                                  "long_factor": [2.0] * 8}}
    c = LlamaConfig.from_dict(raw)
    positions = torch.tensor([0, 5, 15, 0, 15, 16, 15, 16, 40])
    prompts = torch.tensor([16, 16, 16, 17, 17, 17, 3, 3, 3])  # a prompt of 16 (short), of 17 (long), decode of 3
    assert rope_rows(c, positions, prompts, 100).tolist() == [0, 5, 15, 100, 115, 116, 15, 116, 140]
    assert rope_rows(c, positions, None, 100).tolist() == [0, 5, 15, 0, 15, 116, 15, 116, 140]
    plain = LlamaConfig.from_dict({k: v for k, v in raw.items() if k != "rope_scaling"})
    assert rope_rows(plain, positions, prompts, 100) is positions


@pytest.mark.parametrize("rope_type", ["llama3", "yarn"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral", "smollm3"])
def test_the_pretraining_context_of_rope_scaling_is_read_as_transformers_reads_it(rope_type, model_type):
    """original_max_position_embeddings: the RoPE dict's, else the model's context; a top-level
    one is not read, as transformers' configuration classes of these types do (their
    standardize_rope_params runs before extra config.json keys become attributes)."""
    import transformers

    raw = {"model_type": model_type, "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "max_position_embeddings": 4096}
    scaling = {"rope_type": rope_type, "factor": 8.0}
    if rope_type == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
    hf_class = transformers.AutoConfig.for_model(model_type).__class__
    for extra, in_dict in (({"original_max_position_embeddings": 512}, {"original_max_position_embeddings": 1024}),
                           ({}, {"original_max_position_embeddings": 1024}),
                           ({"original_max_position_embeddings": 512}, {}), ({}, {})):
        config = {**raw, **extra, "rope_scaling": {**scaling, **in_dict}}
        theirs = hf_class(**copy.deepcopy(config)).rope_parameters["original_max_position_embeddings"]
        assert theirs == (1024 if in_dict else 4096)
        assert LlamaConfig.from_dict(config).rope_scaling.original_max_position_embeddings == theirs


def test_llama_config_reads_the_llama_family_and_refuses_the_rest():
    raw = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096}
    qwen2 = LlamaConfig.from_dict({**raw, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False})
    assert (qwen2.qkv_bias, qwen2.qk_norm) == (True, False)
    qwen3 = LlamaConfig.from_dict({**raw, "model_type": "qwen3", "head_dim": 16, "attention_bias": False})
    assert (qwen3.qkv_bias, qwen3.qk_norm, qwen3.head_dim) == (False, True, 16)
    assert LlamaConfig.from_dict({**raw, "model_type": "mistral", "sliding_window": None}).model_type == "mistral"
    assert LlamaConfig.from_dict({**raw, "model_type": "phi3", "sliding_window": None}).model_type == "phi3"
    # Mistral v0.1's and Phi-3's windows (a window no shorter than the context is none)
    assert LlamaConfig.from_dict({**raw, "model_type": "mistral", "sliding_window": 1024}).sliding_window == 1024
    assert LlamaConfig.from_dict({**raw, "model_type": "phi3", "sliding_window": 2047}).sliding_window == 2047
    assert LlamaConfig.from_dict({**raw, "model_type": "mistral", "sliding_window": 4096}).sliding_window is None
    assert qwen2.sliding_window is None  # named, not turned on
    for refused, match in (({"model_type": "gemma2"}, "not served"), ({"attention_bias": True}, "attention_bias"),
                           ({"mlp_bias": True}, "mlp_bias"), ({"hidden_act": "gelu"}, "hidden_act"),
                           ({"model_type": "qwen2", "use_sliding_window": True}, "sliding"),
                           ({"model_type": "mistral", "sliding_window": 0}, "sliding_window must be"),
                           # refused as the GPU build refuses it (trident.hf_config: one reading)
                           ({"model_type": "phi3", "sliding_window": "2047"}, "positive integer or null, got '2047'"),
                           ({"model_type": "smollm3", "use_sliding_window": True, "sliding_window": 64}, "sliding")):
        with pytest.raises(ValueError, match=match):
            LlamaConfig.from_dict({**raw, **refused})


def test_smollm3_config_names_its_layers_without_rope():
    raw = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 8,
           "num_attention_heads": 2, "num_key_value_heads": 1, "model_type": "smollm3"}
    default = LlamaConfig.from_dict(raw)  # transformers' default: every 4th layer, and tied embeddings
    assert (default.nope_layers, default.tie_word_embeddings) == ((3, 7), True)
    assert LlamaConfig.from_dict({**raw, "no_rope_layer_interval": 2}).nope_layers == (1, 3, 5, 7)
    listed = LlamaConfig.from_dict({**raw, "no_rope_layers": [0, 1, 1, 1, 1, 1, 1, 0], "tie_word_embeddings": False})
    assert (listed.nope_layers, listed.tie_word_embeddings) == ((0, 7), False)
    assert LlamaConfig.from_dict({**raw, "model_type": "llama", "no_rope_layers": [0] * 8}).nope_layers == ()
    for bad in ([1] * 7, [1] * 7 + [2], "1111"):
        with pytest.raises(ValueError, match="no_rope_layers must be 8 values"):
            LlamaConfig.from_dict({**raw, "no_rope_layers": bad})
    with pytest.raises(ValueError, match="no_rope_layer_interval"):
        LlamaConfig.from_dict({**raw, "no_rope_layer_interval": 0})


def test_engine_config_validation():
    assert EngineConfig(checkpoint_dir="x").torch_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(checkpoint_dir="x", dtype="float16")
    with pytest.raises(ValueError, match="max_batch_size"):
        EngineConfig(checkpoint_dir="x", max_batch_size=0)


def test_weight_name_map():
    assert map_weight_name("model.layers.17.self_attn.q_proj.weight") == "layers.17.wq"
    assert map_weight_name("model.embed_tokens.weight") == "tok_embeddings"
    assert map_weight_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_kv_cache_setup_twice_keeps_tensors_and_move_compacts():
    cache = KVCache()
    geometry = dict(num_layers=2, max_batch_size=3, num_kv_heads=1, max_seq_len=4, head_dim=2, dtype=torch.float32)
    cache.setup(**geometry)
    first = cache.k[0]
    cache.setup(**geometry)
    assert cache.k[0] is first and len(cache.k) == 2 and cache.k[0].shape == (3, 1, 4, 2)
    cache.write_prefill(1, 2, torch.ones(1, 3, 2), torch.full((1, 3, 2), 2.0))
    cache.move(2, 0, 3)
    assert cache.k[1][0, 0, :3].eq(1).all() and cache.v[1][0, 0, :3].eq(2).all()
    cache.setup(**{**geometry, "max_seq_len": 8})
    assert cache.k[0].shape == (3, 1, 8, 2)
