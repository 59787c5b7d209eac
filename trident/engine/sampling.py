"""Per-row token selection: logit processing, then greedy or temperature/top-k/top-p/min-p.

The order, for each row (docs/cpu_engine.md, "Output controls"):

1. log-probabilities, for rows that asked: log_softmax of the model's raw logits;
2. repetition penalty (prompt and output), then presence / frequency penalties (output only);
3. logit bias, then DISALLOWED_BIAS on every token outside ``allowed_token_ids``;
4. bans (-inf): bad words, the end id before min_tokens;
5. the grammar's mask (-inf for every token the guide does not allow next);
6. a row left with no possible token ends its sequence (:data:`NO_TOKEN`);
7. selection: greedy argmax; or temperature, then top-k, top-p, min-p, and one draw.

Steps 2-6 run only for rows that use one of them (``RowSampling.processed``): a plain row costs
what it did before any of them existed. Every row carries its own parameters and its own
``torch.Generator``; a row's draw consumes exactly one uniform number from its generator, so a
seeded request samples the same tokens whatever else shares the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from trident.contract import DISALLOWED_BIAS, SamplingParams

from . import guided

NO_TOKEN = -1  # what a row with no possible token "samples": its sequence ends (as at its end id)
_MIX = 0x9E37_79B9_7F4A_7C15  # 2**64 / golden ratio (splitmix64)
_U64 = 0xFFFF_FFFF_FFFF_FFFF


@dataclass
class RowSampling:
    """The sampler's state for one sequence, for its whole life: its request's SamplingParams
    (the one parameters object, not a copy of its fields) plus what sampling accumulates."""

    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    generator: torch.Generator | None = None
    # (V,) bool: tokens in the prompt or the output; only kept when repetition_penalty != 1
    seen: torch.Tensor | None = None
    banned: list[int] = field(default_factory=list)  # single-token bad words, always banned
    banned_now: list[int] = field(default_factory=list)  # last tokens of multi-token bad words; the end id
    # bans that change from step to step (multi-token bad words, min_tokens): Sequence.update_bans
    dynamic_bans: bool = False
    # (V,) fp32: frequency_penalty x count + presence_penalty x (count > 0) over the output;
    # only kept when one of the two is non-zero
    penalty: torch.Tensor | None = None
    counted: set[int] | None = None  # tokens already counted once (presence)
    bias_ids: torch.Tensor | None = None  # (n,) int64: logit_bias, sparse
    bias_values: torch.Tensor | None = None  # (n,) fp32
    allowed: torch.Tensor | None = None  # (k,) int64: allowed_token_ids; every other token gets DISALLOWED_BIAS
    matcher: Any = None  # xgrammar.GrammarMatcher of the guide
    # any of the above: the row's logits need processing (one flag, checked once per row and step)
    processed: bool = field(init=False)

    def __post_init__(self) -> None:
        self.processed = bool(
            (self.seen is not None and self.params.repetition_penalty != 1.0) or self.banned or self.dynamic_bans
            or self.penalty is not None or self.bias_ids is not None or self.allowed is not None
            or self.matcher is not None)

    temperature = property(lambda self: self.params.temperature)
    top_k = property(lambda self: self.params.top_k)
    top_p = property(lambda self: self.params.top_p)
    repetition_penalty = property(lambda self: self.params.repetition_penalty)

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    @property
    def top_p_active(self) -> bool:
        return 0.0 < self.top_p < 1.0

    def count(self, token: int) -> None:
        """A generated token, for the presence / frequency penalties."""
        p = self.params
        first = token not in self.counted
        self.counted.add(token)
        self.penalty[token] += p.frequency_penalty + (p.presence_penalty if first else 0.0)


def make_generator(seed: int | None, index: int = 0) -> torch.Generator:
    """The random stream of sequence ``index`` of a request: sequence 0 of seed s draws exactly
    what a one-sequence request with seed s draws; sequence i > 0 gets a seed derived from
    (s, i) (splitmix64). Unseeded: fresh entropy for each."""
    g = torch.Generator()
    if seed is None:
        g.seed()  # non-deterministic
        return g
    seed &= _U64
    if index:
        z = (seed + index * _MIX) & _U64
        z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & _U64
        z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & _U64
        seed = z ^ (z >> 31)
    g.manual_seed(seed)
    return g


def apply_penalties(logits: torch.Tensor, rows: list[RowSampling], which: list[int] | None = None) -> list[int]:
    """Steps 2-4 in place on logits (B, V) fp32, for the rows ``which`` (default: every
    processed row); returns the rows that got -inf entries."""
    banned_rows = []
    for b in (which if which is not None else [b for b, r in enumerate(rows) if r.processed]):
        r = rows[b]
        if r.seen is not None and r.repetition_penalty != 1.0:
            row = logits[b]
            # HF semantics: shrink positive logits, push negative ones further down
            penalized = torch.where(row > 0, row / r.repetition_penalty, row * r.repetition_penalty)
            logits[b] = torch.where(r.seen, penalized, row)
        if r.penalty is not None:
            logits[b] -= r.penalty
        if r.bias_ids is not None:
            logits[b].index_add_(0, r.bias_ids, r.bias_values)
        if r.allowed is not None:  # as TensorRT-LLM's dense embedding_bias adds it to the others
            keep = logits[b, r.allowed]
            logits[b] += DISALLOWED_BIAS
            logits[b, r.allowed] = keep
        if r.banned or r.banned_now:
            logits[b, r.banned + r.banned_now] = float("-inf")
            banned_rows.append(b)
    return banned_rows


class TokenLogprobs(NamedTuple):
    """One generated token's log-probability under the model's raw distribution, and the k most
    likely tokens of that distribution (best first; ties: lower id first)."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class Sampled(NamedTuple):
    tokens: list[int]  # per row; NO_TOKEN where nothing was possible
    logprobs: dict[int, TokenLogprobs]  # row -> its token's, for the rows that asked


