"""The recipes in examples/ against the served CPU model, run as a user runs them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_helpers import API_KEY

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_recipe(gateway, script, *args, stdin=None, timeout=120):
    env = {**os.environ, "TRIDENT_API_KEY": API_KEY}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--base-url", f"{gateway.url}/v1", *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


CLEAR_CUT = {
    "I absolutely love this phone, the battery lasts forever!": "positive",
    "Best meal I have had in years. The staff were wonderful.": "positive",
    "Terrible service. The food was cold and the waiter was rude.": "negative",
    "I hated this book, it was boring and badly written.": "negative",
    "The meeting is scheduled for 3 pm in room 204.": "neutral",
    "The store opens at nine and closes at five.": "neutral",
}


def test_sentiment_labels_clear_cut_texts(gateway):
    out = run_recipe(gateway, "sentiment.py", *CLEAR_CUT)
    labels = dict(line.split("\t", 1)[::-1] for line in out.strip().splitlines())
    assert labels == CLEAR_CUT


def test_chatbot_keeps_the_conversation(gateway):
    out = run_recipe(gateway, "chatbot.py", "--temperature", "0", "--max-tokens", "40",
                     stdin="What is the capital of France?\nAnd of Italy?\n")
    replies = [line[len("bot> "):] for line in out.splitlines() if line.startswith("bot> ")]
    assert len(replies) == 2 and all(r.strip() for r in replies), out
    assert "Paris" in replies[0]
    assert "Rome" in replies[1], out  # "And of Italy?" only makes sense with the first turn


def test_summarize_a_long_text(gateway):
    text = (EXAMPLES / "data" / "amazon.txt").read_text()
    out = run_recipe(gateway, "summarize.py", "--chunk-words", "200", str(EXAMPLES / "data" / "amazon.txt"))
    summary = out.strip()
    assert summary and len(summary.split()) < len(text.split()) / 2, summary
    assert "forest" in summary.lower() or "amazon" in summary.lower(), summary
