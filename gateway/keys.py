"""Manage the API keys file (``TRIDENT_API_KEYS_FILE``): add, list, revoke.

    python -m gateway.keys add --name alice --models '*' --rate-limit 60/minute --file keys.json
    python -m gateway.keys list --file keys.json
    python -m gateway.keys revoke --name alice --file keys.json

``add`` makes a new random key, prints it once on stdout, and stores only its SHA-256; nobody
can read it back later (lose it: revoke and add again). The file is rewritten atomically
(a temporary file, then a rename), readable by its owner only. A running gateway reads the file
when its workers start: after a change, ``kill -HUP <gunicorn master pid>`` (new workers, no
dropped connections) or a restart.

Why a fast, unsalted SHA-256 and not bcrypt/scrypt/argon2: those exist to slow down guessing of
*low-entropy* secrets (passwords) from a leaked hash. Keys made here are 256 random bits
(``secrets.token_urlsafe(32)``); no amount of hashing speed makes guessing 2**256 candidates
feasible, so a slow hash would buy nothing while costing tens of milliseconds of CPU on *every*
request (and a salted hash could not be checked without either a key id in the key or one slow
hash per stored key). This is what GitHub and Stripe do for their tokens. The one weak spot is a
hand-picked ``TRIDENT_API_KEY``: use a long random one.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

from limits import parse_many as parse_rate_limit

from .auth import KeyStore, _parse_entry, check_key_priority, check_key_salt, hash_key

KEY_PREFIX = "tk-"


def new_key() -> str:
    """A fresh key: a recognizable prefix (secret scanners, logs review) + 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def read_entries(path: Path) -> list[dict[str, Any]]:
    """The file's entries (an absent or empty file: none); a malformed file is an error."""
    if not path.exists() or not path.read_text(encoding="utf-8").strip():
        return []
    entries = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: the API keys file must hold a JSON list")
    KeyStore(_parse_entry(e, str(path)) for e in entries)  # the gateway must be able to load it
    return entries


def write_entries(path: Path, entries: list[dict[str, Any]]) -> None:
    """Validate, then replace the file atomically, mode 0600."""
    KeyStore(_parse_entry(e, str(path)) for e in entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def add_key(
    path: Path,
    *,
    name: str,
    models: list[str],
    rate_limit: str | None = None,
    endpoints: list[str] | None = None,
    max_concurrent: int | None = None,
    cache_salt: str | None = None,
    priority: int | None = None,
) -> str:
    """Add a key named ``name``; returns the key (the only time it exists outside a client)."""
    entries = read_entries(path)
    if any(e.get("name") == name for e in entries):
        raise ValueError(f"a key named {name!r} exists already in {path}: revoke it first")
    if rate_limit is not None:
        parse_rate_limit(rate_limit)
    key = new_key()
    entry: dict[str, Any] = {"name": name, "sha256": hash_key(key), "models": models}
    if rate_limit is not None:
        entry["rate_limit"] = rate_limit
    if endpoints is not None:
        entry["endpoints"] = endpoints
    if max_concurrent is not None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        entry["max_concurrent"] = max_concurrent
    if cache_salt is not None:
        check_key_salt(cache_salt, "cache_salt")
        entry["cache_salt"] = cache_salt
    if priority is not None:
        check_key_priority(priority, "priority")
        entry["priority"] = priority
    write_entries(path, [*entries, entry])
    return key


def revoke_key(path: Path, *, name: str) -> None:
    entries = read_entries(path)
    kept = [e for e in entries if e.get("name") != name]
    if len(kept) == len(entries):
        raise ValueError(f"no key named {name!r} in {path}")
    write_entries(path, kept)


def _names(value: str) -> list[str]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one name, or '*'")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.keys", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--file",
        type=Path,
        default=os.environ.get("TRIDENT_API_KEYS_FILE"),
        help="the keys file (default: $TRIDENT_API_KEYS_FILE)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="make a key; prints it once")
    add.add_argument("--name", required=True)
    add.add_argument("--models", type=_names, default=["*"], help="comma-separated model names, or '*' (default)")
    add.add_argument("--rate-limit", default=None, help="e.g. '60/minute' (default: DEFAULT_RATE_LIMIT)")
    add.add_argument("--endpoints", type=_names, default=None, help="comma-separated paths or patterns, e.g. '/v1/*'")
    add.add_argument("--max-concurrent", type=int, default=None,
                     help="generations the key may have open at once (default: DEFAULT_MAX_CONCURRENT)")
    add.add_argument("--cache-salt", default=None,
                     help="the key's prefix-cache salt: keys of one salt share cached prompts, no other key sees them")
    add.add_argument("--priority", type=int, default=None,
                     help="the key's default priority in the engine's queue and the earliest it may ask for (the "
                          "lower first; default: none, requests give their own, 0 when they do not)")
    for name in ("list", "revoke"):
        sub = commands.add_parser(name, help=f"{name} keys")
        sub.add_argument("--file", type=Path, default=argparse.SUPPRESS)
        if name == "revoke":
            sub.add_argument("--name", required=True)
    add.add_argument("--file", type=Path, default=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.file is None:
        parser.error("give --file or set TRIDENT_API_KEYS_FILE")
    try:
        if args.command == "add":
            key = add_key(args.file, name=args.name, models=args.models, rate_limit=args.rate_limit,
                          endpoints=args.endpoints, max_concurrent=args.max_concurrent, cache_salt=args.cache_salt,
                          priority=args.priority)
            print(key)
            print(f"added key {args.name!r} to {args.file}; this is the only time the key is shown",
                  file=sys.stderr)
        elif args.command == "list":
            for e in read_entries(args.file):
                print(json.dumps({k: v for k, v in e.items() if k != "sha256"}))
        else:
            revoke_key(args.file, name=args.name)
            print(f"revoked key {args.name!r} in {args.file}", file=sys.stderr)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
