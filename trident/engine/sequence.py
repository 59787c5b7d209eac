"""One sequence's life inside the engine: its sampling state, its tokens, and the checks each new
token goes through (end id, grammar, stop words, length, bad words). A request with
num_return_sequences n > 1 is a :class:`Group` of n sequences: one (the leader, index 0) until
its prompt is prefilled, then n sharing that prefill."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from trident.grammar import LOCK as GRAMMAR_LOCK
from .context import ContextLogprobs
from .request import GenerationOutput, GenerationRequest
from .sampling import NO_TOKEN, RowSampling, TokenLogprobs, make_generator

OnOutput = Callable[[GenerationOutput], None]


@dataclass(eq=False)
class Group:
    """The n sequences of one request (n > 1). Admitted with n slots at once (the leader's and
    ``reserved``); forked into n when the leader's prompt is prefilled; its last output is the
    request's final one."""

    n: int
    members: list["Sequence"] = field(default_factory=list)
    matchers: list[Any] = field(default_factory=list)  # guided: one per member, made at submit
    reserved: list[int] = field(default_factory=list)  # the slots members 1..n-1 will take
    forked: bool = False
    running: int = 0  # members not finished, once forked
    cancel_checked: float = 0.0  # one is_cancelled() poll for all members


@dataclass(eq=False)  # identity semantics: sequences are looked up in queues
class Sequence:
    request: GenerationRequest
    on_output: OnOutput
    sampling: RowSampling
    output: list[int] = field(default_factory=list)
    emitted: int = 0  # output tokens already sent (streaming)
    cache_len: int = 0  # tokens whose K/V are in the cache
    cached_prompt: int = 0  # of the prompt, tokens taken from the prefix cache at admission
    # LongRoPE, a prompt within the pre-training context whose sequence grew past it: the tokens
    # recomputed with the long factors (its prompt and what it generated), see grows_past
    long_ids: list[int] | None = None
    slot: int = -1  # its row of the paged cache's block tables (paged_batch.py)
    finished: bool = False
    cancel_checked: float = 0.0  # time.monotonic() of the last is_cancelled() poll
    group: Group | None = None  # n > 1
    index: int | None = None  # its place in the group (None when n is 1)
    # with logprobs (aligned with output)
    log_probs: list[float] | None = None
    top_ids: list[list[int]] | None = None
    top_log_probs: list[list[float]] | None = None
    cum_log_prob: float = 0.0
    # with context_logprobs: the prompt's, one object for the whole group (sent once)
    context: ContextLogprobs | None = None
    vocab_size: int = 0
    _multi_bad: list[list[int]] = field(default_factory=list, repr=False)

    @classmethod
    def create(cls, request: GenerationRequest, on_output: OnOutput, *, vocab_size: int,
               matchers: list[Any] | None = None) -> "Sequence":
        """The request's sequence (the leader of its group when n > 1). ``matchers``: one per
        sequence of the request when it is guided (see guided.GuideCompiler.matchers)."""
        n = request.sampling.n
        group = Group(n=n, matchers=list(matchers or [])) if n > 1 else None
        seq = cls._make(request, on_output, vocab_size=vocab_size, index=0 if group else None,
                        matcher=matchers[0] if matchers else None)
        if request.context_logprobs is not None:
            seq.context = ContextLogprobs.create(len(request.input_ids), request.context_logprobs)
        if group is not None:
            seq.group = group
            group.members.append(seq)
            group.cancel_checked = seq.cancel_checked
        return seq

    def child(self, index: int) -> "Sequence":
        """Member ``index`` of the leader's group, at the end of the leader's prefill (nothing
        generated yet): the same prompt, its own random stream, penalties and matcher."""
        group = self.group
        seq = self._make(self.request, self.on_output, vocab_size=self.vocab_size, index=index,
                         matcher=group.matchers[index] if group.matchers else None, seen=self.sampling.seen)
        seq.group = group
        seq.cache_len = self.cache_len
        seq.cached_prompt = self.cached_prompt
        seq.context = self.context
        group.members.append(seq)
        return seq

    @classmethod
    def _make(cls, request: GenerationRequest, on_output: OnOutput, *, vocab_size: int, index: int | None,
              matcher: Any, seen: torch.Tensor | None = None) -> "Sequence":
        p = request.sampling
        multi = [w for w in request.bad_words if len(w) > 1]
        kw: dict[str, Any] = {}
        if not p.greedy:
            kw["generator"] = make_generator(p.seed, index or 0)
        if p.repetition_penalty != 1.0:
            if seen is None:
                seen = torch.zeros(vocab_size, dtype=torch.bool)
                seen[request.input_ids] = True
            kw["seen"] = seen.clone()
        if p.presence_penalty or p.frequency_penalty:
            kw["penalty"], kw["counted"] = torch.zeros(vocab_size, dtype=torch.float32), set()
        if p.logit_bias:
            kw["bias_ids"] = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long)
            kw["bias_values"] = torch.tensor([b for _, b in p.logit_bias], dtype=torch.float32)
        if p.allowed_token_ids:
            kw["allowed"] = torch.tensor(p.allowed_token_ids, dtype=torch.long)
        rs = RowSampling(params=p, banned=sorted({w[0] for w in request.bad_words if len(w) == 1}), matcher=matcher,
                         dynamic_bans=bool(multi) or (p.min_tokens > 0 and (request.end_id is not None
                                                                               or bool(request.min_tokens_stops))), **kw)
        seq = cls(request=request, on_output=on_output, sampling=rs, cancel_checked=time.monotonic(), index=index,
                  vocab_size=vocab_size, _multi_bad=multi)
        if p.logprobs is not None:
            seq.log_probs = []
            if p.logprobs:
                seq.top_ids, seq.top_log_probs = [], []
        return seq

    @property
    def wants_context(self) -> bool:
        """Its prompt's log-probabilities are still to be computed."""
        return self.context is not None and not self.context.ready

    def grows_past(self, context: int | None) -> bool:
        """LongRoPE (``context``: LlamaConfig.long_rope): its next token is the first past the
        pre-training context and its K/V so far were made with the short factors (a prompt within
        the context, not recomputed yet). The batch then computes the whole sequence again with
        the long factors and sets ``long_ids``, as transformers' Phi-3 drops its cache there."""
        return (context is not None and self.long_ids is None
                and self.cache_len == context >= len(self.request.input_ids))

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.request.input_ids[-1]

    def update_bans(self) -> None:
        """Bans that depend on the tokens so far (rows with ``sampling.dynamic_bans``): the last
        token of a multi-token bad word whose other tokens end the sequence; the end id (and
        the request's min_tokens_stops: llm's stop tokens, as vLLM; TensorRT-LLM bans only the
        end id) while fewer than min_tokens tokens were generated."""
        now = []
        if self._multi_bad:
            tail = (self.request.input_ids + self.output)[-max(len(w) for w in self._multi_bad):]
            now = [w[-1] for w in self._multi_bad if tail[len(tail) - len(w) + 1:] == w[:-1]]
        if len(self.output) < self.request.sampling.min_tokens:
            if self.request.end_id is not None:
                now.append(self.request.end_id)
            now.extend(self.request.min_tokens_stops)
        self.sampling.banned_now = now

    def append(self, token: int, logprobs: TokenLogprobs | None = None) -> str | None:
        """Take one sampled token; return the finish reason it causes, if any. The end token
        itself is not kept (as TensorRT-LLM), nor is the grammar's stop token, nor NO_TOKEN (no
        token was possible: the sequence ends as at its end id)."""
        req = self.request
        if token == NO_TOKEN or (req.end_id is not None and token == req.end_id):
            return "end_id"
        rs = self.sampling
        if rs.processed:
            if rs.matcher is not None:
                with GRAMMAR_LOCK:
                    accepted = rs.matcher.accept_token(token)
                    terminated = accepted and rs.matcher.is_terminated()
                if not accepted:
                    raise RuntimeError(f"the grammar refused token {token} that its own mask allowed")
                if terminated:  # the tokenizer's end token, when there is no end id
                    return "end_id"
            if rs.seen is not None:
                rs.seen[token] = True
            if rs.penalty is not None:
                rs.count(token)
        self.output.append(token)
        if logprobs is not None:
            self.log_probs.append(logprobs.logprob)
            self.cum_log_prob += logprobs.logprob
            if self.top_ids is not None:
                self.top_ids.append(logprobs.top_ids)
                self.top_log_probs.append(logprobs.top_logprobs)
        if any(len(w) <= len(self.output) and self.output[-len(w):] == w for w in req.stop_words):
            return "stop_words"
        if len(self.output) >= req.max_new_tokens:
            return "length"
        return None


def fork_leaders(seqs: list[Sequence], logits: torch.Tensor, unforked: set[Sequence], batch) -> tuple:
    """Group leaders (in ``unforked``) whose prompt is now prefilled become their n sequences
    (``batch.fork`` gives the others their KV), each sampling its own first token from the same
    prefill logits: returns the sequences and their logits rows, the children after their leader."""
    if not any(s in unforked for s in seqs):
        return seqs, logits
    out: list[Sequence] = []
    index: list[int] = []
    for b, s in enumerate(seqs):
        out.append(s)
        index.append(b)
        if s in unforked:
            unforked.discard(s)
            children = [s.child(i) for i in range(1, s.group.n)]
            batch.fork(s, children)
            s.group.forked, s.group.running = True, s.group.n
            out.extend(children)
            index.extend([b] * len(children))
    return out, logits[torch.tensor(index)]
