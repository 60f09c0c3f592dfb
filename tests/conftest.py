"""Fixtures every test module gets: tiny models of every adapter family, the byte tokenizer, the real
offline SmolLM2, and one torch thread per test module (the helpers that build tiny models are in
tiny_models.py); and the real-browser tests' `chromium`, `browser` and `voila`, from browser_fixtures.py."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Without CUDA, Triton's interpreter runs the CUDA column kernel on the CPU
# (tests/test_engine_kernel_triton.py). Triton reads this when it is first imported: set before that.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny_models import EXTRA_LLAMA_LIKE, TINY_FAMILIES, make_byte_tokenizer, make_tiny_model

# the real-browser tests' fixtures (chromium, browser, voila) and page helpers, for every browser test file
pytest_plugins = ["browser_fixtures"]


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


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny random-init LLaMA, loaded; one per test module, so a module may change its weights."""
    from gptq_explorer.models import load_model

    return load_model(str(make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")))


# synthetic layers with correlated inputs (services.layer_source.SyntheticSource), for the lessons' tests
@pytest.fixture(scope="module")
def synth():
    """64 x 192: groups of 128 leave a last group of 64, like SmolLM2's 576."""
    from gptq_explorer.services.layer_source import SyntheticSource

    return SyntheticSource(d_out=64, d_in=192, n_calib=1024, n_heldout=512, seed=5, rank=20).load()


@pytest.fixture(scope="module")
def layer():
    """32 x 300: groups of 128 leave a short last group."""
    from gptq_explorer.services.layer_source import SyntheticSource

    return SyntheticSource(d_out=32, d_in=300, n_calib=1024, n_heldout=512, seed=3, rank=24).load()


@pytest.fixture(scope="module")
def small():
    """24 x 48: small enough to check against brute force."""
    from gptq_explorer.services.layer_source import SyntheticSource

    return SyntheticSource(d_out=24, d_in=48, n_calib=512, n_heldout=256, seed=1, rank=12).load()
