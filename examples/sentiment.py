#!/usr/bin/env python3
"""Sentiment analysis: a label, positive, negative or neutral, and its scores, per text.

    TRIDENT_API_KEY=... python examples/sentiment.py "I love this phone!"  "It broke in a day."
    TRIDENT_API_KEY=... python examples/sentiment.py --file reviews.txt   # one text per line
    TRIDENT_API_KEY=... python examples/sentiment.py --json "I love it"   # with the scores

    {"text": "I love it", "label": "positive", "scores": {"positive": 0.74, "negative": 0.07, "neutral": 0.19}, ...}

The served model is tiny (SmolLM2-135M-Instruct): asked in a chat it chats back instead of
answering with a label. What works, measured against the real model (docs/recipes.md):

* a few-shot completion prompt (``Review: ...`` / ``Sentiment: <label>`` examples, then the text)
  whose next token is the answer. Each label is one token (" positive", " negative", " neutral",
  and " Positive", " pos"... also count, matched by their first letters).
* ``--method scores`` (the default): one request, 1 token, ``logprobs=20``. The probabilities of
  the label tokens among the 20 alternatives are summed per label and renormalized over the three
  labels, so the scores sum to 1; the label is the highest score. The numbers are the model's own
  distribution (the CPU engine returns log_softmax of the logits, before sampling settings).
* ``--method vote``: the earlier recipe, labels only, three requests. The three-way prompt rarely
  says "neutral" for factual texts, and a two-way prompt (positive or negative) follows the label
  of its LAST example when the text has no opinion; so it asks the three-way prompt and the
  two-way prompt with its examples in two orders: "neutral" when the three-way prompt says so or
  the two orders disagree, otherwise the two-way answer.

Measured on examples/data/sentiment.tsv (24 hand-labelled texts: 8 positive, 8 negative,
8 neutral facts): both methods 21 of 24 (all 16 opinions, 5 of 8 facts; the same three facts
missed). On "I love it" the scores say positive (0.74) while the vote says negative: the two-way
prompts follow their examples on very short texts. So the scores replace the vote by default, at
one request per text instead of three.

* ``--method choice``: labels only, one request, no log-probabilities: the same prompt, 1 token,
  temperature 0 and vLLM's ``allowed_token_ids`` set to the label tokens (ids from the gateway's
  ``/tokenize``), so the token generated is the label the model rates highest. 20 of 24 on the
  sample below (one near-tie more than the scores: " positive" -0.936 against " neutral" -0.965).

On GPU (the TensorRT-LLM backend) only the chosen token's log-probability is returned and
``logprobs`` above 0 is refused (400), so ``--method scores`` does not work there; use
``--method choice`` (or ``vote``; labels without scores). Forcing each label with ``logit_bias`` and reading the
chosen token's log-probability would give one score per label only if that number were taken
before the bias, which has not been checked on GPU; this recipe does not try it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import openai

from trident_client import add_connection_args, add_text_args, connect, read_texts, token_ids

LABELS = ("positive", "negative", "neutral")
ALTERNATIVES = 20  # the most the gateway returns

THREE_WAY = [
    ("The hotel room was clean and the staff were friendly.", "positive"),
    ("The train was late and the seats were dirty.", "negative"),
    ("The train leaves at 8 am from platform 2.", "neutral"),
]
THREE_WAY_INSTRUCTION = "Classify the sentiment of each review as positive, negative or neutral."
POSITIVE = [("The hotel room was clean and the staff were friendly.", "positive"),
            ("I love this song, it makes me so happy!", "positive")]
NEGATIVE = [("The train was late and the seats were dirty.", "negative"),
            ("The battery died after an hour. Very disappointing.", "negative")]


def few_shot(instruction: str, label_name: str, examples, text: str) -> str:
    prompt = instruction + "\n\n"
    for example, label in examples:
        prompt += f"Review: {example}\n{label_name}: {label}\n\n"
    return prompt + f"Review: {' '.join(text.split())}\n{label_name}:"


def to_label(answer: str, allowed=LABELS) -> str | None:
    """The label an answer starts with (" Positive." -> "positive"), or None."""
    word = answer.strip().lower()
    for label in allowed:
        if word[:3] == label[:3]:
            return label
    return None


def token_label(token: str, allowed=LABELS) -> str | None:
    """The label a single token stands for: " positive", " Positive", " pos" -> "positive";
    None for anything else (" ne" could be negative or neutral: None)."""
    word = token.strip().lower()
    if len(word) < 3:
        return None
    for label in allowed:
        if label.startswith(word) or word.startswith(label):
            return label
    return None


def label_scores(alternatives: dict[str, float], allowed=LABELS) -> tuple[dict[str, float], float]:
    """Probabilities of the labels from one step's alternatives (token text -> log-probability),
    renormalized over the labels, and the share of the probability the labels had before that
    (0 when no label token was among the alternatives: then every label scores the same)."""
    mass = {label: 0.0 for label in allowed}
    for token, logprob in alternatives.items():
        label = token_label(token, allowed)
        if label is not None:
            mass[label] += math.exp(logprob)
    total = sum(mass.values())
    if total == 0.0:
        return {label: 1.0 / len(allowed) for label in allowed}, 0.0
    return {label: p / total for label, p in mass.items()}, total


def score(client, model: str, text: str) -> dict:
    """{"label", "scores", "label_mass"} for a text, from one request."""
    prompt = few_shot(THREE_WAY_INSTRUCTION, "Sentiment", THREE_WAY, text)
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0,
                                      logprobs=ALTERNATIVES)
    scores, mass = label_scores(reply.choices[0].logprobs.top_logprobs[0])
    label = max(LABELS, key=lambda name: scores[name])  # ties: the first of LABELS
    return {"label": label, "scores": scores, "label_mass": mass}


def label_token_ids(client, model: str) -> list[int]:
    """The ids of the tokens that spell a label as the answer's one token (" positive" and
    " Positive" where the tokenizer has them as one token); exits when a label has none."""
    ids = []
    for label in LABELS:
        spelled = [token_ids(client, model, " " + word) for word in (label, label.capitalize())]
        single = [t[0] for t in spelled if len(t) == 1]
        if not single:
            sys.exit(f"the served model's tokenizer has no one-token spelling of {label!r}: use --method scores")
        ids += single
    return ids


def choose(client, model: str, text: str, allowed: list[int]) -> dict:
    """{"label", "scores": None} from one request whose one token can only be a label's
    (``allowed_token_ids``): the label whose token the model rates highest. No log-probabilities:
    this works on GPU too."""
    prompt = few_shot(THREE_WAY_INSTRUCTION, "Sentiment", THREE_WAY, text)
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0,
                                      extra_body={"allowed_token_ids": allowed})
    return {"label": to_label(reply.choices[0].text), "scores": None}


def ask(client, model: str, prompt: str) -> str:
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0, stop=["\n"])
    return reply.choices[0].text


def classify(client, model: str, text: str) -> str:
    """The label by vote of three prompts (no log-probabilities: this works on GPU too)."""
    three = to_label(ask(client, model, few_shot(THREE_WAY_INSTRUCTION, "Sentiment", THREE_WAY, text)))
    if three == "neutral":
        return "neutral"
    polar = "Is the opinion in each review positive or negative?"
    negative_last = [POSITIVE[0], NEGATIVE[0], POSITIVE[1], NEGATIVE[1]]
    positive_last = [NEGATIVE[0], POSITIVE[0], NEGATIVE[1], POSITIVE[1]]
    first = to_label(ask(client, model, few_shot(polar, "Opinion", negative_last, text)), LABELS[:2])
    second = to_label(ask(client, model, few_shot(polar, "Opinion", positive_last, text)), LABELS[:2])
    if first is None or first != second:
        return "neutral"
    return first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_connection_args(parser)
    add_text_args(parser, "classify")
    parser.add_argument("--method", choices=("scores", "choice", "vote"), default="scores",
                        help="scores: one request with logprobs (default); choice: one request whose "
                             "token can only be a label (allowed_token_ids), labels only, for a backend "
                             "without top log-probabilities (GPU); vote: three prompts, labels only")
    parser.add_argument("--json", action="store_true",
                        help='print JSON lines {"text", "label", "scores", "label_mass"} instead of LABEL<TAB>TEXT')
    args = parser.parse_args(argv)
    texts = read_texts(parser, args)
    client, model = connect(args)
    allowed = label_token_ids(client, model) if args.method == "choice" else []
    for text in texts:
        if args.method == "choice":
            result = choose(client, model, text, allowed)
        elif args.method == "vote":
            result = {"label": classify(client, model, text), "scores": None}
        else:
            try:
                result = score(client, model, text)
            except openai.BadRequestError as error:
                sys.exit(f"the gateway refused logprobs={ALTERNATIVES} ({error.message}); "
                         "on a GPU backend use --method choice")
        if args.json:
            print(json.dumps({"text": text, **result}), flush=True)
        else:
            print(f"{result['label']}\t{text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
