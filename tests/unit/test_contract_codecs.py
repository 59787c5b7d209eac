"""The two contracts, each one definition on both sides: gateway <-> llm (trident.contract) and
llm <-> engine (trident.engine_tensors)."""
import re
from pathlib import Path

import numpy as np
import pytest

from trident.contract import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    InvalidRequest,
    ModelLimits,
    SamplingParams,
    TextRequest,
    finish_reason,
    llm_inputs,
    parse_error,
    read_llm_inputs,
    tag_error,
)
from trident.engine_tensors import engine_inputs, read_sampling, stop_inputs, is_stop


def engine(sampling, ids=(5, 6, 7)):
    return engine_inputs(sampling, input_ids=list(ids), end_id=2, pad_id=2)


def test_engine_request_names_dtypes_and_batch_dim():
    t = engine(SamplingParams(max_new_tokens=7))
    assert t["input_ids"].dtype == np.int32 and t["input_ids"].tolist() == [[5, 6, 7]]
    assert t["input_lengths"].tolist() == [[3]] and t["request_output_len"].tolist() == [[7]]
    assert t["end_id"].tolist() == [[2]] and t["pad_id"].tolist() == [[2]]
    assert t["streaming"].dtype == np.bool_ and t["streaming"].tolist() == [[True]]
    assert "seed" not in t and "bad_words_list" not in t  # only when set


def test_greedy_is_top_k_one_as_tensorrt_llm_expresses_it():
    for greedy in (SamplingParams(temperature=0.0, top_k=50, top_p=0.5), SamplingParams(top_k=1)):
        t = engine(greedy)
        assert t["runtime_top_k"].tolist() == [[1]] and t["temperature"].tolist() == [[1.0]]
        assert "runtime_top_p" not in t


def test_sampling_values_pass_through_including_zero():
    t = engine(SamplingParams(temperature=0.7, top_k=0, top_p=0.9, repetition_penalty=1.3, seed=0))
    assert t["temperature"].dtype == np.float32 and t["temperature"][0, 0] == pytest.approx(0.7)
    assert t["runtime_top_k"].dtype == np.int32 and t["runtime_top_k"].tolist() == [[0]]
    assert t["runtime_top_p"][0, 0] == pytest.approx(0.9)
    assert t["repetition_penalty"][0, 0] == pytest.approx(1.3)
    assert t["seed"].dtype == np.uint64 and t["seed"].tolist() == [[0]]


@pytest.mark.parametrize("sampling", [
    SamplingParams(max_new_tokens=9, temperature=0.0),
    SamplingParams(max_new_tokens=9, temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.2, seed=2**64 - 1),
])
def test_the_engine_reads_back_what_llm_sends(sampling):
    back = read_sampling(engine(sampling))
    assert back.greedy == sampling.greedy and back.max_new_tokens == 9 and back.seed == sampling.seed
    if not sampling.greedy:
        assert (back.top_k, back.repetition_penalty) == (40, pytest.approx(1.2))
        assert (back.temperature, back.top_p) == (pytest.approx(0.8), pytest.approx(0.95))


def test_engine_defaults_keep_tensorrt_llm_semantics():
    """A direct caller of the engine model who sends no sampling input gets greedy, as from
    NVIDIA's backend; llm always sends every value, so its own defaults apply above it."""
    assert read_sampling({"request_output_len": np.array([[4]], np.int32)}).greedy
    assert is_stop(stop_inputs()) and not is_stop({})


def test_llm_reads_nvidia_ensemble_names():
    inputs = {
        "text_input": np.array([["héllo".encode()]], dtype=object),
        "max_tokens": np.array([[4]], dtype=np.int32),
        "stop_words": np.array([[b"\n", b""]], dtype=object),
        "random_seed": np.array([[9]], dtype=np.uint64),
        "top_p": np.array([[0.0]], dtype=np.float32),  # NVIDIA's clients: 0 means off
        "stream": np.array([[True]]),
    }
    req = read_llm_inputs(inputs.get)
    assert (req.prompt, req.sampling.max_new_tokens, req.sampling.stop, req.sampling.seed, req.stream) == (
        "héllo", 4, ("\n",), 9, True)
    assert req.sampling.top_p == 1.0


@pytest.mark.parametrize("stream, exclude, include_prompt", [
    (False, False, True),  # NVIDIA's ensemble: the prompt, then the completion
    (False, True, False),
    (False, None, False),  # absent: the completion only (NVIDIA's default differs: docs)
    (True, False, False),  # streaming never repeats the prompt (TensorRT-LLM's either)
])
def test_nvidia_clients_beam_width_1_and_exclude_input_in_output(stream, exclude, include_prompt):
    """NVIDIA's end_to_end_grpc_client.py sends beam_width and exclude_input_in_output on every
    request; both were refused as unexpected inputs."""
    inputs = {"text_input": np.array([[b"x"]], dtype=object), "max_tokens": np.array([[3]], dtype=np.int32),
              "stream": np.array([[stream]]), "beam_width": np.array([[1]], dtype=np.int32)}
    if exclude is not None:
        inputs["exclude_input_in_output"] = np.array([[exclude]])
    req = read_llm_inputs(inputs.get)
    assert req.include_prompt is include_prompt
    assert read_llm_inputs(llm_inputs(req).get) == req


