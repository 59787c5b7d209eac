"""The keys file and its command (python -m gateway.keys), per-key endpoints, constant-time lookup."""

from __future__ import annotations

import hmac
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from gateway_fakes import FakeBackend

from gateway import create_app
from gateway.auth import KeyStore, hash_key
from gateway.keys import add_key, main, read_entries

ROOT = Path(__file__).resolve().parents[2]
BODY = {"prompt": "Hi there"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def client_for(path: Path):
    return create_app({"API_KEYS_FILE": str(path)}, backend=FakeBackend()).test_client()


def test_cli_add_prints_the_key_once_and_stores_only_its_hash(tmp_path):
    path = tmp_path / "keys.json"
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.keys", "add", "--name", "alice", "--models", "*",
         "--rate-limit", "60/minute", "--file", str(path)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    key = proc.stdout.strip()
    assert key.startswith("tk-") and len(key) >= 40 and "\n" not in key
    assert key not in proc.stderr and "alice" in proc.stderr
    text = path.read_text()
    assert key not in text
    assert json.loads(text) == [{"name": "alice", "sha256": hash_key(key), "models": ["*"], "rate_limit": "60/minute"}]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    listed = subprocess.run([sys.executable, "-m", "gateway.keys", "list", "--file", str(path)],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert json.loads(listed) == {"name": "alice", "models": ["*"], "rate_limit": "60/minute"}
    assert hash_key(key) not in listed and key not in listed
    response = client_for(path).post("/generate", json=BODY, headers=bearer(key))
    assert response.status_code == 200
    assert response.headers["X-RateLimit-Limit"] == "60"


def test_add_list_revoke_round_trip(tmp_path, capsys):
    path = tmp_path / "sub" / "keys.json"
    assert main(["add", "--name", "alice", "--models", "smollm2-135m-instruct,other", "--file", str(path)]) == 0
    alice = capsys.readouterr().out.strip()
    assert main(["--file", str(path), "add", "--name", "bob", "--endpoints", "/v1/*"]) == 0
    bob = capsys.readouterr().out.strip()
    assert alice != bob
    assert [e["name"] for e in read_entries(path)] == ["alice", "bob"]
    assert read_entries(path)[0]["models"] == ["smollm2-135m-instruct", "other"]

    assert main(["add", "--name", "alice", "--file", str(path)]) == 1  # names are unique
    assert "exists already" in capsys.readouterr().err
    assert main(["add", "--name", "carol", "--rate-limit", "lots", "--file", str(path)]) == 1
    assert [e["name"] for e in read_entries(path)] == ["alice", "bob"]  # nothing written

    assert client_for(path).post("/generate", json=BODY, headers=bearer(alice)).status_code == 200
    assert main(["revoke", "--name", "alice", "--file", str(path)]) == 0
    assert main(["revoke", "--name", "alice", "--file", str(path)]) == 1
    assert [e["name"] for e in read_entries(path)] == ["bob"]
    client = client_for(path)  # a new worker reads the file again
    assert client.post("/generate", json=BODY, headers=bearer(alice)).status_code == 401


def test_file_defaults_to_the_gateway_setting(tmp_path, monkeypatch, capsys):
    path = tmp_path / "keys.json"
    monkeypatch.setenv("TRIDENT_API_KEYS_FILE", str(path))
    assert main(["add", "--name", "env"]) == 0
    assert read_entries(path)[0]["name"] == "env"
    monkeypatch.delenv("TRIDENT_API_KEYS_FILE")
    with pytest.raises(SystemExit):
        main(["list"])


def test_a_corrupt_file_is_not_overwritten(tmp_path, capsys):
    path = tmp_path / "keys.json"
    path.write_text('[{"name": "x"}]')
    assert main(["add", "--name", "alice", "--file", str(path)]) == 1
    assert path.read_text() == '[{"name": "x"}]'


def test_endpoint_permissions_are_403(tmp_path):
    path = tmp_path / "keys.json"
    v1_only = add_key(path, name="v1", models=["*"], endpoints=["/v1/*"])
    generate_only = add_key(path, name="gen", models=["*"], endpoints=["/generate"])
    client = client_for(path)
    response = client.post("/generate/", json=BODY, headers=bearer(v1_only))
    assert response.status_code == 403
    assert response.get_json() == {"error": {
        "message": "API key 'v1' may not use the endpoint /generate", "type": "permission_error",
        "param": None, "code": 403}}
    assert client.post("/generate", json=BODY, headers=bearer(generate_only)).status_code == 200
    assert client.post("/generate/", json=BODY, headers=bearer(generate_only)).status_code == 200
    # 401 still comes first for a bad key
    assert client.post("/generate", json=BODY, headers=bearer("nope")).status_code == 401


def two_keys(tmp_path, capsys, *options):
    """A keys file with a key made by ``python -m gateway.keys add`` with ``options`` and a plain
    one; returns the file, the two keys, and a function from (key, path, body) to the
    SamplingParams of each generation the request started."""
    path = tmp_path / "keys.json"
    assert main(["add", "--name", "special", *options, "--file", str(path)]) == 0
    special = capsys.readouterr().out.strip()
    plain = add_key(path, name="plain", models=["*"])
    backend = FakeBackend()
    client = create_app({"API_KEYS_FILE": str(path)}, backend=backend).test_client()

    def sent(key, path_, body):
        before = len(backend.calls)
        assert client.post(path_, json=body, headers=bearer(key)).status_code == 200
        return [call[0].sampling for call in backend.calls[before:]]

    return path, special, plain, sent

def test_a_keys_cache_salt_salts_each_of_its_generations_with_the_requests_own_under_it(tmp_path, capsys):
    """Keys of one cache_salt share prefix-cache blocks, no other key's requests reach them: the
    key's salt goes on every generation (/generate, /v1/completions, chat, several prompts), a
    request's own cache_salt nested under it (one key's salts never name another's)."""
    path, acme, plain, sent = two_keys(tmp_path, capsys, "--cache-salt", "acme")
    assert read_entries(path)[0]["cache_salt"] == "acme"

    def salts(key, path_, body):
        return [sampling.cache_salt for sampling in sent(key, path_, body)]

    assert salts(acme, "/generate", BODY) == ["acme"]
    assert salts(acme, "/v1/completions", {"prompt": ["a", "b"], "cache_salt": "t1"}) == ["acme\x00t1"] * 2
    assert salts(plain, "/v1/completions", {"prompt": "a", "cache_salt": "t1"}) == ["t1"]
    assert salts(plain, "/generate", BODY) == [None]
    for bad in ("", 5, "x" * 1025):
        path.write_text(json.dumps([{"name": "a", "sha256": hash_key("k"), "models": ["*"], "cache_salt": bad}]))
        with pytest.raises(ValueError, match="cache_salt"):
            client_for(path)


def test_a_keys_priority_is_its_generations_default_and_the_earliest_they_may_ask_for(tmp_path, capsys):
    """A tenant's requests wait behind another's in the engine's queue: the key's priority goes
    on every generation that gives none; a request may ask for a later one (higher), never an
    earlier one than its key's."""
    path, batch, plain, sent = two_keys(tmp_path, capsys, "--priority", "10")
    assert read_entries(path)[0]["priority"] == 10

    def priorities(key, path_, body):
        return [sampling.priority for sampling in sent(key, path_, body)]

    assert priorities(batch, "/generate", BODY) == [10]
    assert priorities(batch, "/v1/completions", {"prompt": ["a", "b"], "priority": -5}) == [10, 10]
    assert priorities(batch, "/v1/completions", {"prompt": "a", "priority": 20}) == [20]
    assert priorities(plain, "/v1/completions", {"prompt": "a", "priority": -5}) == [-5]
    assert priorities(plain, "/generate", BODY) == [None]
    for bad in (1.5, "1", True, 2**31):
        path.write_text(json.dumps([{"name": "a", "sha256": hash_key("k"), "models": ["*"], "priority": bad}]))
        with pytest.raises(ValueError, match="priority"):
            client_for(path)


@pytest.mark.parametrize("endpoints", [[], "/generate", [""], [3]])
def test_bad_endpoints_stop_start_up(tmp_path, endpoints):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"name": "a", "sha256": hash_key("k"), "models": ["*"], "endpoints": endpoints}]))
    with pytest.raises(ValueError, match="endpoints"):
        client_for(path)


@pytest.mark.parametrize("position", [0, 2, 4, None])
def test_lookup_compares_every_key_in_constant_time(monkeypatch, position):
    """Whichever key matches (or none), every stored hash is compared with compare_digest: the
    time taken does not tell how far down the list a key is."""
    from gateway.auth import _parse_entry

    keys = [f"key-{i}" for i in range(5)]
    store = KeyStore(_parse_entry({"name": k, "sha256": hash_key(k), "models": ["*"]}, "t") for k in keys)
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("gateway.auth.hmac.compare_digest", counting)
    presented = keys[position] if position is not None else "unknown"
    found = store.lookup(presented)
    assert (found.name if found else None) == (keys[position] if position is not None else None)
    assert len(calls) == 5


def test_a_key_may_have_several_limits(tmp_path):
    path = tmp_path / "keys.json"
    key = add_key(path, name="burst", models=["*"], rate_limit="2/second;3/hour")
    client = client_for(path)
    statuses = [client.post("/generate", json=BODY, headers=bearer(key)).status_code for _ in range(4)]
    assert statuses == [200, 200, 429, 429]
