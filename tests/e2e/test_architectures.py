"""A checkpoint other than SmolLM2 served through the whole stack: a Qwen3 checkpoint with YaRN
RoPE written by transformers (random weights, SmolLM2's tokenizer files), its repository built by
build/build_repository.py in float32 (token-identical to transformers), the real Triton and the
real gateway, as ``make serve CHECKPOINT=...`` runs them.

* greedy ``/v1/completions`` text is transformers' greedy text, prompts short and long;
* its ``generation_config.json`` lists a second end token: the reply ends before it
  (``finish_reason`` stop, the tokens before it counted), ``ignore_eos`` runs through it;
* the model is served under its folder's name.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import requests

from e2e_helpers import API_KEY
from conftest import ROOT, model_dir, start_gateway, start_triton

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NAME = "qwen3-tiny-e2e"
PROMPTS = ["The capital of France is", "def fibonacci(n):",
           " ".join(["Rome grew from a small town on the Tiber into an empire."] * 12)]
NEW = 16


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(gateway, transformers model, tokenizer, the end token put in generation_config.json)."""
    folder = tmp_path_factory.mktemp("checkpoint") / NAME
    config = transformers.Qwen3Config(
        vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1,
        eos_token_id=2, pad_token_id=2,
        # YaRN from a pre-training context of 64 (Qwen3's long-context setting): the long prompt passes it
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # every part large enough to matter (norms and biases start at 1 and 0)
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "embed" in name or "lm_head" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
    hf.save_pretrained(folder)
    for f in model_dir().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(f, folder / f.name)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    # the 4th greedy token of the first prompt becomes a second end token of the model
    end = greedy(hf, tok(PROMPTS[0]).input_ids, 4)[3]
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, end]}))
    repo = tmp_path_factory.mktemp("repo-qwen3") / "repository"
    subprocess.run([sys.executable, str(ROOT / "build/build_repository.py"), "--model-dir", str(folder),
                    "--out", str(repo), "--max-batch-size", "4", "--max-seq-len", "512", "--dtype", "float32",
                    "--weight-dtype", "auto"], check=True, capture_output=True, timeout=120)
    triton = start_triton(repo, tmp_path_factory, "triton-qwen3")
    gateway = None
    try:
        gateway = start_gateway(triton, tmp_path_factory, extra_env={"TRIDENT_TOKENIZER_DIR": str(folder),
                                                                     "TRIDENT_MODEL_NAME": NAME})
        yield gateway, hf, tok, end
    finally:
        if gateway is not None:
            gateway.stop()
        triton.stop()


def greedy(hf, ids, n):
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2)
    return out[0, len(ids):].tolist()


def complete(gateway, prompt, **extra):
    r = requests.post(f"{gateway.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": NAME, "prompt": prompt, "max_tokens": NEW, "temperature": 0, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_text_is_transformers_text(served):
    gateway, hf, tok, end = served
    models = requests.get(f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert [m["id"] for m in models.json()["data"]] == [NAME]
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        expected = tok.decode(greedy(hf, ids, NEW), skip_special_tokens=True)
        body = complete(gateway, prompt, ignore_eos=True)
        assert body["choices"][0]["text"] == expected, prompt
        assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == (len(ids), NEW)


def test_the_models_second_end_token_ends_the_reply(served):
    gateway, hf, tok, end = served
    ids = tok(PROMPTS[0]).input_ids
    first = greedy(hf, ids, NEW)
    assert first.index(end) == 3
    body = complete(gateway, PROMPTS[0])
    assert body["choices"][0]["text"] == tok.decode(first[:3])
    assert (body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"]) == ("stop", 3)
