"""A prompt's own log-probabilities (OpenAI's ``echo`` with ``logprobs``, vLLM's prompt_logprobs):
for each prompt position i >= 1, log P(prompt[i] | prompt[:i]) under the model's raw logits, the
token's rank there (1 + how many other tokens are at least as likely, vLLM's count), and the k
most likely tokens there. Filled while the prompt is prefilled (on the paged cache over
several steps), sent once, with the request's first output.

The logits row of position p is the distribution of the token at p + 1, so a prompt of L tokens
needs the rows of positions 0..L-2 besides the usual last one: each costs the lm_head's
matmul plus a (V,) fp32 row, which is why a step computes at most :data:`CONTEXT_ROWS_PER_STEP`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .sampling import best_first

#: Extra logits rows a step (or one lm_head call of the slot batch) computes for context
#: log-probabilities: 256 x 49,152 fp32 = 48 MiB, and as much again for their log_softmax.
CONTEXT_ROWS_PER_STEP = 256


@dataclass(eq=False)
class ContextLogprobs:
    """One request's prompt log-probabilities, shared by the n sequences of a group."""

    log_probs: np.ndarray  # (L,) fp32; NaN at 0 (the first token has no context)
    top_ids: np.ndarray  # (L, k) int32, best first; -1 in row 0
    top_log_probs: np.ndarray  # (L, k) fp32; NaN in row 0
    ranks: np.ndarray  # (L,) int32; 0 at 0
    filled: int = 1  # positions 0..filled-1 are known
    sent: bool = False  # carried by an output already

    @classmethod
    def create(cls, length: int, k: int) -> "ContextLogprobs":
        return cls(np.full(length, np.nan, dtype=np.float32), np.full((length, k), -1, dtype=np.int32),
                   np.full((length, k), np.nan, dtype=np.float32), np.zeros(length, dtype=np.int32))

    @property
    def ready(self) -> bool:
        return self.filled == len(self.log_probs)

    def add(self, logits: torch.Tensor, first: int, prompt: list[int]) -> None:
        """logits (n, V) fp32, raw, of prompt positions first..first+n-1: fills the entries of the
        prompt tokens first+1..first+n. Rows come in prompt order (chunks of one prefill)."""
        n = logits.shape[0]
        assert first + 1 == self.filled and first + n < len(prompt), (first, n, self.filled, len(prompt))
        lp = logits.log_softmax(-1)  # (n, V): as sampling.py's, for generated tokens
        rows = slice(first + 1, first + 1 + n)
        chosen = lp.gather(1, torch.tensor(prompt[rows])[:, None])  # (n, 1)
        self.log_probs[rows] = chosen[:, 0].numpy()
        self.ranks[rows] = (lp >= chosen).sum(-1).numpy()  # the token itself counted: 1 is the best
        k = self.top_ids.shape[1]
        if k:
            values, ids = lp.topk(k, dim=-1)  # (n, k), descending; tie order unspecified
            # rows with a tie inside or at the edge of their k best: lower id first, as sampling does
            ties = (lp >= values[:, -1:]).sum(-1) != k
            if k > 1:
                ties |= (values[:, 1:] == values[:, :-1]).any(-1)
            for r in ties.nonzero()[:, 0].tolist():
                fixed_ids, fixed_values = best_first(lp[r], values[r].tolist(), ids[r].tolist())
                ids[r], values[r] = torch.tensor(fixed_ids), torch.tensor(fixed_values)
            self.top_ids[rows], self.top_log_probs[rows] = ids.numpy(), values.numpy()
        self.filled += n
