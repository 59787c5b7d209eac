"""One request's life inside the engine: its sampling state, its tokens, and the checks each new
token goes through (end id, stop words, length, bad words)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .request import GenerationOutput, GenerationRequest
from .sampling import RowSampling, make_generator

OnOutput = Callable[[GenerationOutput], None]


@dataclass(eq=False)  # identity semantics: sequences are looked up in queues
class Sequence:
    request: GenerationRequest
    on_output: OnOutput
    sampling: RowSampling
    output: list[int] = field(default_factory=list)
    emitted: int = 0  # output tokens already sent (streaming)
    cache_len: int = 0  # tokens whose K/V are in the cache
    slot: int = -1  # its row of the paged cache's block tables (paged_batch.py)
    finished: bool = False
    cancel_checked: float = 0.0  # time.monotonic() of the last is_cancelled() poll

    @classmethod
    def create(cls, request: GenerationRequest, on_output: OnOutput, *, vocab_size: int) -> "Sequence":
        rs = RowSampling(params=request.sampling, banned=sorted({w[0] for w in request.bad_words if len(w) == 1}))
        if not rs.greedy:
            rs.generator = make_generator(request.seed)
        if request.repetition_penalty != 1.0:
            rs.seen = torch.zeros(vocab_size, dtype=torch.bool)
            rs.seen[request.input_ids] = True
        return cls(request=request, on_output=on_output, sampling=rs, cancel_checked=time.monotonic())

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.request.input_ids[-1]

    def update_bans(self) -> None:
        """Multi-token bad words: ban the last token when the sequence ends with the others."""
        multi = [w for w in self.request.bad_words if len(w) > 1]
        if not multi:
            return
        tail = (self.request.input_ids + self.output)[-max(len(w) for w in multi):]
        self.sampling.banned_now = [w[-1] for w in multi if tail[len(tail) - len(w) + 1:] == w[:-1]]

    def append(self, token: int) -> str | None:
        """Take one sampled token; return the finish reason it causes, if any. The end token itself
        is not kept (as TensorRT-LLM)."""
        req = self.request
        if req.end_id is not None and token == req.end_id:
            return "end_id"
        self.output.append(token)
        if self.sampling.seen is not None:
            self.sampling.seen[token] = True
        if any(len(w) <= len(self.output) and self.output[-len(w):] == w for w in req.stop_words):
            return "stop_words"
        if len(self.output) >= req.max_new_tokens:
            return "length"
        return None
