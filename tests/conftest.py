"""Fixtures shared by every test folder; what they are built from is in helpers.py."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from helpers import alpaca_rows, save_tiny_causal_lm, write_jsonl  # noqa: E402 (after the environment)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> str:
    """A tiny Llama with a small BPE tokenizer (helpers.save_tiny_causal_lm)."""
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> str:
    """A tiny GPT-2 (256 positions) with the same tokenizer."""
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-gpt2"), arch="gpt2")


@pytest.fixture
def alpaca_file(tmp_path) -> str:
    return write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())
