"""A Hugging Face tokenizer loaded without PyTorch, for the processes that only tokenize.

transformers 5 imports torch whenever it is installed (``modeling_rope_utils`` does, reached
from ``AutoTokenizer``), although a fast tokenizer never uses it. In a ``llm`` or
``preprocessing`` stub that cost about 2.3 s of CPU at every start and about 250 MB of memory
(SmolLM2's tokenizer, measured on a 2-vCPU EPYC: 3.5 s and 384 MB against 1.2 s and 135 MB), in
each of the CPU repository's three such stubs (``llm``, its NVIDIA twin ``ensemble``, and
``preprocessing``) and in every further ``llm`` instance.

:func:`load_tokenizer` hides torch while transformers is imported and the tokenizer is read
(``None`` in ``sys.modules``: ``importlib.util.find_spec`` then finds nothing, which is how
transformers decides that torch is missing), then un-hides it, so that a later import of torch
(XGrammar's, for the first guided request: trident.llm_service) works. Where torch is
already imported it changes nothing. It must run before any other thread of
the process may import torch (a stub's ``initialize``).
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..fsutil import environ_set

#: transformers' one-line advice at import ("PyTorch was not found ..."), expected here.
_QUIET = "TRANSFORMERS_NO_ADVISORY_WARNINGS"


def load_tokenizer(path: str | Path) -> Any:
    """``AutoTokenizer.from_pretrained(path)``, without importing torch where it is not yet imported."""
    with contextlib.ExitStack() as stack:
        if "torch" not in sys.modules:
            stack.enter_context(_torch_hidden())
            stack.enter_context(environ_set(_QUIET, "1"))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))


@contextlib.contextmanager
def _torch_hidden() -> Iterator[None]:
    """``import torch`` finds nothing in the block (``None`` in ``sys.modules``)."""
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
