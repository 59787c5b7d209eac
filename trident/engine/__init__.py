"""trident's PyTorch CPU inference engine for Llama checkpoints (continuous batching).

    engine = Engine(EngineConfig(checkpoint_dir=...)); engine.start()
    engine.submit(GenerationRequest(request_id="r1", input_ids=[...],
                                    sampling=SamplingParams(max_new_tokens=16)), on_output)
"""
from .config import EngineConfig, LlamaConfig
from .request import (
    EngineError,
    EngineStoppedError,
    GenerationOutput,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
)
from .engine import Engine
from .triton_io import (
    decode_word_list,
    error_message,
    is_stop_request,
    output_arrays,
    request_from_tensors,
    response_arrays,
)

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineStoppedError",
    "GenerationOutput",
    "GenerationRequest",
    "InvalidRequestError",
    "LlamaConfig",
    "QueueFullError",
    "decode_word_list",
    "error_message",
    "is_stop_request",
    "output_arrays",
    "request_from_tensors",
    "response_arrays",
]
