"""The recipes in examples/ against the served CPU model, run as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema_rs
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


def sentiment_json(gateway, *texts, method="scores"):
    out = run_recipe(gateway, "sentiment.py", "--json", "--method", method, *texts)
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [row["text"] for row in rows] == list(texts), out
    return rows


def test_sentiment_scores_are_probabilities_that_agree_with_the_label(gateway):
    clear = {"I love it": "positive", "It broke after a day, awful": "negative",
             "Best meal I have had in years. The staff were wonderful.": "positive",
             "The store opens at nine.": "neutral"}
    for row in sentiment_json(gateway, *clear):
        scores = row["scores"]
        assert set(scores) == {"positive", "negative", "neutral"}, row
        assert all(0.0 <= p <= 1.0 for p in scores.values()), row
        assert abs(sum(scores.values()) - 1.0) <= 1e-6, row
        assert max(scores, key=scores.get) == row["label"] == clear[row["text"]], row
        assert 0.5 < row["label_mass"] <= 1.0 + 1e-6, row  # the label tokens were among the alternatives
        assert scores[row["label"]] > 0.4, row


def test_sentiment_hand_labelled_sample(gateway):
    """examples/data/sentiment.tsv: measured 21 of 24 (every opinion; 5 of 8 facts)."""
    gold = dict(line.split("\t", 1)[::-1] for line in (EXAMPLES / "data" / "sentiment.tsv").read_text().splitlines())
    rows = sentiment_json(gateway, *gold)
    right = [row["text"] for row in rows if row["label"] == gold[row["text"]]]
    opinions = [text for text, label in gold.items() if label != "neutral"]
    assert set(opinions) <= set(right), [r for r in rows if r["text"] not in right]
    assert len(right) >= 20, [r for r in rows if r["text"] not in right]


def test_sentiment_choice_method_labels_the_sample_with_one_token_that_can_only_be_a_label(gateway):
    """--method choice (allowed_token_ids, no log-probabilities: the GPU way): every answer is a
    label, every opinion of examples/data/sentiment.tsv right. Measured 20 of 24: the scores' three
    misses and "The library is on the corner..." (` positive` -0.936 against ` neutral` -0.965,
    which the scores outweigh with ` Neutral`): a tie that numerics may flip, hence 19."""
    gold = dict(line.split("\t", 1)[::-1] for line in (EXAMPLES / "data" / "sentiment.tsv").read_text().splitlines())
    rows = sentiment_json(gateway, *gold, method="choice")
    assert all(row["label"] in ("positive", "negative", "neutral") and row["scores"] is None for row in rows), rows
    right = [row["text"] for row in rows if row["label"] == gold[row["text"]]]
    opinions = [text for text, label in gold.items() if label != "neutral"]
    assert set(opinions) <= set(right), [r for r in rows if r["text"] not in right]
    assert len(right) >= 19, [r for r in rows if r["text"] not in right]


def test_sentiment_vote_method_prints_labels_without_scores(gateway):
    rows = sentiment_json(gateway, "I hated this book, it was boring and badly written.", method="vote")
    assert rows[0]["label"] == "negative" and rows[0]["scores"] is None, rows


def test_extract_output_parses_and_matches_its_schema(gateway):
    sys.path.insert(0, str(EXAMPLES))
    try:
        from extract import EVENT_SCHEMA
    finally:
        sys.path.remove(str(EXAMPLES))
    texts = (EXAMPLES / "data" / "events.txt").read_text().splitlines()[:3]
    out = run_recipe(gateway, "extract.py", *texts)
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [row["text"] for row in rows] == texts, out
    for row in rows:
        jsonschema_rs.validate(EVENT_SCHEMA, row["event"])
    # The shape is guaranteed; some content too: the date and place of the first two texts.
    assert rows[0]["event"]["date"] == "Friday" and "Luigi" in rows[0]["event"]["place"], rows[0]
    assert "March 3" in rows[1]["event"]["date"] and "Library" in rows[1]["event"]["place"], rows[1]


def test_extract_with_another_schema(gateway, tmp_path):
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40},
        "phone": {"type": "string", "pattern": "^[0-9][0-9 -]{5,15}$"}},
        "required": ["name", "phone"], "additionalProperties": False}
    path = tmp_path / "contact.json"
    path.write_text(json.dumps(schema))
    out = run_recipe(gateway, "extract.py", "--schema", str(path), "Call Bob Smith at 555-0100 after lunch.")
    row = json.loads(out)
    jsonschema_rs.validate(schema, row["data"])