def test_a_prompt_of_token_ids_crosses_as_input_ids_with_an_empty_text_input():
    req = TextRequest(prompt="", sampling=SamplingParams(max_new_tokens=3)).with_prompt((5, 0, 49151))
    inputs = llm_inputs(req)
    assert inputs["text_input"].tolist() == [[b""]]  # Triton requires it
    assert inputs["input_ids"].dtype == np.int32 and inputs["input_ids"].tolist() == [[5, 0, 49151]]
    back = read_llm_inputs(inputs.get)
    assert back == req and back.prompt_ids == (5, 0, 49151) and back.prompt == ""
    assert req.with_prompt("text") == TextRequest(prompt="text", sampling=SamplingParams(max_new_tokens=3))
    assert "input_ids" not in llm_inputs(req.with_prompt("text"))


def test_echo_crosses_as_a_bool_and_needs_the_engine_feature_only_with_logprobs():
    from trident.contract import FEATURE_PROMPT_LOGPROBS, InvalidRequest, ModelLimits

    req = TextRequest(prompt="p", sampling=SamplingParams(echo=True, logprobs=2), stream=True)
    inputs = llm_inputs(req)
    assert inputs["echo"].dtype == np.bool_ and inputs["echo"].tolist() == [[True]]
    assert read_llm_inputs(inputs.get) == req
    assert "echo" not in llm_inputs(TextRequest(prompt="p"))
    gpu = ModelLimits(features=frozenset({"guided_decoding"}))
    SamplingParams(echo=True).check(gpu)  # the prompt's text: every engine
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(echo=True, logprobs=0).check(gpu)
    assert err.value.param == "echo"
    SamplingParams(echo=True, logprobs=0).check(ModelLimits(features=frozenset({FEATURE_PROMPT_LOGPROBS})))


def test_stop_token_ids_and_include_stop_cross_and_are_checked():
    from trident.contract import MAX_STOP_TOKEN_IDS, InvalidRequest, ModelLimits

    req = TextRequest(prompt="p", sampling=SamplingParams(stop_token_ids=(2, 7), include_stop_str_in_output=True))
    inputs = llm_inputs(req)
    assert inputs["stop_token_ids"].dtype == np.int32 and inputs["stop_token_ids"].tolist() == [[2, 7]]
    assert inputs["include_stop_str_in_output"].tolist() == [[True]]
    assert read_llm_inputs(inputs.get) == req
    plain = llm_inputs(TextRequest(prompt="p"))
    assert "stop_token_ids" not in plain and "include_stop_str_in_output" not in plain
    for ids, message in (((1,) * (MAX_STOP_TOKEN_IDS + 1), "at most 64"), ((5, 99), "token id 99 (at 1)")):
        with pytest.raises(InvalidRequest) as err:
            SamplingParams(stop_token_ids=ids).check(ModelLimits(vocab_size=50))
        assert err.value.param == "stop_token_ids" and message in str(err.value)
    with pytest.raises(InvalidRequest) as err:  # logit_bias's ids are checked the same way
        SamplingParams(logit_bias=((5, 1.0), (99, 2.0))).check(ModelLimits(vocab_size=50))
    assert err.value.param == "logit_bias" and "logit_bias: token id 99 (at 1) is not a token" in str(err.value)


def test_skip_special_tokens_crosses_only_when_false():
    req = TextRequest(prompt="p", sampling=SamplingParams(skip_special_tokens=False))
    inputs = llm_inputs(req)
    assert inputs["skip_special_tokens"].dtype == np.bool_ and inputs["skip_special_tokens"].tolist() == [[False]]
    assert read_llm_inputs(inputs.get) == req
    plain = llm_inputs(TextRequest(prompt="p"))
    assert "skip_special_tokens" not in plain and read_llm_inputs(plain.get).sampling.skip_special_tokens


@pytest.mark.parametrize("beam_width", [0, 2, 4])
def test_beam_search_is_refused_naming_beam_width(beam_width):
    inputs = {"text_input": np.array([[b"x"]], dtype=object), "max_tokens": np.array([[3]], dtype=np.int32),
              "beam_width": np.array([[beam_width]], dtype=np.int32)}
    with pytest.raises(InvalidRequest, match="beam_width must be 1") as err:
        read_llm_inputs(inputs.get)
    assert err.value.param == "beam_width"


