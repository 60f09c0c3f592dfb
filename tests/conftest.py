"""Fixtures every test module gets: tiny models of every adapter family, the byte tokenizer, the real
offline SmolLM2, and one torch thread per test module (the helpers that build tiny models are in
tiny_models.py)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import EXTRA_LLAMA_LIKE, TINY_FAMILIES, make_byte_tokenizer, make_tiny_model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> folder of a saved tiny model, for all four adapter families plus mistral and qwen2."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {f: make_tiny_model(f, root / f) for f in TINY_FAMILIES + EXTRA_LLAMA_LIKE}


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_byte_tokenizer()


@pytest.fixture(scope="session")
def smollm2():
    """The real offline default model (the first run converts the GGUF: up to a minute)."""
    from gptq_explorer.models import load_model

    return load_model()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is ~5x faster than two contended ones.
    Autouse: every test module runs with it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
