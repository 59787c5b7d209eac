"""gateway.chat_template renders exactly what transformers' apply_chat_template renders, for the
served model's own tokenizer and for templates that use the rest of transformers' environment."""

from __future__ import annotations

import json

import pytest
from openai_fixtures import AUTH, SMOL_TEMPLATE, make_openai_app, tokenizer_dir

from gateway.chat_template import ChatTemplate
from gateway.errors import ClientError

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello?"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And {{ 3+3 }} in braces, café ✓, 日本\n\nnew lines"},
    ],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": "named", "name": "ann"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_same_text_as_transformers_for_the_served_model(tokenizer, checkpoint_dir, messages, add_generation_prompt):
    ours = ChatTemplate.from_tokenizer_dir(checkpoint_dir).render(messages, add_generation_prompt=add_generation_prompt)
    theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs


# A template that uses what transformers puts in the environment: special tokens, tojson,
# loop controls, namespace, raise_exception, whitespace control, undefined tools/documents.
RICH_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m['role'] == 'system' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  [{{ ns.n }}] {{ m['role'] | upper }}: {{ m['content'] | tojson }}{{ eos_token }}
  {% if m.get('name') %}({{ m['name'] }}){% endif %}
{% endfor %}
{% if tools is not none %}{{ raise_exception('no tools here') }}{% endif %}
{% if documents is defined and documents is none %}docs:none{% endif %}
{% if add_generation_prompt %}<assistant>{% endif %}"""


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_same_text_as_transformers_for_a_rich_template(tmp_path, messages):
    from transformers.utils.chat_template_utils import render_jinja_template

    tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    folder = tokenizer_dir(tmp_path / "tok", RICH_TEMPLATE, **tokens)
    ours = ChatTemplate.from_tokenizer_dir(folder).render(messages)
    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=RICH_TEMPLATE, add_generation_prompt=True, **tokens
    )
    assert ours == rendered[0]


def test_template_sources(tmp_path):
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages|length }}"}]
    assert ChatTemplate.from_tokenizer_dir(tokenizer_dir(tmp_path / "a", named)).render([{}]) == "D1"
    folder = tokenizer_dir(tmp_path / "b", "from config")
    assert ChatTemplate.from_tokenizer_dir(folder).render([]) == "from config"
    (folder / "chat_template.jinja").write_text("from file {{ eos_token }}")
    assert ChatTemplate.from_tokenizer_dir(folder).render([]) == "from file <|im_end|>"


def test_special_tokens_from_added_token_dicts_and_special_tokens_map(tmp_path):
    folder = tokenizer_dir(tmp_path / "t", "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}",
                           bos_token={"content": "<B>", "special": True})
    (folder / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<U>", "eos_token": "<ignored>"}))
    assert ChatTemplate.from_tokenizer_dir(folder).render([]) == "<B>|<|im_end|>|<U>"


def test_missing_template_or_config_is_a_start_up_error(tmp_path):
    with pytest.raises(ValueError, match="has no chat template"):
        ChatTemplate.from_tokenizer_dir(tokenizer_dir(tmp_path / "t", None))
    with pytest.raises(ValueError, match="has no tokenizer_config.json"):
        ChatTemplate.from_tokenizer_dir(tmp_path / "empty")


def test_template_refusal_is_a_client_error():
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ClientError, match="roles must alternate") as caught:
        template.render([{"role": "user", "content": "x"}])
    assert caught.value.status == 400 and caught.value.param == "messages"


def test_the_sandbox_holds(tmp_path):
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ClientError):
        template.render([])


def test_none_values_are_left_out_as_transformers_does():
    template = ChatTemplate("{% for m in messages %}{{ 'name' in m }}{% endfor %}")
    assert template.render([{"role": "user", "content": "x", "name": None}], add_generation_prompt=False) == "False"


def test_smol_template_constant_is_the_served_one(checkpoint_dir):
    """openai_fixtures.SMOL_TEMPLATE stands in for the real tokenizer in other tests."""
    assert ChatTemplate.from_tokenizer_dir(checkpoint_dir).source.strip() == SMOL_TEMPLATE.strip()


PREFILLS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "The capital is"}],
    [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2, "}],  # trailing space kept
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello\n"}],
]
# A template that trims each message (as many do): a trailing space is then not in the prompt.
TRIMMING_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}</{{ m['role'] }}>\n{% endfor %}"
                     "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.mark.parametrize("messages", PREFILLS)
def test_a_continued_final_message_is_what_transformers_renders(tokenizer, checkpoint_dir, tmp_path, messages):
    """continue_final_message (vLLM's, transformers'): the prompt ends with the final message's
    text, left open; with the served model's template and with one that trims messages."""
    from transformers.utils.chat_template_utils import render_jinja_template

    ours = ChatTemplate.from_tokenizer_dir(checkpoint_dir).render(messages, add_generation_prompt=False,
                                                                 continue_final_message=True)
    theirs = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert ours == theirs and ours.endswith(messages[-1]["content"])
    folder = tokenizer_dir(tmp_path / "trim", TRIMMING_TEMPLATE)
    ours = ChatTemplate.from_tokenizer_dir(folder).render(messages, add_generation_prompt=False,
                                                         continue_final_message=True)
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=TRIMMING_TEMPLATE,
                                        continue_final_message=True)
    assert ours == rendered[0] and ours.endswith(messages[-1]["content"].strip())


