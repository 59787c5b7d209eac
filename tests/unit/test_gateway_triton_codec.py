"""The "llm" tensor mapping, request encoding, response parsing and error tags; no server."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gateway_fakes import stream_response

from gateway.backend import ChoiceEnd
from gateway.errors import ClientError, ServerError
from gateway_fakes import deserialize

from gateway.triton_codec import build_infer_request, model_error, parse_stream_response, serialize
from trident.contract import SamplingParams, TextRequest, llm_inputs, read_llm_inputs

MODEL = "smollm2-135m-instruct"


def params(*, prompt="Hi", stream=False, stop_sequences=(), **sampling) -> TextRequest:
    return TextRequest(prompt=prompt, model=MODEL, stream=stream,
                       sampling=SamplingParams(stop=tuple(stop_sequences), **sampling))


def test_llm_inputs_names_dtypes_shapes():
    inputs = llm_inputs(params(prompt="Héllo", max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=40,
                               repetition_penalty=1.1, stop_sequences=("\n", "User:"), stream=True, seed=42))
    expected = {
        "text_input": (np.object_, (1, 1), "Héllo".encode()),
        "max_tokens": (np.int32, (1, 1), 7),
        "stop_words": (np.object_, (1, 2), b"\n"),
        "temperature": (np.float32, (1, 1), np.float32(0.5)),
        "top_p": (np.float32, (1, 1), np.float32(0.9)),
        "top_k": (np.int32, (1, 1), 40),
        "repetition_penalty": (np.float32, (1, 1), np.float32(1.1)),
        "seed": (np.uint64, (1, 1), 42),
        "stream": (np.bool_, (1, 1), True),
    }
    assert list(inputs) == list(expected)
    for name, (dtype, shape, first) in expected.items():
        assert inputs[name].dtype == np.dtype(dtype), name
        assert inputs[name].shape == shape, name
        assert inputs[name].flat[0] == first, name
    assert list(inputs["stop_words"].flat) == [b"\n", b"User:"]


def test_the_llm_model_reads_back_what_the_gateway_sends():
    """One definition on both sides of the gRPC seam: encode, then decode as the llm model does."""
    sent = params(prompt="Héllo", max_new_tokens=7, temperature=0.5, top_p=0.75, top_k=40,  # exact in fp32
                  repetition_penalty=1.25, stop_sequences=("\n", "User:"), stream=True, seed=2**64 - 1)
    received = read_llm_inputs(llm_inputs(sent).get)
    assert received == TextRequest(prompt="Héllo", sampling=sent.sampling, stream=True)
    assert read_llm_inputs(llm_inputs(params()).get).sampling == SamplingParams()


def test_add_special_tokens_false_crosses_the_seam_and_true_is_not_sent():
    rendered = TextRequest(prompt="<s>Hi", add_special_tokens=False)
    inputs = llm_inputs(rendered)
    assert inputs["add_special_tokens"].tolist() == [[False]]
    assert read_llm_inputs(inputs.get).add_special_tokens is False
    assert "add_special_tokens" not in llm_inputs(TextRequest(prompt="Hi"))
    assert read_llm_inputs(llm_inputs(TextRequest(prompt="Hi")).get).add_special_tokens is True
    salted = TextRequest(prompt="Hi", sampling=SamplingParams(cache_salt="tenant-é"))
    assert read_llm_inputs(llm_inputs(salted).get) == salted
    urgent = TextRequest(prompt="Hi", sampling=SamplingParams(priority=-(2**31)))
    assert llm_inputs(urgent)["priority"].dtype == np.int32 and read_llm_inputs(llm_inputs(urgent).get) == urgent


def test_optional_tensors_are_omitted_only_when_none():
    inputs = llm_inputs(params())
    assert "seed" not in inputs and "stop_words" not in inputs
    assert inputs["stream"][0, 0] == False  # noqa: E712 - sent, it is not None
    zeros = llm_inputs(params(seed=0, top_k=0, temperature=0.0))
    assert zeros["seed"][0, 0] == 0 and zeros["top_k"][0, 0] == 0 and zeros["temperature"][0, 0] == 0.0


def test_build_infer_request_encodes_raw_contents():
    p = params(prompt="añb", stop_sequences=("x", "yz"), seed=2**64 - 1)
    request = build_infer_request("llm", llm_inputs(p), request_id="rid-1")
    assert request.model_name == "llm" and request.id == "rid-1"
    assert request.parameters["triton_enable_empty_final_response"].bool_param is True
    tensors = {t.name: (t.datatype, list(t.shape)) for t in request.inputs}
    assert tensors == {
        "text_input": ("BYTES", [1, 1]),
        "max_tokens": ("INT32", [1, 1]),
        "stop_words": ("BYTES", [1, 2]),
        "temperature": ("FP32", [1, 1]),
        "top_p": ("FP32", [1, 1]),
        "top_k": ("INT32", [1, 1]),
        "repetition_penalty": ("FP32", [1, 1]),
        "seed": ("UINT64", [1, 1]),
        "stream": ("BOOL", [1, 1]),
    }
    raw = dict(zip([t.name for t in request.inputs], request.raw_input_contents))
    prompt = "añb".encode()
    assert raw["text_input"] == struct.pack("<I", len(prompt)) + prompt
    assert raw["stop_words"] == b"\x01\x00\x00\x00x\x02\x00\x00\x00yz"
    assert raw["max_tokens"] == struct.pack("<i", 128)
    assert raw["seed"] == b"\xff" * 8
    assert raw["stream"] == b"\x00"
    assert raw["temperature"] == struct.pack("<f", 1.0)


@pytest.mark.parametrize(
    "array",
    [
        np.array([[b"a", b"", "é".encode()]], dtype=np.object_),
        np.array([[1, -2]], dtype=np.int32),
        np.array([[0.5]], dtype=np.float32),
        np.array([[True, False]], dtype=np.bool_),
        np.array([[2**64 - 1]], dtype=np.uint64),
    ],
)
def test_serialize_deserialize_round_trip(array):
    datatype, raw = serialize(array)
    back = deserialize(datatype, array.shape, raw)
    assert back.shape == array.shape and list(back.flat) == list(array.flat)


def parse(response):
    return parse_stream_response(response, request_id="rid-9", retry_after=5)


def test_parse_text_delta():
    parsed = parse(stream_response(text=" Paris"))
    assert parsed.text == " Paris" and parsed.finished is None and parsed.final is False


@pytest.mark.parametrize("final", [False, True])
@pytest.mark.parametrize("text", [" Paris", "", "日本"])
def test_a_lone_text_output_parses_as_with_other_outputs(text, final):
    """The one-tensor shortcut (the response sent for every token) gives what the full parse
    gives for the same text next to an output it ignores."""
    lone = parse(stream_response(text=text, final=final))
    padded = stream_response(text=text, final=final, arrays={"unknown_output": np.array([[7]], dtype=np.int32)})
    assert lone == parse(padded)
    assert lone.text == text and lone.final is final and lone.finished is None and lone.admitted is False


def test_the_admission_response_names_its_server_and_the_prompts_tokens():
    parsed = parse(stream_response(arrays={"server": np.array([[b"vm:8001"]], dtype=np.object_),
                                           "prompt_tokens": np.array([[42]], dtype=np.int32)}))
    assert parsed.admitted and parsed.finished is None and parsed.text == ""
    assert (parsed.server, parsed.prompt_tokens) == ("vm:8001", 42) and parsed.prompt_token_ids is None
    asked = parse(stream_response(arrays={"server": np.array([[b"vm:8001"]], dtype=np.object_),
                                          "prompt_tokens": np.array([[3]], dtype=np.int32),
                                          "prompt_token_ids": np.array([[1, 17, 40000]], dtype=np.int32)}))
    assert asked.admitted and asked.prompt_token_ids == (1, 17, 40000)  # return_prompt_token_ids


def test_the_prompts_logprobs_response_is_read_back_and_is_no_admission():
    """num_prompt_log_probs: the llm model's response (trident.llm_io.prompt_logprob_tensors)
    read back by the gateway: each prompt token's text, id, log-probability and rank, the best
    alternatives of each position (a row with fewer than k: the rest left out)."""
    from trident.llm_io import EngineChunk, prompt_logprob_tensors

    chunk = EngineChunk(token_ids=(9,), context_log_probs=[float("nan"), -1.5, -0.25],
                        context_top_ids=[[-1, -1], [4, 17], [40000, -1]],
                        context_top_log_probs=[[float("nan")] * 2, [-0.5, -1.5], [-0.25, float("nan")]],
                        context_ranks=[0, 2, 1])
    texts = {1: "<s>", 17: " é", 40000: "!", 4: "a"}
    parsed = parse(stream_response(arrays=prompt_logprob_tensors((1, 17, 40000), chunk, 2, texts.__getitem__)))
    assert not parsed.admitted and parsed.text == "" and parsed.finished is None and not parsed.final
    prompt = parsed.prompt_logprobs
    assert prompt.tokens.tokens == ("<s>", " é", "!") and prompt.tokens.token_ids == (1, 17, 40000)
    assert np.isnan(prompt.tokens.logprobs[0]) and prompt.tokens.logprobs[1:] == (-1.5, -0.25)
    assert prompt.ranks == (0, 2, 1)
    assert prompt.tokens.top == ((), (("a", -0.5), (" é", -1.5)), (("!", -0.25),))
    assert prompt.tokens.top_ids == ((), (4, 17), (40000,))


def test_parse_final_response_with_outputs():
    parsed = parse(stream_response(text=".", finish=("eos_token", 13, 3), final=True))
    assert parsed.text == "." and parsed.final is True
    assert parsed.finished == ChoiceEnd(0, "eos_token", completion_tokens=3) and parsed.prompt_tokens == 13


def test_a_choices_last_response_says_what_stopped_it():
    """stop_sequence / stop_token_id (vLLM's stop_reason), as trident.llm_io.output_tensors
    writes them; neither: None."""
    for extra, stop in (({"stop_sequence": np.array([["Paris é".encode()]], dtype=np.object_)}, "Paris é"),
                        ({"stop_token_id": np.array([[128009]], dtype=np.int32)}, 128009), ({}, None)):
        parsed = parse(stream_response(text=".", finish=("stop_sequence", 13, 3), final=True, arrays=extra))
        assert parsed.finished == ChoiceEnd(0, "stop_sequence", completion_tokens=3, stop=stop)


def test_parse_empty_final_response():
    parsed = parse(stream_response(final=True))
    assert parsed.text == "" and parsed.finished is None and parsed.final is True


def test_parse_response_without_final_parameter():
    response = stream_response(text="a")
    del response.infer_response.parameters["triton_final_response"]
    assert parse(response).final is False


def test_parse_finish_reason_without_counts_is_an_error():
    response = stream_response(finish=("length", 1, 1))
    names = [t.name for t in response.infer_response.outputs]
    keep = [i for i, n in enumerate(names) if n == "finish_reason"]
    outputs = [response.infer_response.outputs[i] for i in keep]
    raws = [response.infer_response.raw_output_contents[i] for i in keep]
    del response.infer_response.outputs[:]
    del response.infer_response.raw_output_contents[:]
    response.infer_response.outputs.extend(outputs)
    response.infer_response.raw_output_contents.extend(raws)
    with pytest.raises(ValueError):
        parse(response)


TAGGED = [
    # (error_message, class, status, type, param, client message)
    ("[invalid_request_error] temperature is not allowed here", ClientError, 400, "invalid_request_error", None,
     "temperature is not allowed here"),
    ("[invalid_request_error:prompt] prompt has 3000 tokens; with max_new_tokens 128 that exceeds the context of 2048",
     ClientError, 400, "invalid_request_error", "prompt",
     "prompt has 3000 tokens; with max_new_tokens 128 that exceeds the context of 2048"),
    ("[invalid_request_error:stop_sequences[3]] too long", ClientError, 400, "invalid_request_error",
     "stop_sequences[3]", "too long"),
    ("Failed to process the request(s) for model 'llm', message: [invalid_request_error:seed] bad seed",
     ClientError, 400, "invalid_request_error", "seed", "bad seed"),
    ("[service_unavailable] the engine queue is full", ServerError, 503, "service_unavailable", None,
     "the engine queue is full"),
    ("Request for unknown model: 'llm' is not found", ServerError, 503, "service_unavailable", None,
     "The model is not loaded on the inference server; try again later"),
    ("CUDA out of memory at /src/engine.py:123", ServerError, 500, "server_error", None,
     "The server had an error while processing your request (request id rid-9)."),
    ("[weird_tag] something", ServerError, 500, "server_error", None,
     "The server had an error while processing your request (request id rid-9)."),
    ("prompt contains [invalid_request_error] in the middle", ServerError, 500, "server_error", None,
     "The server had an error while processing your request (request id rid-9)."),
]


@pytest.mark.parametrize(("message", "cls", "status", "type_", "param", "text"), TAGGED, ids=[t[0][:40] for t in TAGGED])
def test_error_message_mapping(message, cls, status, type_, param, text):
    with pytest.raises(cls) as info:
        parse(stream_response(error=message))
    error = info.value
    assert (error.status, error.type, error.param, error.message) == (status, type_, param, text)
    assert (error.headers.get("Retry-After") == "5") == (status == 503)
    direct = model_error(message, request_id="rid-9", retry_after=5)
    assert direct.to_dict() == error.to_dict()


def test_the_llm_models_logprob_outputs_parse_back():
    """trident.llm_io.output_tensors (what the llm model sends) read by the gateway."""
    from trident.contract import SamplingParams, TextRequest
    from trident.generation import TextGeneration, TokenLogprob
    from trident.llm_io import output_tensors

    tokens = [TokenLogprob("He", 5, -0.5, (("He", -0.5), ("A", -1.5)), (5, 32)),
              TokenLogprob("llo ✓", 6, -0.25, (("llo ✓", -0.25),), (6,))]
    gen = TextGeneration(None, TextRequest(prompt="p", sampling=SamplingParams(logprobs=2, n=2)), prompt_tokens=3,
                         index=1, token_text=str)
    gen.finish_reason, gen.completion_tokens, gen.cum_logprob = "length", 2, -0.75
    parsed = parse(stream_response(arrays=output_tensors("Hello ✓", index=1, tokens=tokens, gen=gen, n=2), final=True))
    assert (parsed.index, parsed.text, parsed.prompt_tokens) == (1, "Hello ✓", 3)
    assert parsed.logprobs.tokens == ("He", "llo ✓") and parsed.logprobs.token_ids == (5, 6)
    assert parsed.logprobs.logprobs == (-0.5, -0.25)
    assert parsed.logprobs.top == ((("He", -0.5), ("A", -1.5)), (("llo ✓", -0.25),))
    assert parsed.logprobs.top_ids == ((5, 32), (6,))  # the padding of the shorter row dropped, as its texts'
    assert parsed.finished == ChoiceEnd(1, "length", 2, -0.75)
    plain = parse(stream_response(arrays=output_tensors("x", tokens=[TokenLogprob("x", 1, -1.0)])))
    assert plain.logprobs.top is None and plain.finished is None and plain.index == 0
    older = output_tensors("Hello ✓", tokens=tokens)  # an llm model that sends no alternatives' ids
    del older["top_log_prob_ids"]
    parsed = parse(stream_response(arrays=older))
    assert parsed.logprobs.top is not None and parsed.logprobs.top_ids is None


def test_a_choices_last_response_carries_the_prefix_caches_share_when_the_engine_said():
    from trident.contract import TextRequest
    from trident.generation import TextGeneration
    from trident.llm_io import output_tensors

    gen = TextGeneration(None, TextRequest(prompt="p"), prompt_tokens=40, token_text=str)
    gen.finish_reason, gen.completion_tokens = "length", 2
    assert parse(stream_response(arrays=output_tensors("x", gen=gen), final=True)).cached_tokens is None
    gen.cached_tokens = 32
    parsed = parse(stream_response(arrays=output_tensors("x", gen=gen), final=True))
    assert (parsed.prompt_tokens, parsed.cached_tokens) == (40, 32)


def test_nvidias_per_response_token_count_is_read_when_sent():
    """return_num_output_tokens (continuous_usage_stats): the tokens each response accounts for."""
    counted = parse(stream_response(text="ab", arrays={"num_output_tokens": np.array([[2]], dtype=np.int32)}))
    assert (counted.text, counted.output_tokens) == ("ab", 2)
    assert parse(stream_response(text="ab")).output_tokens is None
