"""The one parameters object a validated generation request becomes (STYLE 1).

The schema (``gateway.schemas``) fills it once; the Triton mapper (``gateway.triton_backend``),
fakes and logs all take it. Defaults live here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Sampling and limits of one generation request.

    ``model`` is the public model name (as in the request and the response), not the Triton
    model that serves it. ``seed`` is the only optional value: ``None`` means "not seeded".
    """

    prompt: str = field(repr=False)  # never in logs; see log_fields()
    model: str
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop_sequences: tuple[str, ...] = ()
    stream: bool = False
    seed: int | None = None

    def log_fields(self) -> dict[str, Any]:
        """What logs may hold: everything but the prompt text (its length instead)."""
        return {
            "model": self.model,
            "prompt_chars": len(self.prompt),
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "stop_sequences": len(self.stop_sequences),
            "stream": self.stream,
            "seed": self.seed,
        }
