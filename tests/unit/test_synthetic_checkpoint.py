"""scripts/synthetic_checkpoint.py: a model's shape with random weights, loaded by the engine as
the real checkpoint would be (the same tensor names as transformers' save_pretrained, in shards)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from synthetic_checkpoint import main  # noqa: E402

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

from trident.contract import SamplingParams  # noqa: E402
from trident.engine import Engine, EngineConfig, GenerationRequest  # noqa: E402
from trident.engine.config import LlamaConfig  # noqa: E402
from engine_sink import Collector  # noqa: E402

CONFIGS = {  # small shapes of three families: tied / untied embeddings, biases, head norms
    "smollm3": {"model_type": "smollm3", "architectures": ["SmolLM3ForCausalLM"], "vocab_size": 512,
                "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 256, "rope_theta": 5e6,
                "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 512, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "tie_word_embeddings": False},
    "qwen3": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 512, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 32, "max_position_embeddings": 256},
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_the_engine_serves_a_synthetic_checkpoint_of_the_real_names_and_shapes(family, tmp_path):
    config = CONFIGS[family]
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "synth"
    assert main(["--config", str(tmp_path / "config.json"), "--out", str(out), "--shard-mb", "0"]) == 0

    # the names and shapes transformers itself saves for this config, in several shards
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    expected = {name: tuple(t.shape) for name, t in hf.state_dict().items()
                if not (hf.config.tie_word_embeddings and name == "lm_head.weight")}
    shards = sorted(out.glob("*.safetensors"))
    got = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                got[name] = tuple(f.get_slice(name).get_shape())
                assert f.get_slice(name).get_dtype() == "BF16"
    assert got == expected
    assert len(shards) == len(expected)  # --shard-mb 0: a tensor a shard
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(expected)

    # read as the real one: its config, and greedy tokens from the int4 engine
    assert LlamaConfig.from_checkpoint(out).model_type == family
    engine = Engine(EngineConfig(checkpoint_dir=str(out), max_batch_size=2, max_seq_len=64, dtype="float32",
                                 weight_dtype="int4"))
    engine.start()
    try:
        sink = Collector()
        engine.submit(GenerationRequest(request_id="a", input_ids=[1, 2, 3, 4],
                                        sampling=SamplingParams(max_new_tokens=5, temperature=0.0)), sink)
        sink.wait("a")
    finally:
        engine.stop()
    assert len(sink.tokens("a")) == 5 and all(0 <= t < config["vocab_size"] for t in sink.tokens("a"))
