"""Structured output with XGrammar: the one place trident touches it.

TensorRT-LLM's backend constrains decoding with XGrammar from two request inputs,
``guided_decoding_guide_type`` (``json``, ``json_schema``, ``regex``, ``ebnf_grammar``) and
``guided_decoding_guide``, and one repository parameter, ``xgrammar_tokenizer_info_path``: a JSON
file describing the tokenizer (``encoded_vocab``, ``tokenizer_str``, ``stop_token_ids``, the format
of TensorRT-LLM's ``examples/generate_xgrammar_tokenizer_info.py``). trident writes that file
once at repository build time (:func:`write_tokenizer_info`) for both flavours; the CPU engine
loads it (:func:`load_tokenizer_info`) and compiles guides with :class:`GuideCompiler`.

The ``llm`` model checks a guide before it reaches any engine (:func:`check_guide`): the grammar
is built without the vocabulary (cheap), so a schema or regex XGrammar cannot take is a 400
naming the field, on CPU and GPU alike, instead of an engine error mid-request. It imports
XGrammar at its first guided request (:func:`load`, on a thread of its own while other requests
go on: trident.llm_service), so that a stub that is never asked for structured output never
loads torch.

JSON is generated without free whitespace (``any_whitespace=False``): with it a small model can
emit spaces or newlines until ``max_tokens``, and the output then never parses.
"""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

from .contract import GUIDE_JSON, GUIDE_JSON_SCHEMA, GUIDE_REGEX, Guide, InvalidRequest

GUIDE_PARAM = "guided_decoding_guide"


#: Every XGrammar call of this process goes through this lock (compiles, matcher creation, the
#: engine's per-step masks), because XGrammar does not document its thread safety. It was added
#: while the llm stub's heap corruption under concurrent guided requests was unexplained; that
#: turned out to be Triton 2.51's Python-backend stub (trident.stub_objects), not XGrammar.
LOCK = threading.RLock()


def _xgr():
    with LOCK:
        import xgrammar  # imported on first use: the gateway never needs it

    return xgrammar


def loaded() -> bool:
    """Whether XGrammar is imported in this process (it imports torch: about 1.3 s of CPU where
    torch is not imported yet, as in a ``llm`` stub: trident.text.hf_tokenizer)."""
    return "xgrammar" in sys.modules


def load() -> None:
    """Import XGrammar (and torch) now."""
    _xgr()


def _error(guide: Guide, exc: Exception) -> InvalidRequest:
    # XGrammar's messages start with "[time] /path/file.cc:line: "; keep the reason only.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "] " in text and ".cc:" in text:
        text = text.split(": ", 1)[-1]
    what = {GUIDE_JSON_SCHEMA: "JSON schema", GUIDE_REGEX: "regular expression"}.get(guide.type, "grammar")
    return InvalidRequest(f"the {what} cannot be used for constrained decoding: {text}", param=GUIDE_PARAM)


def check_guide(guide: Guide) -> None:
    """Raise InvalidRequest (param ``guided_decoding_guide``) for a guide XGrammar cannot compile.
    Builds the grammar without a vocabulary: milliseconds, no tokenizer needed."""
    xgr = _xgr()
    try:
        with LOCK:
            _build(xgr, guide)
    except ValueError as exc:  # json.JSONDecodeError too
        raise _error(guide, exc) from None
    except RuntimeError as exc:
        raise _error(guide, exc) from None


def _build(xgr, guide: Guide) -> None:
    if guide.type == GUIDE_JSON_SCHEMA:
        json.loads(guide.text)  # a clearer message than the converter's for bad JSON
        xgr.Grammar.from_json_schema(guide.text, any_whitespace=False)
    elif guide.type == GUIDE_REGEX:
        xgr.Grammar.from_regex(guide.text)
    elif guide.type != GUIDE_JSON:
        xgr.Grammar.from_ebnf(guide.text)


# -- the tokenizer description (TensorRT-LLM's xgrammar_tokenizer_info.json) ----------------------


def tokenizer_info_dict(tokenizer: Any) -> dict[str, Any]:
    """What XGrammar needs of a Hugging Face fast tokenizer: the vocabulary in id order, the
    backend's serialized form (its vocabulary type is detected from it) and the end token."""
    vocab = tokenizer.get_vocab()
    encoded_vocab = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    return {
        "encoded_vocab": encoded_vocab,
        "tokenizer_str": tokenizer.backend_tokenizer.to_str(),
        "stop_token_ids": [tokenizer.eos_token_id],
    }


def write_tokenizer_info(tokenizer_dir: str | Path, path: str | Path) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tokenizer_info_dict(tokenizer)), encoding="utf-8")
    return path


def load_tokenizer_info(path: str | Path, *, vocab_size: int):
    """An ``xgrammar.TokenizerInfo`` from the file; ``vocab_size`` is the model's (its logits'
    width, which may exceed the tokenizer's vocabulary: padded rows are never allowed)."""
    xgr = _xgr()
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    with LOCK:
        metadata = xgr.TokenizerInfo._detect_metadata_from_hf(data["tokenizer_str"])
        return xgr.TokenizerInfo(
            data["encoded_vocab"],
            vocab_type=metadata["vocab_type"],
            vocab_size=vocab_size,
            stop_token_ids=data["stop_token_ids"],
            add_prefix_space=metadata["add_prefix_space"],
        )


class GuideCompiler:
    """Compiles guides for one tokenizer, with XGrammar's cache (a repeated schema costs ~0.1 ms).
    Thread-safe; compile off the engine's decode loop (a new schema takes milliseconds)."""

    def __init__(self, tokenizer_info, *, max_threads: int = 1, cache_bytes: int = -1) -> None:
        """``cache_bytes``: at most this much of compiled guides are kept (XGrammar evicts the least
        recently used); -1 keeps every one, 0 none."""
        self.tokenizer_info = tokenizer_info
        with LOCK:
            self._compiler = _xgr().GrammarCompiler(tokenizer_info, max_threads=max_threads,
                                                    cache_enabled=cache_bytes != 0, cache_limit_bytes=cache_bytes)

    def cache_bytes(self) -> int:
        """Bytes of compiled guides the cache holds now."""
        with LOCK:
            return int(self._compiler.get_cache_size_bytes())

    def compile(self, guide: Guide):
        """The CompiledGrammar of ``guide``; raises InvalidRequest naming the field."""
        with LOCK:
            try:
                if guide.type == GUIDE_JSON:
                    return self._compiler.compile_builtin_json_grammar()
                if guide.type == GUIDE_JSON_SCHEMA:
                    return self._compiler.compile_json_schema(guide.text, any_whitespace=False)
                if guide.type == GUIDE_REGEX:
                    return self._compiler.compile_regex(guide.text)
                return self._compiler.compile_grammar(guide.text)
            except (RuntimeError, ValueError) as exc:
                raise _error(guide, exc) from None

    def matcher(self, compiled):
        with LOCK:
            return _xgr().GrammarMatcher(compiled)
