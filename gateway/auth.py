"""API keys: ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``, the header Anthropic's
clients send), stored and compared as SHA-256 hashes only.

Keys come from any of, together:

* ``TRIDENT_API_KEY`` (config ``API_KEY``): one key, named ``default``, that may use every model,
  rate-limited by ``DEFAULT_RATE_LIMIT`` if set. Hashed at start-up; the key itself is not kept.
* ``TRIDENT_API_KEYS_FILE`` (config ``API_KEYS_FILE``): a JSON list of objects
  ``{"name": "alice", "sha256": "<hex digest of the key>", "models": ["*"] or [names],
  "rate_limit": "60/minute", "endpoints": ["*"], "max_concurrent": 4}`` (``rate_limit`` may be absent:
  ``DEFAULT_RATE_LIMIT`` applies; ``endpoints``, shell-style patterns of route paths such as
  ``"/generate"`` or ``"/v1/*"``, may be absent: every endpoint; ``cache_salt`` and ``priority``,
  optional, apply to every generation of the key: :func:`for_key`). ``python -m gateway.keys``
  adds, lists and revokes entries;
* config ``API_KEYS``: the same list, inline (a config file, or tests).

Secure default: when no key is configured at all, every generation request is a 401; the
gateway never runs open. ``/healthz``, ``/readyz`` and ``/metrics`` need no key.

A presented key is hashed and compared with every stored hash using ``hmac.compare_digest``
(constant time, no early exit). Keys are never logged; only a key's ``name`` is.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import current_app, g, request
from limits import parse_many as parse_rate_limit

from trident.contract import INT32_MAX, INT32_MIN, MAX_CACHE_SALT_CHARS, TextRequest

from .errors import ClientError

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
F = TypeVar("F", bound=Callable[..., Any])


def hash_key(key: str) -> str:
    """Hex SHA-256 of a key, the form the keys file stores."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    digest: bytes  # SHA-256 of the key; the key itself is never kept
    models: frozenset[str]  # "*" allows every model
    rate_limit: str | None = None
    endpoints: frozenset[str] = frozenset({"*"})  # fnmatch patterns of route paths
    max_concurrent: int | None = None  # open generations at once (gateway.concurrency); None: the default
    # every generation of the key gets this cache_salt (a request's own nested under it): keys of
    # one salt share prefix-cache blocks, no other key's requests see them (CPU engine)
    cache_salt: str | None = None
    # the default priority of the key's generations and the earliest they may ask for (vLLM's
    # priority, the lower first): a tenant's requests wait behind another's in the engine's queue
    priority: int | None = None

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    def may_call(self, endpoint: str) -> bool:
        return any(fnmatch.fnmatchcase(endpoint, pattern) for pattern in self.endpoints)


def _parse_entry(entry: Any, where: str) -> ApiKey:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: each API key entry must be an object")
    name, digest, models = entry.get("name"), entry.get("sha256"), entry.get("models", ["*"])
    rate_limit = entry.get("rate_limit")
    endpoints = entry.get("endpoints", ["*"])
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: API key entry needs a non-empty 'name'")
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise ValueError(f"{where}: API key {name!r} needs 'sha256', the 64 hex digits of the key's SHA-256")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise ValueError(f"{where}: API key {name!r}: 'models' must be a non-empty list of names or [\"*\"]")
    if rate_limit is not None:
        if not isinstance(rate_limit, str):
            raise ValueError(f"{where}: API key {name!r}: 'rate_limit' must be a string such as '60/minute'")
        parse_rate_limit(rate_limit)  # fails at start-up, not on the first request
    if not isinstance(endpoints, list) or not endpoints or not all(isinstance(e, str) and e for e in endpoints):
        raise ValueError(f"{where}: API key {name!r}: 'endpoints' must be a non-empty list of paths or [\"*\"]")
    max_concurrent = entry.get("max_concurrent")
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or isinstance(max_concurrent, bool)
                                       or max_concurrent < 1):
        raise ValueError(f"{where}: API key {name!r}: 'max_concurrent' must be a positive integer")
    cache_salt = entry.get("cache_salt")
    if cache_salt is not None:
        check_key_salt(cache_salt, f"{where}: API key {name!r}")
    priority = entry.get("priority")
    if priority is not None:
        check_key_priority(priority, f"{where}: API key {name!r}")
    unknown = set(entry) - {"name", "sha256", "models", "rate_limit", "endpoints", "max_concurrent", "cache_salt",
                            "priority"}
    if unknown:
        raise ValueError(f"{where}: API key {name!r}: unknown fields {sorted(unknown)}")
    return ApiKey(name, bytes.fromhex(digest), frozenset(models), rate_limit, frozenset(endpoints), max_concurrent,
                  cache_salt, priority)


