"""Shared fixtures: where the prepared model and the filled repository are."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def model_dir() -> Path:
    return Path(os.environ.get("TRIDENT_MODEL_DIR", ROOT / ".cache/models/smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def checkpoint_dir() -> Path:
    path = model_dir()
    if not (path / "config.json").is_file():
        pytest.fail(f"no prepared checkpoint in {path}: run `make test`, which prepares it")
    return path


@pytest.fixture(scope="session")
def tokenizer(checkpoint_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint_dir))
