"""Values for the trtllm flavour of model_repository/ (common models + the tensorrtllm engine)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..contract import FEATURE_GUIDED
from ..grammar import tokenizer_info_dict
from ..prompt_limits import max_prompt_chars
from ..repo_builder import TOKENIZER_INFO, build_repository, model_vocab_size
from .plan import EngineSettings, ServingSettings, new_tokens_limit

log = logging.getLogger(__name__)
ENGINE_MODEL = "tensorrt_llm"
# Triton max_batch_size of the python models (llm, preprocessing, ensemble): requests arrive
# one by one; this only bounds what one gRPC call may batch. Same value as the CPU flavour.
LLM_MAX_BATCH_SIZE = 64


def trtllm_values(*, tokenizer_dir: Path, engine_dir: Path, engine: EngineSettings,
                  serving: ServingSettings, out_dir: Path = Path("."), guided: bool = True,
                  attention_window: int | None = None) -> dict:
    """Every placeholder of the common + trtllm templates, and nothing else (the builder checks).

    ``attention_window``: the model's sliding window (checkpoint.attention_window), written as the
    backend's ``max_attention_window_size``; None writes no such parameter (the whole sequence)."""
    return {
        # common/: llm, preprocessing, ensemble
        "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
        "engine_model": ENGINE_MODEL,
        # The llm model refuses prompt + max_new_tokens above this, before the engine sees it.
        "max_context": engine.max_seq_len,
        "max_new_tokens_limit": new_tokens_limit(engine=engine, serving=serving),
        "max_prompt_chars": _prompt_chars(Path(tokenizer_dir), engine.max_seq_len),
        "llm_max_batch_size": LLM_MAX_BATCH_SIZE,
        "llm_max_concurrent": serving.max_concurrent,
        "llm_instances": serving.llm_instances,
        "stream_interval": serving.stream_interval,
        "vocab_size": model_vocab_size(tokenizer_dir),
        # TensorRT-LLM 1.2.1's backend has neither min_p nor top log-probabilities.
        "engine_features": FEATURE_GUIDED if guided else "",
        # trtllm/: tensorrt_llm
        "engine_dir": str(Path(engine_dir).resolve()),
        "engine_max_batch_size": engine.max_batch_size,
        "kv_cache_free_gpu_mem_fraction": serving.kv_cache_free_gpu_mem_fraction,
        "enable_kv_cache_reuse": "true" if serving.enable_kv_cache_reuse else "false",
        "batch_scheduler_policy": serving.batch_scheduler_policy,
        "attention_window_parameter": "" if attention_window is None else (
            f'parameters {{ key: "max_attention_window_size" value: {{ string_value: "{int(attention_window)}" }} }}'),
        "guided_decoding_backend": "xgrammar" if guided else "",
        "xgrammar_tokenizer_info_path": str(Path(out_dir).resolve() / TOKENIZER_INFO) if guided else "",
    }


def _prompt_chars(tokenizer_dir: Path, max_context: int) -> int:
    """trident.prompt_limits' bound; 0 (the llm model's token count alone) when the tokenizer
    cannot be read here (a dry run on a made-up checkpoint), with a log line."""
    try:
        return max_prompt_chars(tokenizer_dir, max_context)
    except Exception as exc:  # any loader error: the bound is an optimization, not a safeguard
        log.warning("max_prompt_chars left unbounded: the tokenizer in %s did not load (%s)", tokenizer_dir,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return 0


def write_trtllm_repository(*, out_dir: Path, tokenizer_dir: Path, engine_dir: Path,
                            engine: EngineSettings, serving: ServingSettings,
                            attention_window: int | None = None) -> Path:
    info = _tokenizer_info(Path(tokenizer_dir))
    values = trtllm_values(tokenizer_dir=tokenizer_dir, engine_dir=engine_dir, engine=engine, serving=serving,
                           out_dir=out_dir, guided=info is not None, attention_window=attention_window)
    out = build_repository(flavour="trtllm", values=values, out_dir=out_dir, nvidia_names=serving.nvidia_names)
    if info is not None:
        (out / TOKENIZER_INFO).write_text(json.dumps(info), encoding="utf-8")
    return out


def _tokenizer_info(tokenizer_dir: Path):
    """XGrammar's description of the tokenizer (trident.grammar), or None (guided decoding off,
    with a log line) when the tokenizer cannot be read here (a dry run on a made-up checkpoint)."""
    try:
        from transformers import AutoTokenizer

        return tokenizer_info_dict(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    except Exception as exc:  # any loader error
        log.warning("guided decoding off: the tokenizer in %s did not load (%s)", tokenizer_dir,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