def sample_step(logits: torch.Tensor, rows: list[RowSampling]) -> Sampled:
    """logits (B, V) fp32 (modified in place) -> one token per row, and the log-probabilities of
    the rows that asked for them."""
    special = [b for b, r in enumerate(rows) if r.processed or r.params.logprobs is not None]
    if not special:
        return Sampled(_select(logits, rows), {})
    want = [b for b in special if rows[b].params.logprobs is not None]
    raw = None
    if want:  # before any processing: the raw distribution (vLLM's default "raw logprobs")
        raw = logits.log_softmax(-1) if len(want) == len(rows) else logits[want].log_softmax(-1)  # (W, V)
    processed = [b for b in special if rows[b].processed]
    masked = apply_penalties(logits, rows, processed)
    guided_rows = [b for b in processed if rows[b].matcher is not None]
    if guided_rows:
        guided.apply_masks(logits, [rows[b].matcher for b in guided_rows], guided_rows)
        masked = sorted(set(masked) | set(guided_rows))
    dead: list[int] = []
    if masked:  # a row whose masks leave nothing: never sample from all -inf
        best = logits[masked].amax(-1)  # (M,)
        dead = [b for b, m in zip(masked, best.tolist()) if m == float("-inf")]
    tokens = _select(logits, rows, dead)
    return Sampled(tokens, _logprobs(raw, want, tokens, rows) if want else {})


def sample(logits: torch.Tensor, rows: list[RowSampling]) -> list[int]:
    """logits (B, V) fp32 (modified in place) -> one token id per row."""
    return sample_step(logits, rows).tokens


