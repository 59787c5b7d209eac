"""What the recipes share: the command-line options to reach the gateway, and the client.

The recipes use the official ``openai`` client, unmodified, against the gateway's
OpenAI-compatible endpoints (``/v1``).
"""

from __future__ import annotations

import argparse
import os
import sys

import openai

DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-url",
        default=os.environ.get("TRIDENT_BASE_URL", DEFAULT_BASE_URL),
        help="the gateway's /v1 URL (env TRIDENT_BASE_URL; default %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("TRIDENT_API_KEY"),
        help="API key (default: env TRIDENT_API_KEY)",
    )
    parser.add_argument("--model", default=None, help="model name (default: the first one the gateway serves)")


def add_text_args(parser: argparse.ArgumentParser, what: str) -> None:
    """Texts to work on: as arguments, and/or one per line of ``--file``."""
    parser.add_argument("texts", nargs="*", help=f"texts to {what}")
    parser.add_argument("--file", help="a file with one text per line (- for standard input)")


def read_texts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The texts of add_text_args (non-empty lines of the file, stripped); a usage error if none."""
    texts = list(args.texts)
    if args.file:
        if args.file == "-":
            texts += [line.strip() for line in sys.stdin if line.strip()]
        else:
            with open(args.file, encoding="utf-8") as lines:
                texts += [line.strip() for line in lines if line.strip()]
    if not texts:
        parser.error("give texts as arguments or --file")
    return texts


def token_ids(client: openai.OpenAI, model: str, text: str) -> list[int]:
    """The ids the served model's tokenizer gives ``text`` (no special tokens): the gateway's
    ``POST /tokenize``, beside ``/v1``."""
    root = str(client.base_url).rstrip("/").removesuffix("/v1")
    reply = client.with_options(base_url=root).post(
        "/tokenize", cast_to=object, body={"model": model, "prompt": text, "add_special_tokens": False})
    return list(reply["tokens"])


def connect(args: argparse.Namespace) -> tuple[openai.OpenAI, str]:
    """The client and the model to use; exits with a message when no key was given."""
    if not args.api_key:
        sys.exit("no API key: pass --api-key or set TRIDENT_API_KEY")
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    return client, model
