"""Shared fixtures: where the prepared model is. Loading this puts tests/ on the import path,
so every tier imports the shared helpers as ``testkit``."""
from pathlib import Path

import pytest
from testkit import model_dir


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