def _select(logits: torch.Tensor, rows: list[RowSampling], dead: list[int] = ()) -> list[int]:
    out = [NO_TOKEN] * len(rows)
    if dead:
        dead = set(dead)
        live = [b for b in range(len(rows)) if b not in dead]
        if not live:
            return out
        sub = _select(logits[live], [rows[b] for b in live])
        for b, t in zip(live, sub):
            out[b] = t
        return out
    greedy = [b for b, r in enumerate(rows) if r.greedy]
    if greedy:
        ids = logits[greedy].argmax(dim=-1).tolist() if len(greedy) < len(rows) else logits.argmax(dim=-1).tolist()
        for b, t in zip(greedy, ids):
            out[b] = t
    if len(greedy) < len(rows):
        sampled = [b for b, r in enumerate(rows) if not r.greedy]
        ids = _sample_rows(logits[sampled], [rows[b] for b in sampled])
        for b, t in zip(sampled, ids):
            out[b] = t
    return out


#: Candidates a sampled row looks at first: its best tokens, sorted. A full sort of the
#: vocabulary (49,152 tokens) costs ~1.8 ms a row here (57 ms for 32 rows, as much as a decode
#: step's kernel), top-256 ~0.09 ms; the rest of the row is only needed when the draw lands in
#: the tail beyond them (then the row is sorted after all, :func:`_sample_sorted`).
CANDIDATES = 256


def _sample_rows(logits: torch.Tensor, rows: list[RowSampling]) -> list[int]:
    """Temperature, top-k, top-p, min-p and one draw per row, by inverse CDF over the row's tokens
    in descending order: the same draw as sorting the whole row (:func:`_sample_sorted`), from
    the best ``CANDIDATES`` tokens when the kept set or the draw falls among them."""
    R, V = logits.shape
    temps = torch.tensor([r.temperature for r in rows], dtype=torch.float32)[:, None]  # (R, 1)
    logits = logits / temps
    ks = [r.top_k if 0 < r.top_k < V else V for r in rows]
    u = torch.cat([torch.rand(1, generator=r.generator) for r in rows])[:, None]  # (R, 1): one draw a row
    K = min(V, max([CANDIDATES, *(k for k in ks if k < V)]))
    if K == V:
        return _sample_sorted(logits, rows, ks, u)
    values, indices = logits.topk(K, dim=-1)  # (R, K), sorted descending
    whole = torch.tensor([k == V for k in ks])[:, None]  # rows normalized over the whole vocabulary
    values = values.masked_fill(torch.arange(K)[None, :] >= torch.tensor(ks)[:, None], float("-inf"))
    # each row's probabilities over its top-k set (the whole row without top-k), as a softmax of
    # the full sorted row would give them
    log_z = torch.where(whole, logits.logsumexp(-1, keepdim=True), values.logsumexp(-1, keepdim=True))  # (R, 1)
    probs = (values - log_z).exp()  # (R, K)
    # rows whose kept set may reach past the candidates: those without top-k, unless top-p or
    # min-p ends it among them
    open_ = whole[:, 0].clone()
    unknown = torch.zeros(R, dtype=torch.bool)  # open, and the kept mass beyond is not known
    if any(r.top_p_active for r in rows):
        top_p = torch.tensor([r.top_p if r.top_p_active else 2.0 for r in rows])[:, None]
        mass = probs.cumsum(dim=-1)
        probs = probs.masked_fill(mass - probs >= top_p, 0.0)  # the smallest prefix reaching top_p
        reached = mass[:, -1] >= top_p[:, 0]
        unknown |= open_ & ~reached & (top_p[:, 0] <= 1.0)
        open_ &= ~reached
    if any(r.params.min_p for r in rows):
        min_p = torch.tensor([r.params.min_p for r in rows], dtype=torch.float32)[:, None]
        floor = min_p * probs[:, :1]
        below = probs[:, -1] < floor[:, 0]  # so is the whole tail
        unknown |= open_ & ~below & (min_p[:, 0] > 0)
        open_ &= ~below
        probs = probs.masked_fill(probs < floor, 0.0)
    cdf = probs.cumsum(dim=-1)
    # a closed row draws over its kept candidates; an open one with nothing cut over the whole
    # row (mass 1), among the candidates when the draw lands before their end
    target = u * torch.where(open_[:, None], torch.ones(R, 1), cdf[:, -1:])
    choice = torch.searchsorted(cdf, target, right=True)  # (R, 1)
    last_kept = (probs > 0).sum(dim=-1, keepdim=True) - 1
    out = indices.gather(1, torch.minimum(choice, last_kept))[:, 0].tolist()
    far = (unknown | (open_ & (target[:, 0] >= cdf[:, -1]))).nonzero()[:, 0].tolist()
    if far:  # the draw may land past the candidates: sort those rows after all
        for b, t in zip(far, _sample_sorted(logits[far], [rows[b] for b in far], [ks[b] for b in far], u[far])):
            out[b] = t
    return out


