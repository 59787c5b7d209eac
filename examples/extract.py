#!/usr/bin/env python3
"""Structured extraction: the event a free text describes, as JSON that matches a schema.

    TRIDENT_API_KEY=... python examples/extract.py "Lunch with Anna on Friday at 12:30 at Luigi's."
    TRIDENT_API_KEY=... python examples/extract.py --file notes.txt        # one text per line
    TRIDENT_API_KEY=... python examples/extract.py --schema contact.json "Call Bob Smith at 555-0100."

Prints one JSON object per text (one line each, the text under "text", the extraction under
"event"). The request sends the schema as ``response_format: {"type": "json_schema", ...}``:
the engine masks every token the grammar does not allow, so the answer always parses and matches
the schema (XGrammar; strings are bounded by ``maxLength`` so the answer cannot run past
``max_tokens``). The recipe still parses the answer and validates it against the schema with
``jsonschema_rs`` (``pip install jsonschema-rs``), and exits non-zero when either fails.

What the schema guarantees is the shape, not the content: the served model is tiny
(SmolLM2-135M-Instruct). Measured against it on the 4 texts of examples/data/events.txt
(docs/recipes.md): 12 of the 20 fields right with the one worked example the prompt carries
(dates and places mostly right; a text unlike the example got the example's place and people
copied); without the example about 5 of 15 on the first three, and lists repeated one name up
to ``maxItems``. Check the values before trusting them.
``--schema FILE`` takes another JSON Schema (an object; as docs/api.md lists what XGrammar
supports); then the extraction is printed under "data".
"""

from __future__ import annotations

import argparse
import json
import sys

from trident_client import add_connection_args, add_text_args, connect, read_texts

EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 60, "description": "what the event is"},
        "date": {"type": "string", "maxLength": 30, "description": "the day, as the text says it"},
        "time": {"type": "string", "maxLength": 20, "description": "the time of day, or empty"},
        "place": {"type": "string", "maxLength": 60, "description": "where it happens, or empty"},
        "people": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 40},
                   "maxItems": 4, "description": "the people named"},
    },
    "required": ["name", "date", "time", "place", "people"],
    "additionalProperties": False,
}

EXAMPLE = ("Dinner with Paul and Emma next Saturday at 8 pm at the Blue Fox.",
           {"name": "Dinner", "date": "next Saturday", "time": "8 pm", "place": "the Blue Fox",
            "people": ["Paul", "Emma"]})

SYSTEM = ("You extract information from text. Answer with a JSON object only. Copy the values "
          "from the text; use an empty string or an empty list when the text does not say.")


def extract(client, model: str, text: str, schema: dict, name: str = "event", max_tokens: int = 200) -> dict:
    """The object the model extracts from ``text``; ValueError when it does not parse or match."""
    import jsonschema_rs

    fields = ", ".join(schema.get("properties", {})) or "the details"

    def ask(text):
        return f"Text: {' '.join(text.split())}\n\nExtract the {name} ({fields}) as JSON."

    # One worked example (for the event schema only): the small model copies its style.
    shots = [] if schema is not EVENT_SCHEMA else [
        {"role": "user", "content": ask(EXAMPLE[0])},
        {"role": "assistant", "content": json.dumps(EXAMPLE[1], separators=(",", ":"))}]
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": SYSTEM}, *shots,
                  {"role": "user", "content": ask(text)}],
        temperature=0,
        max_tokens=max_tokens,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
    )
    choice = reply.choices[0]
    if choice.finish_reason == "length":
        raise ValueError(f"the answer was cut at max_tokens ({max_tokens}): {choice.message.content!r}")
    data = json.loads(choice.message.content)
    jsonschema_rs.validate(schema, data)  # raises jsonschema_rs.ValidationError (a ValueError)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_connection_args(parser)
    add_text_args(parser, "extract from")
    parser.add_argument("--schema", help="a JSON Schema file to use instead of the event schema")
    parser.add_argument("--max-tokens", type=int, default=200, help="default %(default)s")
    args = parser.parse_args(argv)
    texts = read_texts(parser, args)
    schema, key = EVENT_SCHEMA, "event"
    if args.schema:
        with open(args.schema, encoding="utf-8") as f:
            schema, key = json.load(f), "data"
    client, model = connect(args)
    failed = 0
    for text in texts:
        try:
            data = extract(client, model, text, schema, name=key if key == "event" else "details",
                           max_tokens=args.max_tokens)
        except ValueError as error:  # json.JSONDecodeError and jsonschema_rs.ValidationError are ValueErrors
            print(f"extract.py: {text!r}: {error}", file=sys.stderr)
            failed += 1
            continue
        print(json.dumps({"text": text, key: data}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