def check_key_salt(salt: Any, where: str) -> None:
    if not isinstance(salt, str) or not salt or len(salt) > MAX_CACHE_SALT_CHARS:
        raise ValueError(f"{where}: 'cache_salt' must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} "
                         "characters")


def check_key_priority(priority: Any, where: str) -> None:
    if not isinstance(priority, int) or isinstance(priority, bool) or not INT32_MIN <= priority <= INT32_MAX:
        raise ValueError(f"{where}: 'priority' must be an integer between {INT32_MIN} and {INT32_MAX}")


def for_key(params: TextRequest, key: ApiKey) -> TextRequest:
    """``params`` as the key's generation: with its cache_salt, the request's own (if any) nested
    under it, so that one key's salts never name another's blocks; with its priority where the
    request gives none, and never an earlier one (the lower is the earlier) than the key's."""
    sampling = params.sampling
    if key.cache_salt is not None:
        own = sampling.cache_salt
        salt = key.cache_salt if own is None else f"{key.cache_salt}\x00{own}"
        sampling = dataclasses.replace(sampling, cache_salt=salt)
    if key.priority is not None:
        own = sampling.priority
        sampling = dataclasses.replace(sampling, priority=key.priority if own is None else max(own, key.priority))
    return params if sampling is params.sampling else dataclasses.replace(params, sampling=sampling)


class KeyStore:
    """The configured keys; ``lookup`` is the only way to get one."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._keys = tuple(keys)
        names = [k.name for k in self._keys]
        if len(names) != len(set(names)):
            raise ValueError("API key names must be unique")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> KeyStore:
        keys: list[ApiKey] = []
        if config.get("API_KEY"):
            keys.append(
                ApiKey("default", hashlib.sha256(config["API_KEY"].encode()).digest(), frozenset({"*"}), None)
            )
        path = config.get("API_KEYS_FILE")
        if path:
            with open(path, encoding="utf-8") as f:
                entries = json.load(f)
            if not isinstance(entries, list):
                raise ValueError(f"{path}: the API keys file must hold a JSON list")
            keys.extend(_parse_entry(e, path) for e in entries)
        keys.extend(_parse_entry(e, "API_KEYS") for e in config.get("API_KEYS") or ())
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def lookup(self, presented: str) -> ApiKey | None:
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        found = None
        for key in self._keys:  # every key compared: time does not tell which one matched
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


def authenticate(store: KeyStore, header: str | None) -> ApiKey:
    """The key of an ``Authorization`` header, or a 401 with ``WWW-Authenticate: Bearer``."""
    if not store:
        raise ClientError(
            "No API keys are configured on this server, so no request can be authenticated",
            status=401,
            headers=_CHALLENGE,
        )
    if header is None or not header.strip():
        raise ClientError(
            "Missing API key: send the header 'Authorization: Bearer <api key>'", status=401, headers=_CHALLENGE
        )
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
        raise ClientError(
            "Malformed Authorization header: expected 'Bearer <api key>'", status=401, headers=_CHALLENGE
        )
    key = store.lookup(token)
    if key is None:
        raise ClientError("Invalid API key", status=401, headers=_CHALLENGE)
    return key


def require_api_key(view: F) -> F:
    """Route decorator: sets ``g.api_key`` or raises 401; a key that may not call this endpoint
    is a 403. Put it above ``rate_limited``."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        store: KeyStore = current_app.extensions["trident"].keys
        header = request.headers.get("Authorization")
        if header is None and request.headers.get("x-api-key"):  # Anthropic's clients send the key so
            header = f"Bearer {request.headers['x-api-key'].strip()}"
        key = authenticate(store, header)
        g.api_key = key
        authorize_endpoint(key, _endpoint())
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _endpoint() -> str:
    """The matched route pattern, ``/generate/`` counted as ``/generate``."""
    rule = request.url_rule
    return (rule.rule.rstrip("/") or "/") if rule is not None else request.path


def authorize_endpoint(key: ApiKey, endpoint: str) -> None:
    """403 when the key may not call ``endpoint`` (its ``endpoints`` patterns)."""
    if not key.may_call(endpoint):
        raise ClientError(f"API key '{key.name}' may not use the endpoint {endpoint}", status=403)


def authorize_model(key: ApiKey, model: str) -> None:
    """403 when the key may not use ``model``."""
    if not key.may_use(model):
        raise ClientError(
            f"API key '{key.name}' may not use the model '{model}'", status=403, param="model"
        )
