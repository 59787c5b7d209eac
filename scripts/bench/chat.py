"""The chat scenario: time to first token of a follow-up turn whose history the server has seen
(prefix reuse), against the same prompt cold.

A conversation is a system prompt, a long first user message (``history_tokens`` tokens in all)
and the assistant's reply; the follow-up re-sends all of it plus a new question, as a chat
client does. Warm: the first turn was just served, so its blocks are cached. Cold: the very same
follow-up prompt behind another session tag at its very start, so no cached block can match. The
tag is the only difference: both prompts have the same length and the same work to do.

    chat_ttft(system, tokenizer=tok, history_tokens=1000)   # any System: request(prompt, n) -> Result
"""
from __future__ import annotations

import uuid

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SENTENCES = [
    "The river valley was settled by farmers who grew barley, lentils and flax on the flood plain.",
    "Every spring the water rose over the fields and left a layer of dark silt behind it.",
    "Traders came up the river in flat boats carrying salt, copper tools and painted pottery.",
    "The town council kept records of the harvest on clay tablets stored in the temple granary.",
    "In dry years the council opened the granary and shared the stored grain among the families.",
    "Children learned to count by tallying baskets of grain and the days between the new moons.",
    "A wall of mud brick was raised around the market after raiders burned the eastern houses.",
    "Scribes copied the old laws onto new tablets whenever the script or the spoken language changed.",
]


def first_turn(tag: str, history_tokens: int, tokenizer) -> str:
    """The first turn's prompt, about history_tokens tokens long."""
    head = f"{IM_START}system\n[{tag}] You are a careful assistant who answers questions about a text.{IM_END}\n"
    body, i = [], 0
    while len(tokenizer(head + " ".join(body)).input_ids) < history_tokens - 40:
        body.append(f"({i + 1}) {SENTENCES[i % len(SENTENCES)]}")
        i += 1
    return (f"{head}{IM_START}user\nRead this chronicle of a river town:\n{' '.join(body)}\n"
            f"What did the farmers grow?{IM_END}\n{IM_START}assistant\n")


def follow_up(first: str, reply: str) -> str:
    return f"{first}{reply}{IM_END}\n{IM_START}user\nAnd what did the traders bring?{IM_END}\n{IM_START}assistant\n"


def chat_ttft(system, *, tokenizer, history_tokens: int = 1000, reply_tokens: int = 16, rounds: int = 2) -> dict:
    """Best of `rounds` (each a fresh conversation): warm and cold TTFT of the follow-up turn."""
    warm, cold, prompt_tokens = [], [], 0
    for _ in range(rounds):
        tag = uuid.uuid4().hex[:12]
        first = first_turn(tag, history_tokens, tokenizer)
        reply = system.request(first, reply_tokens).text
        prompt = follow_up(first, reply)
        prompt_tokens = len(tokenizer(prompt).input_ids)
        result = system.request(prompt, reply_tokens)
        warm.append(result.t_first - result.t_start)
        other = prompt.replace(f"[{tag}]", f"[{uuid.uuid4().hex[:12]}]", 1)
        result = system.request(other, reply_tokens)
        cold.append(result.t_first - result.t_start)
    w, c = min(warm), min(cold)
    return {"system": system.name, "prompt_tokens": prompt_tokens, "warm_ttft_ms": w * 1000,
            "cold_ttft_ms": c * 1000, "warm_over_cold": w / c, "rounds_warm_ms": [round(x * 1000) for x in warm],
            "rounds_cold_ms": [round(x * 1000) for x in cold]}


def chat_table(rows: list[dict]) -> str:
    head = (f"{'system':<16} {'prompt tok':>10} {'warm TTFT ms':>12} {'cold TTFT ms':>12} {'warm/cold':>9}"
            f"  rounds warm / cold (ms)")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['system']:<16} {r['prompt_tokens']:>10} {r['warm_ttft_ms']:>12.0f} {r['cold_ttft_ms']:>12.0f} "
                     f"{r['warm_over_cold']:>9.2f}  {r['rounds_warm_ms']} / {r['rounds_cold_ms']}")
    return "\n".join(lines)
