"""Mapping of the llm model's text-level request onto the engine's tensors."""
import numpy as np
import pytest

from trident.errors import InvalidRequest
from trident.generation import TextRequest, engine_tensors, parse_text_request


def tensors(**kw):
    req = TextRequest(prompt="p", max_tokens=kw.pop("max_tokens", 7), **kw)
    return engine_tensors(req, input_ids=[5, 6, 7], end_id=2, pad_id=2)


def test_required_tensors_have_explicit_dtypes_and_batch_dim():
    t = tensors()
    assert t["input_ids"].dtype == np.int32 and t["input_ids"].tolist() == [[5, 6, 7]]
    assert t["input_lengths"].tolist() == [[3]] and t["request_output_len"].tolist() == [[7]]
    assert t["end_id"].tolist() == [[2]] and t["pad_id"].tolist() == [[2]]
    assert t["streaming"].dtype == np.bool_ and t["streaming"].tolist() == [[True]]
    # Optional tensors are absent when the request leaves them out.
    assert not {"temperature", "runtime_top_k", "runtime_top_p", "repetition_penalty", "seed"} & set(t)


def test_temperature_zero_is_greedy_as_tensorrt_llm_expresses_it():
    t = tensors(temperature=0.0, top_k=50, top_p=0.5)
    assert t["runtime_top_k"].tolist() == [[1]] and t["temperature"].tolist() == [[1.0]]
    assert "runtime_top_p" not in t


def test_sampling_values_pass_through_including_zero():
    t = tensors(temperature=0.7, top_k=0, top_p=0.9, repetition_penalty=1.3, seed=0)
    assert t["temperature"].dtype == np.float32 and t["temperature"][0, 0] == pytest.approx(0.7)
    assert t["runtime_top_k"].dtype == np.int32 and t["runtime_top_k"].tolist() == [[0]]
    assert t["runtime_top_p"][0, 0] == pytest.approx(0.9)
    assert t["repetition_penalty"][0, 0] == pytest.approx(1.3)
    assert t["seed"].dtype == np.uint64 and t["seed"].tolist() == [[0]]


def test_parse_reads_nvidia_ensemble_names():
    inputs = {
        "text_input": np.array([["héllo".encode()]], dtype=object),
        "max_tokens": np.array([[4]], dtype=np.int32),
        "stop_words": np.array([[b"\n", b""]], dtype=object),
        "random_seed": np.array([[9]], dtype=np.uint64),
        "stream": np.array([[True]]),
    }
    req = parse_text_request(inputs.get)
    assert (req.prompt, req.max_tokens, req.stop_words, req.seed, req.stream) == ("héllo", 4, ["\n"], 9, True)


@pytest.mark.parametrize("inputs, param", [
    ({"max_tokens": np.array([[4]], dtype=np.int32)}, "prompt"),
    ({"text_input": np.array([[b""]], dtype=object), "max_tokens": np.array([[4]], dtype=np.int32)}, "prompt"),
    ({"text_input": np.array([[b"x"]], dtype=object), "max_tokens": np.array([[0]], dtype=np.int32)}, "max_new_tokens"),
    ({"text_input": np.array([[b"x"]], dtype=object)}, "max_new_tokens"),
])
def test_parse_rejects_with_the_field_named(inputs, param):
    with pytest.raises(InvalidRequest) as err:
        parse_text_request(inputs.get)
    assert err.value.param == param and err.value.tagged().startswith(f"[invalid_request_error:{param}] ")
