#!/usr/bin/env python3
"""Sentiment analysis: one label, positive, negative or neutral, per text.

    TRIDENT_API_KEY=... python examples/sentiment.py "I love this phone!"  "It broke in a day."
    TRIDENT_API_KEY=... python examples/sentiment.py --file reviews.txt   # one text per line

The served model is tiny (SmolLM2-135M-Instruct): asked in a chat it chats back instead of
answering with a label. What works, measured against the real model (docs/recipes.md):

* few-shot completion prompts (``Review: ...`` / ``Sentiment: <label>`` examples, then the text)
  at temperature 0 with a 2-token answer stopped at the newline; the answer is mapped to a label
  by its first letters, so " positive", "Positive." and "pos" all count;
* a three-way prompt alone rarely says "neutral" for factual texts, and a two-way prompt
  (positive or negative) follows the label of its LAST example when the text has no opinion. So
  the recipe asks three times: the three-way prompt, and the two-way prompt with its examples in
  two orders. "neutral" when the three-way prompt says so or the two orders disagree (the answer
  came from the examples, not from the text); otherwise the two-way answer.
"""

from __future__ import annotations

import argparse
import sys

from trident_client import add_connection_args, connect

LABELS = ("positive", "negative", "neutral")

THREE_WAY = [
    ("The hotel room was clean and the staff were friendly.", "positive"),
    ("The train was late and the seats were dirty.", "negative"),
    ("The train leaves at 8 am from platform 2.", "neutral"),
]
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


def ask(client, model: str, prompt: str) -> str:
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0, stop=["\n"])
    return reply.choices[0].text


def classify(client, model: str, text: str) -> str:
    three = to_label(ask(client, model, few_shot(
        "Classify the sentiment of each review as positive, negative or neutral.", "Sentiment", THREE_WAY, text)))
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
    parser.add_argument("texts", nargs="*", help="texts to classify")
    parser.add_argument("--file", help="a file with one text per line (- for standard input)")
    args = parser.parse_args(argv)
    texts = list(args.texts)
    if args.file:
        lines = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
        texts += [line.strip() for line in lines if line.strip()]
    if not texts:
        parser.error("give texts as arguments or --file")
    client, model = connect(args)
    for text in texts:
        print(f"{classify(client, model, text)}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
