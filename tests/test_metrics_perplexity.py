"""Perplexity protocol and per-layer output error, checked against hand computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import EXTRA_LLAMA_LIKE, TINY_FAMILIES, VOCAB

from gptq_explorer.metrics import (
    layer_output_mse,
    layer_output_sse,
    layer_relative_error,
    output_mse_from_hessian,
    perplexity,
)
from gptq_explorer.metrics import perplexity_eval as pe
from gptq_explorer.models import load_model


class Bigram(torch.nn.Module):
    """logits[t] = table[ids[t]]: a model whose every prediction we can compute by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.as_tensor(table, dtype=torch.float32))

    def get_output_embeddings(self):
        return torch.nn.Linear(1, self.table.shape[0])  # only its weight's row count (vocab) is read

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": self.table[input_ids]})()


def manual_ppl(table, ids, seqlen):
    """The paper's formula written out with NumPy loops."""
    table = np.asarray(table, dtype=np.float64)
    logp = table - np.log(np.exp(table).sum(1, keepdims=True))
    nlls = []
    for w in range(len(ids) // seqlen):
        win = ids[w * seqlen : (w + 1) * seqlen]
        loss = -np.mean([logp[win[t], win[t + 1]] for t in range(seqlen - 1)])  # first token never scored
        nlls.append(loss * seqlen)
    return math.exp(sum(nlls) / (len(nlls) * seqlen)), [n / seqlen for n in nlls]


def test_matches_hand_computation():
    rng = np.random.default_rng(0)
    V, seqlen = 7, 5
    table = rng.normal(size=(V, V)) * 2
    ids = rng.integers(0, V, size=3 * seqlen + 4)  # 4 tail tokens must be dropped
    ref, ref_nll = manual_ppl(table, ids, seqlen)
    for bs in (1, 2, 3):
        r = perplexity(Bigram(table), torch.tensor(ids), seqlen=seqlen, batch_size=bs, progress=False)
        assert r.ppl == pytest.approx(ref, rel=1e-5)
        assert r.nll == pytest.approx(ref_nll, rel=1e-5)
        assert (r.n_windows, r.n_tokens, r.tokens_dropped, r.seqlen) == (3, 15, 4, seqlen)
    # the dropped tail does not count:
    ids2 = ids.copy()
    ids2[-1] = (ids2[-1] + 1) % V
    assert perplexity(Bigram(table), torch.tensor(ids2), seqlen=seqlen, progress=False).ppl == pytest.approx(
        ref
    )
    # ... but windows are independent: the token before a window boundary is not a context for the next one
    ids3 = ids.copy()
    ids3[seqlen - 1] = (ids3[seqlen - 1] + 1) % V  # last token of window 0: only its own window changes
    r3 = perplexity(Bigram(table), torch.tensor(ids3), seqlen=seqlen, progress=False)
    assert r3.nll[1:] == pytest.approx(ref_nll[1:]) and r3.nll[0] != pytest.approx(ref_nll[0])


def test_uniform_model_has_ppl_equal_to_vocab():
    r = perplexity(Bigram(np.zeros((11, 11))), torch.arange(40) % 11, seqlen=8, progress=False)
    assert r.ppl == pytest.approx(11.0, rel=1e-6)


def test_shape_and_length_errors():
    m = Bigram(np.zeros((5, 5)))
    with pytest.raises(ValueError, match="got 7 tokens for seqlen=8"):
        perplexity(m, torch.arange(7) % 5, seqlen=8, progress=False)
    with pytest.raises(ValueError, match="one token stream"):
        perplexity(m, torch.zeros(2, 9, dtype=torch.long), seqlen=3, progress=False)
    r = perplexity(m, torch.zeros(1, 9, dtype=torch.long), seqlen=3, progress=False, max_windows=2)
    assert r.n_windows == 2


def test_progress_callback_and_cancel_check():
    """A dashboard's perplexity: the same number, progress as a fraction after each batch, and a check()
    before each batch whose exception cancels the evaluation (the model's mode is put back)."""
    rng = np.random.default_rng(1)
    table, ids = rng.normal(size=(7, 7)), torch.tensor(rng.integers(0, 7, size=5 * 4))
    fractions, calls = [], []
    r = perplexity(Bigram(table), ids, seqlen=4, batch_size=2, progress=fractions.append,
                   check=lambda: calls.append(1))
    assert r.ppl == pytest.approx(manual_ppl(table, ids.numpy(), 4)[0], rel=1e-5)
    assert fractions == [0.4, 0.8, 1.0] and len(calls) == 3

    def cancel_second():
        if calls:
            raise KeyboardInterrupt
        calls.append(1)

    calls.clear()
    m = Bigram(table).train()
    with pytest.raises(KeyboardInterrupt):
        perplexity(m, ids, seqlen=4, batch_size=2, progress=False, check=cancel_second)
    assert m.training


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_layer_output_mse(lib):
    rng = np.random.default_rng(1)
    W, X = rng.normal(size=(6, 4)), rng.normal(size=(2, 10, 4))
    Q = np.round(W * 2) / 2
    ref = ((X.reshape(-1, 4) @ W.T - X.reshape(-1, 4) @ Q.T) ** 2).sum()
    args = (W, Q, X) if lib == "numpy" else tuple(torch.tensor(a) for a in (W, Q, X))
    assert layer_output_sse(*args) == pytest.approx(ref)
    assert layer_output_mse(*args) == pytest.approx(ref / (20 * 6))
    assert layer_output_mse(args[0], args[0], args[2]) == 0.0
    assert layer_relative_error(*args) == pytest.approx(ref / ((X.reshape(-1, 4) @ W.T) ** 2).sum())
    Xf = X.reshape(-1, 4)
    H = 2 / Xf.shape[0] * Xf.T @ Xf  # the reference code's Hessian scaling
    Hs = H if lib == "numpy" else torch.tensor(H)
    assert output_mse_from_hessian(args[0], args[1], Hs) == pytest.approx(ref / (20 * 6))
    with pytest.raises(ValueError, match="in_features"):
        layer_output_mse(args[0], args[1], args[2][..., :3])


@pytest.mark.parametrize("family", TINY_FAMILIES + EXTRA_LLAMA_LIKE)
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_logits_a_few_tokens_at_a_time(tiny_dirs, family, amp_dtype, monkeypatch):
    """For a supported family window_losses never makes a window's logits: the output embedding runs on
    at most head_tokens(vocab) tokens at a time (here 5 of 23 scored tokens per window), and the losses are
    the whole window's logits' cross-entropy."""
    model = load_model(str(tiny_dirs[family])).model
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), pe._autocast(torch.device("cpu"), amp_dtype):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    full = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)
    monkeypatch.setattr(pe, "HEAD_MIN_TOKENS", 5)
    monkeypatch.setattr(pe, "LOGITS_BYTES", 4 * VOCAB)  # one token's worth: the floor of 5 decides
    head = model.get_output_embeddings()
    rows = []
    handle = head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1]))
    try:
        losses = pe.window_losses(model, ids, amp_dtype)
    finally:
        handle.remove()
    assert rows == [(5,), (5,), (5,), (5,), (3,)] * 3
    tol = 1e-6 if amp_dtype is None else 1e-2
    torch.testing.assert_close(losses, full, atol=tol, rtol=tol)


def test_models_without_an_adapter_give_their_own_logits():
    """A model no family adapter describes (the bigram table here) is evaluated from its forward's logits:
    nothing is assumed about what its output embedding is."""
    assert pe._output_embeddings(Bigram(np.zeros((3, 3)))) is None


@pytest.mark.slow
def test_smollm2_perplexity_equals_hf_loss(smollm2):
    """Our windows + CE agree with transformers' own shifted LM loss, and the value is sane."""
    from gptq_explorer.data import evaluation_ids

    L = 128  # short windows: this test is about the protocol, not the number
    ids = evaluation_ids(smollm2.tokenizer, "prose", n_tokens=2 * L + 10)
    r = perplexity(smollm2.model, ids, seqlen=L, progress=False)
    with torch.no_grad():
        win = [ids[i * L : (i + 1) * L][None] for i in range(2)]
        hf = [smollm2.model(input_ids=w, labels=w).loss.item() for w in win]
    assert r.nll == pytest.approx(hf, rel=1e-4)
    assert r.ppl == pytest.approx(math.exp(sum(hf) / 2), rel=1e-4)
    assert 5 < r.ppl < 60 and r.tokens_dropped == 10
