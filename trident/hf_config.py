"""Readings of a Hugging Face ``config.json`` that the CPU engine (trident.engine.config) and the
GPU build (trident.trtllm.checkpoint) must make alike: one definition, imported by both (this
module needs no torch)."""
from __future__ import annotations

from typing import Mapping, Optional

#: model_types whose ``sliding_window`` applies to every layer (Mistral v0.1, Phi-3 / 3.5).
#: Qwen2's and SmolLM3's configs also name a window, which ``use_sliding_window`` turns on for
#: some layers only; without it, transformers reads no window for them.
WINDOW_MODEL_TYPES = ("mistral", "phi3")
#: Phi-3's pre-training context when its config.json names none (transformers' Phi3Config).
PHI3_DEFAULT_CONTEXT = 4096


def every_layer_window(config: Mapping) -> Optional[int]:
    """The window every layer attends within (each position to the last this many, itself
    included), or None. ValueError for a window in some layers only (``use_sliding_window``) and
    for a window that is not a positive integer."""
    if config.get("use_sliding_window"):
        raise ValueError("use_sliding_window turns on sliding-window attention in some layers only, which is "
                         "not supported (the model would attend to the whole sequence in every layer)")
    window = config.get("sliding_window") if config.get("model_type") in WINDOW_MODEL_TYPES else None
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"sliding_window must be a positive integer or null, got {window!r}")
    return window
