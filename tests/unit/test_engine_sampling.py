"""The sampler's draw from its best candidates (trident.engine.sampling._sample_rows) is the
draw of the full sort (_sample_sorted, the reference), with the same uniform number per row."""
from __future__ import annotations

import pytest
import torch

import trident.engine.sampling as sampling
from trident.contract import SamplingParams
from trident.engine.sampling import RowSampling, make_generator

V = 49152
CASES = [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(temperature=1.2, top_k=50, top_p=0.8),
         dict(temperature=1.0, min_p=0.05), dict(temperature=0.9, top_k=1000, top_p=0.95),
         dict(temperature=2.0), dict(temperature=0.5, top_k=300), dict(temperature=1.0, min_p=1e-7)]


def rows_for(kw, n):
    return [RowSampling(params=SamplingParams(**kw), generator=make_generator(100 + i)) for i in range(n)]


def reference(logits, rows):
    scaled = logits / torch.tensor([r.temperature for r in rows])[:, None]
    ks = [r.top_k if 0 < r.top_k < V else V for r in rows]
    u = torch.cat([torch.rand(1, generator=r.generator) for r in rows])[:, None]
    return sampling._sample_sorted(scaled, rows, ks, u)


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("scale", [1.0, 8.0], ids=["flat", "peaked"])
def test_candidate_draw_equals_the_full_sort(kw, scale):
    """Flat rows: most draws need the tail (the sorted fallback); peaked ones (a language model's)
    are drawn among the candidates. 16 rows x 4 steps, the same tokens either way."""
    torch.manual_seed(0)
    logits = torch.randn(16, V) * scale
    fast, ref = rows_for(kw, 16), rows_for(kw, 16)
    for _ in range(4):
        assert sampling._sample_rows(logits.clone(), fast) == reference(logits, ref)


def test_peaked_rows_do_not_sort_the_vocabulary(monkeypatch):
    sorted_rows = []
    real = sampling._sample_sorted
    monkeypatch.setattr(sampling, "_sample_sorted",
                        lambda logits, rows, ks, u: sorted_rows.append(len(rows)) or real(logits, rows, ks, u))
    torch.manual_seed(0)
    logits = torch.randn(32, V) * 8  # top-256 hold nearly all the mass, as in a trained model's rows
    sampling._sample_rows(logits, rows_for(dict(temperature=0.8, top_p=0.95), 32))
    assert sum(sorted_rows) <= 1, sorted_rows


def test_allowed_token_ids_shift_every_other_logit_as_the_dense_bias_does():
    """The CPU sampler applies allowed_token_ids as TensorRT-LLM's dense embedding_bias does
    (the llm model's -10000 on every other token, the logit_bias on the allowed ones): the same
    logits, and a sampled row never leaves the allowed tokens."""
    from trident.contract import DISALLOWED_BIAS
    from trident.engine.sampling import apply_penalties

    torch.manual_seed(0)
    logits = torch.randn(2, V) * 5
    allowed = torch.tensor([3, 17, 4096])
    p = SamplingParams(temperature=1.0, allowed_token_ids=(3, 17, 4096), logit_bias=((17, 2.0),))
    rows = [RowSampling(params=p, bias_ids=torch.tensor([17]), bias_values=torch.tensor([2.0]), allowed=allowed,
                        generator=make_generator(1)),
            RowSampling(params=SamplingParams(temperature=1.0), generator=make_generator(2))]
    dense = torch.full((V,), DISALLOWED_BIAS)
    dense[allowed] = 0.0
    dense[17] += 2.0
    expected = logits.clone()
    expected[0] += dense
    out = logits.clone()
    apply_penalties(out, rows)
    assert torch.equal(out, expected)
    drawn = {sampling.sample(logits.clone(), rows[:1])[0] for _ in range(50)}
    assert drawn <= {3, 17, 4096}
