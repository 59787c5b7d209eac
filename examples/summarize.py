#!/usr/bin/env python3
"""Summarize a long text, however long: split it into chunks that fit the model's context,
summarize each in one sentence, and summarize those sentences again while they are too long.

    TRIDENT_API_KEY=... python examples/summarize.py article.txt
    cat article.txt | TRIDENT_API_KEY=... python examples/summarize.py -

The prompt puts the instruction after the text ("Summarize the text above in one sentence."):
the small served model (SmolLM2-135M-Instruct) follows an instruction it has just read much
better than one it read a page earlier, and otherwise tends to copy the text out.
"""

from __future__ import annotations

import argparse
import re
import sys

from trident_client import add_connection_args, connect

INSTRUCTION = "Summarize the text above in one sentence."


def chunks(text: str, max_words: int) -> list[str]:
    """Paragraphs (or, for a long one, sentences) packed into chunks of at most ``max_words``."""
    pieces: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        words = paragraph.split()
        if len(words) <= max_words:
            pieces.append(" ".join(words))
        else:
            pieces.extend(s for s in re.split(r"(?<=[.!?])\s+", " ".join(words)) if s)
    out: list[str] = []
    current: list[str] = []
    for piece in pieces:
        words = piece.split()
        while len(words) > max_words:  # one endless sentence: cut it
            out.append(" ".join(words[:max_words]))
            words = words[max_words:]
        if current and len(current) + len(words) > max_words:
            out.append(" ".join(current))
            current = []
        current.extend(words)
    if current:
        out.append(" ".join(current))
    return out


def summarize_chunk(client, model: str, text: str, max_tokens: int) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"{text}\n\n{INSTRUCTION}"}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"repetition_penalty": 1.1},
    )
    return reply.choices[0].message.content.strip()


def summarize(client, model: str, text: str, *, max_words: int = 350, max_tokens: int = 80,
              target_words: int = 120, log=lambda msg: None) -> str:
    """Map-reduce: one sentence per chunk, repeated until the summary is at most
    ``target_words`` words (or one chunk was left)."""
    level = 0
    while True:
        parts = chunks(text, max_words)
        level += 1
        log(f"pass {level}: {len(parts)} chunk(s) of at most {max_words} words")
        summary = " ".join(summarize_chunk(client, model, part, max_tokens) for part in parts)
        if len(parts) == 1 or len(summary.split()) <= target_words:
            return summary
        text = summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_connection_args(parser)
    parser.add_argument("file", help="the text file to summarize, or - for standard input")
    parser.add_argument("--chunk-words", type=int, default=350,
                        help="words per chunk: about 1.4 tokens each, well inside the context (default %(default)s)")
    parser.add_argument("--target-words", type=int, default=120,
                        help="summarize again while the summary is longer (default %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="say what each pass does, on stderr")
    args = parser.parse_args(argv)
    client, model = connect(args)
    text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
    if not text.strip():
        sys.exit("nothing to summarize")
    log = (lambda msg: print(msg, file=sys.stderr)) if args.verbose else (lambda msg: None)
    print(summarize(client, model, text, max_words=args.chunk_words, target_words=args.target_words, log=log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
