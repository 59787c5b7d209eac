"""/tokenize and /detokenize on the real gateway and Triton: the ids are the llm model's own,
the ones a prompt is given (checked against the checkpoint's tokenizer and against
/v1/completions' usage), and they round-trip."""

import pytest
import requests
from e2e_helpers import API_KEY

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_tokenize_gives_the_ids_a_prompt_is_given(gateway, tokenizer):
    prompt = "The capital of France is Paris. Ça va? 東京"
    body = requests.post(f"{gateway.url}/tokenize", json={"prompt": prompt}, headers=AUTH, timeout=30).json()
    assert body["tokens"] == tokenizer(prompt).input_ids and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 2048
    completion = requests.post(f"{gateway.url}/v1/completions", json={"prompt": prompt, "max_tokens": 1}, headers=AUTH,
                               timeout=60).json()
    assert completion["usage"]["prompt_tokens"] == body["count"]
    text = requests.post(f"{gateway.url}/detokenize", json={"tokens": body["tokens"]}, headers=AUTH, timeout=30).json()
    assert text == {"prompt": prompt}
    pieces = requests.post(f"{gateway.url}/tokenize", json={"prompt": prompt, "return_token_strs": True},
                           headers=AUTH, timeout=30).json()  # vLLM's: the vocabulary's own spelling
    assert pieces["tokens"] == body["tokens"]
    assert pieces["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"]) and "ĠParis" in pieces["token_strs"]


def test_tokenize_messages_as_the_chat_template_renders_them(gateway, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    body = requests.post(f"{gateway.url}/tokenize", json={"messages": messages}, headers=AUTH, timeout=30).json()
    assert body["tokens"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False)
    special = requests.post(f"{gateway.url}/detokenize", json={"tokens": body["tokens"]}, headers=AUTH, timeout=30)
    assert special.json()["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_bad_ids_are_400_from_the_gateway(gateway, tokenizer):
    response = requests.post(f"{gateway.url}/detokenize", json={"tokens": [1, len(tokenizer)]}, headers=AUTH, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (f"tokens: token id {len(tokenizer)} (at 1) is not a token of the "
                                                   f"model (ids are below {len(tokenizer)})")
