"""Background responses across a Redis outage: a check to run against a running gateway whose
response store is a local redis-server (``TRIDENT_RESPONSES_STORE=redis://...``).

It creates ``--responses`` background responses (every other one streamed, its client leaving
after the first event), stops the redis-server (SIGSTOP: it answers nothing, as a hung server or
one in a failover) for ``--outage`` seconds, then reads every response every 0.1 s from the
moment Redis runs again (a client polling hard), and at the end checks each: ended
``completed`` or ``incomplete`` (not ``failed``), its text whole, and, for a streamed one, its
events read again from the start numbered 0..n-1, once each, their deltas the stored text.

    .venv/bin/python scripts/store_outage_check.py --api-key K --redis-pid $(pgrep -f 'redis-server.*6379') \\
        --responses 12 --outage 10 --tokens 60      # the generations end during the outage
    ... --tokens 300                                 # they run through it

Not a test: it prints one line per response and how many were broken (docs/openai.md,
Background responses).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import time

import requests


def _events(data: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: {")]


def _create(url: str, headers: dict, model: str, n: int, tokens: int, stream: bool) -> str:
    body = {"model": model, "input": f"Write a long story about dragon number {n}.", "max_output_tokens": tokens,
            "temperature": 0, "background": True, "stream": stream}
    response = requests.post(url + "/v1/responses", headers=headers, json=body, stream=stream, timeout=60)
    if response.status_code != 200:
        raise SystemExit(f"create: {response.status_code} {response.text[:300]}")
    if not stream:
        return response.json()["id"]
    data = b""
    for chunk in response.iter_content(None):  # the client leaves after the first event
        data += chunk
        if b"response.created" in data and b"\n\n" in data:
            break
    response.close()
    return _events(data)[0]["response"]["id"]


def _check(url: str, headers: dict, response_id: str, stream: bool) -> tuple[bool, str]:
    final: dict = {}
    for _ in range(600):
        final = requests.get(f"{url}/v1/responses/{response_id}", headers=headers, timeout=10).json()
        if final.get("status") not in ("queued", "in_progress"):
            break
        time.sleep(0.2)
    text = final["output"][0]["content"][0]["text"] if final.get("output") else ""
    if final.get("status") not in ("completed", "incomplete") or not text:
        return False, f"{final.get('status')} {(final.get('error') or {}).get('message', '')[:60]}"
    if not stream:
        return True, final["status"]
    events = _events(requests.get(f"{url}/v1/responses/{response_id}?stream=true", headers=headers,
                                  timeout=120).content)
    numbers = [event["sequence_number"] for event in events]
    deltas = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    ok = numbers == list(range(len(numbers))) and deltas == text
    return ok, f"{final['status']}, {len(numbers)} events" + ("" if ok else f" {numbers[:3]}..{numbers[-3:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--api-key", required=True)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--redis-pid", type=int, required=True, help="the redis-server of the response store")
    p.add_argument("--responses", type=int, default=12)
    p.add_argument("--outage", type=float, default=10.0, help="seconds Redis is stopped (the run lease is 6 s)")
    p.add_argument("--tokens", type=int, default=60)
    args = p.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"}
    made = [(_create(args.url, headers, args.model, n, args.tokens, n % 2 == 0), n % 2 == 0)
            for n in range(args.responses)]
    time.sleep(0.5)
    os.kill(args.redis_pid, signal.SIGSTOP)
    print(f"redis-server stopped for {args.outage:g} s", flush=True)
    try:
        time.sleep(args.outage)
    finally:
        os.kill(args.redis_pid, signal.SIGCONT)
    seen: dict[str, set] = {response_id: set() for response_id, _ in made}
    until = time.monotonic() + 15
    while time.monotonic() < until:  # every response read every 0.1 s from the moment Redis is back
        for response_id, _ in made:
            try:
                status = requests.get(f"{args.url}/v1/responses/{response_id}", headers=headers,
                                      timeout=10).json().get("status")
            except requests.RequestException as exc:
                status = type(exc).__name__
            seen[response_id].add(str(status))
        if all(seen[r] & {"completed", "incomplete", "failed"} for r, _ in made):
            break
        time.sleep(0.1)
    broken = 0
    for response_id, stream in made:
        ok, says = _check(args.url, headers, response_id, stream)
        broken += not ok
        print(f"{response_id[:20]} {'streamed' if stream else 'polled  '} {says}; read meanwhile: "
              f"{', '.join(sorted(seen[response_id]))} {'OK' if ok else 'BROKEN'}")
    print(f"broken: {broken} of {len(made)}")


if __name__ == "__main__":
    main()