def test_the_llm_config_template_declares_the_contracts_inputs():
    """config.pbtxt of llm (and so of ensemble, its alias: test_repository) declares LLM_INPUTS and
    LLM_OUTPUTS, names, types and dims: an input added to the contract and not to the template is
    refused by Triton as unexpected, an output left out never reaches its client."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from trident.contract import LLM_INPUTS, LLM_OUTPUTS

    path = Path(__file__).resolve().parents[2] / "model_repository" / "common" / "llm" / "config.pbtxt.in"
    text = re.sub(r"\$\{\w+\}", "1", path.read_text())
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    types = {np.object_: "TYPE_STRING", np.int32: "TYPE_INT32", np.float32: "TYPE_FP32", np.uint64: "TYPE_UINT64",
             np.bool_: "TYPE_BOOL"}
    declared = {i.name: (model_config_pb2.DataType.Name(i.data_type), tuple(i.dims), i.optional) for i in config.input}
    assert declared == {t.name: (types[t.dtype], t.dims, t.optional) for t in LLM_INPUTS}
    outputs = {o.name: (model_config_pb2.DataType.Name(o.data_type), tuple(o.dims)) for o in config.output}
    assert outputs == {t.name: (types[t.dtype], t.dims) for t in LLM_OUTPUTS}


def test_nvidia_token_count_flags_cross_only_when_set():
    req = TextRequest(prompt="p", return_num_input_tokens=True, return_num_output_tokens=True)
    inputs = llm_inputs(req)
    assert inputs["return_num_input_tokens"].tolist() == [[True]] and inputs["return_num_output_tokens"].dtype == np.bool_
    assert read_llm_inputs(inputs.get) == req
    plain = llm_inputs(TextRequest(prompt="p"))
    assert "return_num_input_tokens" not in plain and not read_llm_inputs(plain.get).return_num_output_tokens


def test_absent_sampling_inputs_take_the_one_set_of_defaults():
    req = read_llm_inputs({"text_input": np.array([[b"x"]], dtype=object),
                           "max_tokens": np.array([[3]], dtype=np.int32)}.get)
    assert req.sampling == SamplingParams(max_new_tokens=3)
    assert req == read_llm_inputs(llm_inputs(TextRequest(prompt="x", sampling=SamplingParams(max_new_tokens=3))).get)


@pytest.mark.parametrize("inputs, param", [
    ({"max_tokens": np.array([[4]], dtype=np.int32)}, "prompt"),
    ({"text_input": np.array([[b""]], dtype=object), "max_tokens": np.array([[4]], dtype=np.int32)}, "prompt"),
    ({"text_input": np.array([[b"\xff"]], dtype=object), "max_tokens": np.array([[4]], dtype=np.int32)}, "prompt"),
    ({"text_input": np.array([[b"x"]], dtype=object)}, "max_new_tokens"),
])
def test_llm_inputs_refused_with_the_field_named(inputs, param):
    with pytest.raises(InvalidRequest) as err:
        read_llm_inputs(inputs.get)
    assert err.value.param == param and err.value.tagged().startswith(f"[invalid_request_error:{param}] ")


@pytest.mark.parametrize("sampling, param", [
    (SamplingParams(max_new_tokens=0), "max_new_tokens"),
    (SamplingParams(max_new_tokens=65), "max_new_tokens"),
    (SamplingParams(max_new_tokens=8, temperature=-1.0), "temperature"),
    (SamplingParams(max_new_tokens=8, temperature=float("nan")), "temperature"),
    (SamplingParams(max_new_tokens=8, top_p=1.5), "top_p"),
    (SamplingParams(max_new_tokens=8, top_k=-1), "top_k"),
    (SamplingParams(max_new_tokens=8, top_k=2**31), "top_k"),  # the bound its message names (INT32_MAX)
    (SamplingParams(max_new_tokens=8, repetition_penalty=0.0), "repetition_penalty"),
])
def test_check_names_the_field(sampling, param):
    with pytest.raises(InvalidRequest) as err:
        sampling.check(ModelLimits(max_context=128, max_new_tokens=64))
    assert err.value.param == param


def test_error_tags_round_trip():
    text = tag_error("invalid_request_error", "prompt too long", "prompt")
    assert text == "[invalid_request_error:prompt] prompt too long"
    parsed = parse_error("Python backend: " + text)
    assert (parsed.kind, parsed.param, parsed.message) == ("invalid_request_error", "prompt", "prompt too long")
    assert parse_error("[service_unavailable] queue full").kind == "service_unavailable"
    assert parse_error("[server_error] boom").kind == "server_error"
    assert parse_error("no tag here") is None
    with pytest.raises(ValueError):
        tag_error("internal_error", "x")


def test_finish_reason_is_derived_in_one_place():
    assert finish_reason(stopped=True, completion_tokens=5, max_new_tokens=5) == FINISH_STOP
    assert finish_reason(stopped=False, completion_tokens=5, max_new_tokens=5) == FINISH_LENGTH
    assert finish_reason(stopped=False, completion_tokens=3, max_new_tokens=5) == FINISH_EOS


def test_limits_come_from_the_llm_config_parameters():
    assert ModelLimits.from_parameters({"max_context": "1024", "max_new_tokens_limit": "512"}) == ModelLimits(1024, 512)
    assert ModelLimits.from_parameters({}) == ModelLimits()


def test_allowed_token_ids_and_truncate_prompt_tokens_cross_and_are_checked():
    from trident.contract import DISALLOWED_BIAS, MAX_ALLOWED_TOKEN_IDS

    req = TextRequest(prompt="p", sampling=SamplingParams(allowed_token_ids=(7, 2), truncate_prompt_tokens=-1))
    inputs = llm_inputs(req)
    assert inputs["allowed_token_ids"].dtype == np.int32 and inputs["allowed_token_ids"].tolist() == [[7, 2]]
    assert inputs["truncate_prompt_tokens"].dtype == np.int32 and inputs["truncate_prompt_tokens"].tolist() == [[-1]]
    assert read_llm_inputs(inputs.get) == req
    plain = llm_inputs(TextRequest(prompt="p"))
    assert "allowed_token_ids" not in plain and "truncate_prompt_tokens" not in plain
    assert read_llm_inputs(plain.get) == TextRequest(prompt="p")
    twice = {**inputs, "allowed_token_ids": np.array([[7, 2, 7]], dtype=np.int32)}  # a direct caller's repeats
    assert read_llm_inputs(twice.get).sampling.allowed_token_ids == (7, 2)
    limits = ModelLimits(vocab_size=50, max_context=64)
    for sampling, param, message in (
            (SamplingParams(allowed_token_ids=(1,) * (MAX_ALLOWED_TOKEN_IDS + 1)), "allowed_token_ids", "at most"),
            (SamplingParams(allowed_token_ids=(5, 50)), "allowed_token_ids", "token id 50 (at 1)"),
            (SamplingParams(truncate_prompt_tokens=0), "truncate_prompt_tokens", "got 0"),
            (SamplingParams(truncate_prompt_tokens=65), "truncate_prompt_tokens", "between 1 and 64"),
            (SamplingParams(truncate_prompt_tokens=-2), "truncate_prompt_tokens", "got -2")):
        with pytest.raises(InvalidRequest) as err:
            sampling.check(limits)
        assert err.value.param == param and message in str(err.value), sampling
    SamplingParams(truncate_prompt_tokens=64, allowed_token_ids=(0, 49)).check(limits)
    # the engine gets the restriction as TensorRT-LLM's dense embedding_bias; the CPU engine reads it back
    t = engine_inputs(SamplingParams(allowed_token_ids=(3, 1), logit_bias=((1, -2.0), (4, 9.0))), input_ids=[5],
                      end_id=2, pad_id=2, vocab_size=6)
    assert t["embedding_bias"].tolist() == [[DISALLOWED_BIAS, -2.0, DISALLOWED_BIAS, 0.0, DISALLOWED_BIAS,
                                             DISALLOWED_BIAS]]
    back = read_sampling(t)  # the same restriction and biases, as the llm model had them
    assert (back.allowed_token_ids, back.logit_bias) == ((1, 3), ((1, -2.0),))
    # a bias with no DISALLOWED_BIAS entry, or only those, is a logit_bias (the logits are the same)
    assert read_sampling(engine_inputs(SamplingParams(logit_bias=((4, 9.0),)), input_ids=[5], end_id=2, pad_id=2,
                                       vocab_size=6)).allowed_token_ids == ()
    flat = {**t, "embedding_bias": np.full((1, 6), DISALLOWED_BIAS, dtype=np.float32)}
    assert (read_sampling(flat).allowed_token_ids, len(read_sampling(flat).logit_bias)) == ((), 6)


def test_kept_prompt_tokens():
    assert SamplingParams().kept_prompt_tokens(100, 64) == 100  # not truncated: the context check refuses it
    assert SamplingParams(truncate_prompt_tokens=10).kept_prompt_tokens(100, 64) == 10
    assert SamplingParams(truncate_prompt_tokens=10).kept_prompt_tokens(4, 64) == 4
    assert SamplingParams(truncate_prompt_tokens=-1, max_new_tokens=16).kept_prompt_tokens(100, 64) == 48
    assert SamplingParams(truncate_prompt_tokens=-1, max_new_tokens=0, echo=True).kept_prompt_tokens(100, 64) == 63
