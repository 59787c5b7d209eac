#!/usr/bin/env python3
"""A terminal chatbot: multi-turn, streamed, with the official openai client.

    TRIDENT_API_KEY=... python examples/chatbot.py [--system "You are a pirate."]

Type a message and press Enter; the reply streams in as it is generated. ``/reset`` starts a
new conversation, ``/quit`` (or Ctrl-D) ends. Reads lines from standard input, so it also runs
from a script: ``printf 'Hi\\nWhat did I say?\\n' | python examples/chatbot.py``.
"""

from __future__ import annotations

import argparse
import sys

from trident_client import add_connection_args, connect


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_connection_args(parser)
    parser.add_argument("--system", default=None, help="a system prompt (default: the model's own)")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest reply, in tokens (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.3, help="0 for greedy replies (default %(default)s)")
    parser.add_argument("--repetition-penalty", type=float, default=1.2,
                        help="> 1 keeps a small model from looping (a gateway extension; default %(default)s)")
    parser.add_argument("--max-turns", type=int, default=8,
                        help="earlier exchanges kept in the conversation (the model's context is small)")
    args = parser.parse_args(argv)
    client, model = connect(args)

    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {model}. /reset starts over, /quit or Ctrl-D ends.")
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            messages = list(start)
            print("(new conversation)")
            continue
        if not interactive:
            print(f"you> {text}")
        messages.append({"role": "user", "content": text})
        print("bot> ", end="", flush=True)
        reply = []
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            stream=True,
            extra_body={"repetition_penalty": args.repetition_penalty},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                piece = chunk.choices[0].delta.content
                reply.append(piece)
                print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
        # Keep the system prompt and the last exchanges: old turns would overflow the context.
        history = messages[len(start):]
        messages = start + history[-2 * args.max_turns:]
    return 0


if __name__ == "__main__":
    sys.exit(main())