def _sample_sorted(logits: torch.Tensor, rows: list[RowSampling], ks: list[int], u: torch.Tensor) -> list[int]:
    """The reference draw: sort each (temperature-scaled) row, keep top-k, top-p and min-p, and
    invert the CDF of what is kept at ``u`` (R, 1)."""
    values, indices = logits.sort(dim=-1, descending=True)  # (R, V)
    K = values.shape[1]
    values = values.masked_fill(torch.arange(K)[None, :] >= torch.tensor(ks)[:, None], float("-inf"))
    probs = torch.softmax(values, dim=-1)  # (R, K)
    if any(r.top_p_active for r in rows):
        top_p = torch.tensor([r.top_p if r.top_p_active else 2.0 for r in rows])[:, None]
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better tokens
        # keep the smallest prefix whose mass reaches top_p (HF / TensorRT-LLM semantics)
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    if any(r.params.min_p for r in rows):
        # min-p: a token below min_p x the most likely one's probability is dropped. A ratio to
        # the top token, so it is the same before or after the top-k / top-p renormalization.
        min_p = torch.tensor([r.params.min_p for r in rows], dtype=torch.float32)[:, None]
        probs = probs.masked_fill(probs < min_p * probs[:, :1], 0.0)
    cdf = probs.cumsum(dim=-1)  # (R, K), unnormalized after top-p / min-p
    choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (R, 1)
    # kept tokens form a prefix of the sorted row; rounding must not step past it
    last_kept = (probs > 0).sum(dim=-1, keepdim=True) - 1
    choice = torch.minimum(choice, last_kept)
    return indices.gather(1, choice)[:, 0].tolist()


def _logprobs(raw: torch.Tensor, want: list[int], tokens: list[int],
              rows: list[RowSampling]) -> dict[int, TokenLogprobs]:
    """raw: (W, V) log-probabilities of the rows ``want`` (or of every row, when all want them)."""
    if raw.shape[0] != len(want):
        raw = raw[want]
    live = [i for i, b in enumerate(want) if tokens[b] != NO_TOKEN]
    if not live:
        return {}
    chosen = raw[live, [tokens[want[i]] for i in live]].tolist()
    ks = [rows[want[i]].params.logprobs for i in live]
    kmax = max(ks)
    top_v = top_i = None
    if kmax:
        top_v, top_i = raw[live].topk(kmax, dim=-1)  # (L, kmax), descending
        top_v, top_i = top_v.tolist(), top_i.tolist()
    out = {}
    for j, (i, k) in enumerate(zip(live, ks)):
        ids, values = ([], []) if not k else best_first(raw[i], top_v[j][:k], top_i[j][:k])
        out[want[i]] = TokenLogprobs(chosen[j], ids, values)
    return out


def best_first(row: torch.Tensor, values: list[float], ids: list[int]) -> tuple[list[int], list[float]]:
    """topk's k best, with ties broken by the lower id (topk leaves tie order unspecified)."""
    k = len(ids)
    if len(set(values)) == k and int((row >= values[-1]).sum()) == k:
        return ids, values  # no tie anywhere in or at the edge of the k best
    candidates = (row >= values[-1]).nonzero()[:, 0]  # ascending ids
    order = row[candidates].argsort(descending=True, stable=True)[:k]
    return candidates[order].tolist(), row[candidates[order]].tolist()
