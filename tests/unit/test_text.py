"""Incremental detokenization and stop sequences, on the real tokenizer."""
import pytest

from trident.contract import SamplingParams, TextRequest
from trident.engine_tensors import words_list
from trident.generation import TextGeneration
from trident.text import IncrementalDetokenizer, StopSequenceMatcher
from trident.text.detokenizer import decoder_of

SAMPLES = [
    "The capital of France is Paris.",
    "Crème brûlée, naïve café, Ærøskøbing.",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji: 🎉🚀👍🏽 and a family 👨‍👩‍👧 end.",
    "  leading spaces,\n\nnew lines\tand tabs  ",
    "mixed: ünïcödé → ∑ π ≈ 3.14159 😀",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_token_by_token_deltas_rebuild_the_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push([t]) for t in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    for delta in deltas:
        assert "\ufffd" not in delta  # no chunk holds a broken character
        delta.encode("utf-8")


class ThroughTransformers:
    """The tokenizer's ``decode`` only (no Rust tokenizer to reach): the path before decoder_of."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


def test_the_rust_decoder_gives_the_same_deltas_as_transformers_decode(tokenizer):
    assert decoder_of(tokenizer) is tokenizer.backend_tokenizer  # SmolLM2's: no clean-up of spaces
    ids = tokenizer("".join(SAMPLES) + "<|im_end|>x", add_special_tokens=False).input_ids
    rust, plain = IncrementalDetokenizer(tokenizer), IncrementalDetokenizer(ThroughTransformers(tokenizer))
    for i in range(0, len(ids), 3):  # one to three ids a push, as streamed responses carry them
        assert rust.push(ids[i:i + 3]) == plain.push(ids[i:i + 3])
    assert rust.flush() == plain.flush()


def test_a_tokenizer_that_cleans_up_spaces_decodes_through_transformers(tokenizer):
    class CleansUp:
        backend_tokenizer = tokenizer.backend_tokenizer
        clean_up_tokenization_spaces = True
        decode = tokenizer.decode

    cleans_up = CleansUp()
    assert decoder_of(cleans_up) is cleans_up
    plain = ThroughTransformers(tokenizer)
    assert decoder_of(plain) is plain


def test_multi_byte_character_is_held_until_complete(tokenizer):
    ids = tokenizer("🎉", add_special_tokens=False).input_ids
    assert len(ids) > 1, "the emoji should span several byte tokens"
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push([ids[-1]]) == "🎉"


def release_all(matcher, pieces):
    return [matcher.push(p) for p in pieces] + ([matcher.flush()] if matcher.matched is None else [])


@pytest.mark.parametrize("pieces, stops, released, matched", [
    (["Hello", " wor", "ld"], [], "Hello world", None),
    (["Hello", " wor", "ld", "!"], ["world"], "Hello ", "world"),
    (["a", "b", "c", "d"], ["bc"], "a", "bc"),
    (["The end", ".\n", "User:", " hi"], ["\nUser:"], "The end.", "\nUser:"),
    (["ab", "ab", "x"], ["abx"], "ab", "abx"),
    (["x", "y"], ["abc"], "xy", None),
    (["a", "b"], ["abc"], "ab", None),  # held back, then released when generation ends
    (["stop", "here"], ["here", "stophere"], "", "stophere"),  # the earliest match wins
])
def test_stop_sequences(pieces, stops, released, matched):
    m = StopSequenceMatcher(stops)
    assert "".join(release_all(m, pieces)) == released
    assert m.matched == matched


def test_possible_stop_prefix_is_held_back():
    m = StopSequenceMatcher(["###"])
    assert m.push("Answer #") == "Answer "
    assert m.push("#") == ""
    assert m.push("x") == "##x"


def test_text_pushed_without_matching_is_never_part_of_a_stop_sequence():
    """min_tokens' text (match=False): released at once with what was held back, and no stop
    sequence starts in it, not even one that it and later text would complete."""
    m = StopSequenceMatcher(["ab", "###"])
    assert m.push("x#") == "x"  # "#" may start "###"
    assert m.push("#a", match=False) == "##a"
    assert m.push("b#") == "b"  # "ab" would start in the protected text: no match
    assert m.matched is None
    assert m.push("##") == ""
    assert m.matched == "###"


def request(max_tokens=10, stop_words=()):
    return TextRequest(prompt="p", sampling=SamplingParams(max_new_tokens=max_tokens, stop=tuple(stop_words)))


def test_generation_finish_reasons(tokenizer):
    ids = tokenizer(" Paris. The end", add_special_tokens=False).input_ids
    gen = TextGeneration(tokenizer, request(max_tokens=len(ids)), prompt_tokens=5)
    text = gen.push(ids) + gen.finish()
    assert (text, gen.finish_reason, gen.completion_tokens) == (" Paris. The end", "length", len(ids))

    gen = TextGeneration(tokenizer, request(max_tokens=50), prompt_tokens=5)
    text = gen.push(ids) + gen.finish()
    assert (text, gen.finish_reason) == (" Paris. The end", "eos_token")

    gen = TextGeneration(tokenizer, request(max_tokens=50, stop_words=[". The"]), prompt_tokens=5)
    text = gen.push(ids) + gen.finish()
    assert (text, gen.finish_reason, gen.stopped) == (" Paris", "stop_sequence", True)
    assert gen.completion_tokens < len(ids)  # tokens after the match are not counted


@pytest.mark.parametrize("pieces, stops, released", [
    (["Hello", " wor", "ld", "!"], ["world"], "Hello world"),
    (["The end", ".\n", "User:", " hi"], ["\nUser:"], "The end.\nUser:"),
    (["stop", "here", " more"], ["here", "stophere"], "stophere"),
])
def test_an_included_stop_sequence_ends_the_text(pieces, stops, released):
    m = StopSequenceMatcher(stops, include=True)
    assert "".join(release_all(m, pieces)) == released and m.matched is not None


def sampled(tokenizer, ids, *, stop_ids=(), include=False, stops=(), logprobs=None, min_tokens=0,
            ignore_eos=False, end_ids=frozenset()):
    """A generation of ``ids`` pushed one by one; its text (streamed), tokens' texts and end."""
    sampling = SamplingParams(max_new_tokens=50, stop=tuple(stops), stop_token_ids=tuple(stop_ids),
                              include_stop_str_in_output=include, logprobs=logprobs, min_tokens=min_tokens,
                              ignore_eos=ignore_eos)
    gen = TextGeneration(tokenizer, TextRequest(prompt="p", sampling=sampling), prompt_tokens=5, end_ids=end_ids)
    text, tokens = "", []
    for token in ids:
        text += gen.push([token], [-1.0] if logprobs is not None else None)
        tokens += gen.take_tokens()
        if gen.stopped:
            break
    else:
        text += gen.finish()
        tokens += gen.take_tokens()
    return text, [t.text for t in tokens], gen.finish_reason, gen.completion_tokens


@pytest.mark.parametrize("logprobs", [None, 0])
def test_a_stop_token_ends_the_choice_with_its_text_only_when_included(tokenizer, logprobs):
    ids = tokenizer(" Paris. The end", add_special_tokens=False).input_ids
    dot = tokenizer(".", add_special_tokens=False).input_ids[0]
    at = ids.index(dot)
    before = tokenizer.decode(ids[:at])
    text, tokens, reason, count = sampled(tokenizer, ids, stop_ids=[dot], logprobs=logprobs)
    assert (text, reason, count) == (before, "stop_sequence", at + 1)  # the stop token is counted
    text, tokens, reason, _ = sampled(tokenizer, ids, stop_ids=[dot], include=True, logprobs=logprobs)
    assert (text, reason) == (before + ".", "stop_sequence")
    if logprobs is not None:
        assert "".join(tokens) == text and len(tokens) == at + 1
    # text held back as the possible start of a stop sequence is released at the stop token
    text, *_ = sampled(tokenizer, ids, stop_ids=[dot], stops=["Paris!"], logprobs=logprobs)
    assert text == before
    # a stop sequence is kept with include, and it ends the choice first when it comes first
    text, tokens, reason, _ = sampled(tokenizer, ids, stops=["Par"], include=True, logprobs=logprobs)
    assert (text, reason) == (" Par", "stop_sequence")
    if logprobs is not None:
        assert "".join(tokens) == text


@pytest.mark.parametrize("logprobs", [None, 0])
def test_min_tokens_holds_back_stop_tokens_and_stop_sequences(tokenizer, logprobs):
    """vLLM's min_tokens: before that many tokens a stop_token_ids token is an ordinary token
    (counted, its text kept) and no stop sequence is matched in their text; the first one after
    ends the choice as usual. ignore_eos (alone) keeps both."""
    ids = tokenizer(" one two three four two three", add_special_tokens=False).input_ids
    assert len(ids) == 6
    three = ids[2]
    for kw, text, reason, count in (
        ({"stop_ids": [three]}, " one two", "stop_sequence", 3),
        ({"stop_ids": [three], "min_tokens": 2}, " one two", "stop_sequence", 3),  # the 3rd may stop
        ({"stop_ids": [three], "min_tokens": 3}, " one two three four two", "stop_sequence", 6),
        ({"stop_ids": [three], "min_tokens": 6}, " one two three four two three", "eos_token", 6),  # ids end
        ({"stop_ids": [three], "ignore_eos": True}, " one two", "stop_sequence", 3),
        ({"stops": ["o"]}, " ", "stop_sequence", 1),
        ({"stops": ["o"], "min_tokens": 1}, " one tw", "stop_sequence", 2),
        ({"stops": ["o"], "min_tokens": 3}, " one two three f", "stop_sequence", 4),
        ({"stops": ["two three"], "min_tokens": 2}, " one two three four ", "stop_sequence", 6),  # not from token 2
        ({"stops": ["two three"], "min_tokens": 1}, " one ", "stop_sequence", 3),
        ({"stops": ["o"], "ignore_eos": True}, " ", "stop_sequence", 1),
    ):
        got, tokens, got_reason, got_count = sampled(tokenizer, ids, logprobs=logprobs, **kw)
        assert (got, got_reason, got_count) == (text, reason, count), kw
        if logprobs is not None:
            assert "".join(tokens) == got


def test_ignore_eos_and_min_tokens_hold_back_the_models_other_end_tokens(tokenizer):
    """The model's other end tokens (generation_config.json's) end the choice as the end token
    does (finish eos_token, not counted), after min_tokens tokens and never with ignore_eos."""
    ids = tokenizer(" one two three four", add_special_tokens=False).input_ids
    three = frozenset([ids[2]])
    assert sampled(tokenizer, ids, end_ids=three)[2:] == ("eos_token", 2)
    assert sampled(tokenizer, ids, end_ids=three, min_tokens=2)[2:] == ("eos_token", 2)
    assert sampled(tokenizer, ids, end_ids=three, min_tokens=3)[0] == " one two three four"
    assert sampled(tokenizer, ids, end_ids=three, ignore_eos=True)[0] == " one two three four"


def test_words_list_format():
    out = words_list([[5, 6], [7]])
    assert out.shape == (1, 2, 3)
    assert out[0, 0].tolist() == [5, 6, 7]
    assert out[0, 1].tolist() == [2, 3, -1]


_TOKENIZER_PROBE = r"""
import json, sys
hidden = sys.argv[2] == "hidden"
if hidden:
    from trident.text.hf_tokenizer import load_tokenizer
    tok = load_tokenizer(sys.argv[1])
    loaded = "torch" in sys.modules
    import torch  # importable afterwards (XGrammar imports it at a stub's first guide)
else:
    import torch
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    loaded = True
texts = ["Hello there", " leading space", "naïve café 東京 🙂", "<|im_start|>user\nhi<|im_end|>", "a\n\n\tb  c", ""]
ids = [tok(t).input_ids for t in texts] + [tok(t, add_special_tokens=False).input_ids for t in texts]
print(json.dumps({
    "torch_at_load": loaded,
    "class": type(tok).__name__,
    "ids": ids,
    "decoded": [tok.decode(i) for i in ids] + [tok.decode(i, skip_special_tokens=True) for i in ids],
    "pieces": [tok.convert_ids_to_tokens(i) for i in ids],
    "chat": tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True),
    "special": [tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, len(tok)],
}))
"""


def test_a_tokenizer_loaded_without_torch_is_the_same_tokenizer(checkpoint_dir):
    """trident.text.hf_tokenizer: the llm and preprocessing stubs' tokenizer, read without
    importing torch, encodes, decodes and renders the chat template as the usual one does."""
    import json
    import subprocess
    import sys

    from testkit import ROOT

    def probe(mode):
        out = subprocess.run([sys.executable, "-c", _TOKENIZER_PROBE, str(checkpoint_dir), mode], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "PyTorch was not found" not in out.stderr  # transformers' advice, expected there
        return json.loads(out.stdout)

    hidden, usual = probe("hidden"), probe("usual")
    assert hidden.pop("torch_at_load") is False and usual.pop("torch_at_load") is True
    assert hidden == usual