# A template with a variable of its own, as Qwen3's enable_thinking.
THINKING_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and "
                     "enable_thinking is false %}<think></think>{% endif %}{% endif %}")


def test_template_variables_are_what_transformers_renders_and_cannot_replace_the_gateways(tmp_path):
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "user", "content": "Hi"}]
    template = ChatTemplate.from_tokenizer_dir(tokenizer_dir(tmp_path / "think", THINKING_TEMPLATE))
    for variables in ({"enable_thinking": False}, {"enable_thinking": True}, {"unused": [1, {"a": None}]}, {}):
        ours = template.render(messages, variables=variables)
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=THINKING_TEMPLATE,
                                            add_generation_prompt=True, **variables)
        assert ours == rendered[0]
    assert template.render(messages, variables={"enable_thinking": False}).endswith("<assistant><think></think>")


def test_a_final_message_the_template_does_not_show_cannot_be_continued(tmp_path):
    template = ChatTemplate.from_tokenizer_dir(tokenizer_dir(tmp_path / "hide", "{{ messages | length }}"))
    for content in ("hidden text", "   ", ""):
        with pytest.raises(ClientError) as err:
            template.render([{"role": "assistant", "content": content}], continue_final_message=True)
        assert err.value.param == "messages" and "continue_final_message" in str(err.value)


def test_chat_completions_render_with_the_requests_template_fields(tmp_path):
    """vLLM's add_generation_prompt, continue_final_message and chat_template_kwargs on
    /v1/chat/completions reach the prompt; bad ones are 400s naming them."""
    app, backend = make_openai_app(tmp_path, {"TOKENIZER_DIR": str(tokenizer_dir(tmp_path / "t", THINKING_TEMPLATE))})
    web = app.test_client()
    user = [{"role": "user", "content": "Hi"}]

    def chat(**body):
        return web.post("/v1/chat/completions", json={"messages": user, "max_tokens": 2, **body}, headers=AUTH)

    cases = [({}, "<user>Hi\n<assistant>"),
             ({"chat_template_kwargs": {"enable_thinking": False}}, "<user>Hi\n<assistant><think></think>"),
             ({"chat_template_kwargs": {"enable_thinking": True, "other": 1}}, "<user>Hi\n<assistant>"),
             ({"add_generation_prompt": False}, "<user>Hi\n"),
             ({"messages": [*user, {"role": "assistant", "content": "Hel"}], "continue_final_message": True},
              "<user>Hi\n<assistant>Hel"),
             ({"messages": [*user, {"role": "assistant", "content": "Hel"}], "continue_final_message": True,
               "add_generation_prompt": False}, "<user>Hi\n<assistant>Hel"),
             ({"continue_final_message": False, "add_generation_prompt": None}, "<user>Hi\n<assistant>")]
    for body, prompt in cases:
        response = chat(**body)
        assert response.status_code == 200, response.get_json()
        assert backend.last_params.prompt == prompt, body
    bad = [({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
           ({"continue_final_message": "yes"}, "continue_final_message"),
           ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
           ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
           ({"chat_template_kwargs": {f"k{i}": i for i in range(65)}}, "chat_template_kwargs"),
           ({"messages": [*user, {"role": "assistant", "content": " "}], "continue_final_message": True}, "messages")]
    for body, param in bad:
        response = chat(**body)
        assert response.status_code == 400 and response.get_json()["error"]["param"] == param, body
