"""The check of lesson 7: perplexity from the per-window losses.

The engine's answer is metrics.perplexity_eval.perplexity itself, run on a tiny stand-in language model (a
random bigram table: the next token's logits depend on the current token only), so the losses the learner
gets are the per-window mean cross-entropies of the package's own evaluation loop, and the answer is its
`ppl`. torch is imported on the first call only.
"""

from __future__ import annotations

import math
from functools import cache
from types import SimpleNamespace

import numpy as np

from ._core import Case, Exercise, Mistake, Result, fmt, run, to_number


def _bigram_model(vocab: int, seed: int, temperature: float):
    import torch

    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(vocab, vocab)
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                self.table.weight.copy_(torch.randn(vocab, vocab, generator=g) * temperature)

        def get_output_embeddings(self):
            return self.table

        def forward(self, input_ids, use_cache=False):
            return SimpleNamespace(logits=self.table(input_ids))

    return Bigram()


@cache
def _ppl_cases() -> tuple[Case, ...]:
    import torch

    from ..metrics.perplexity_eval import perplexity

    out = []
    for label, vocab, seed, temperature, n_tokens, seqlen in (
        ("4 windows of 16 tokens", 11, 0, 1.5, 64, 16),
        ("one window", 7, 1, 1.0, 20, 20),
        ("6 windows, very unequal losses (and a tail that is dropped)", 13, 2, 4.0, 6 * 12 + 5, 12),
    ):
        model = _bigram_model(vocab, seed, temperature)
        ids = torch.randint(0, vocab, (n_tokens,), generator=torch.Generator().manual_seed(seed + 10))
        res = perplexity(model, ids, seqlen=seqlen, progress=False)
        nll = np.asarray(res.nll, dtype=np.float64)
        out.append(Case(label, (nll,), f"{len(nll)} window{'s' if len(nll) > 1 else ''}, mean NLL "
                                       f"{fmt(nll.mean())}", float(res.ppl)))
    return tuple(out)


def _of_nll(f):
    def expect(case: Case):
        return float(f(case.args[0]))
    return expect


_PPL_MISTAKES = [
    Mistake("mean_of_exp",
            "You averaged the windows' perplexities, mean(exp(nll)). Perplexity is the exponential of the "
            "mean loss, exp(mean(nll)); the mean of exponentials is larger, and the worst windows dominate "
            "it.",
            expect=_of_nll(lambda nll: np.mean(np.exp(nll)))),
    Mistake("exp_of_sum",
            "You took exp of the sum of the losses; take exp of their mean: exp(mean(nll)).",
            expect=_of_nll(lambda nll: math.exp(float(np.sum(nll))))),
    Mistake("no_exp",
            "That is the mean loss (cross-entropy, in nats per token); perplexity is its exponential, "
            "exp(mean(nll)).",
            expect=_of_nll(np.mean)),
    Mistake("base_2",
            "You raised 2 to the mean loss; the losses are in nats (natural log), so perplexity = "
            "exp(mean(nll)).",
            expect=_of_nll(lambda nll: 2.0 ** np.mean(nll))),
]


def check_perplexity(fn) -> Result:
    """fn(nll) -> perplexity, nll being the per-window mean next-token losses (nats per token) of the paper's
    protocol; the answer is metrics.perplexity_eval.perplexity's: exp(mean(nll))."""
    cases = list(_ppl_cases())
    return run(Exercise(
        "check_perplexity", cases, lambda raw, case: to_number(raw, "the perplexity"),
        lambda got, expected, case: bool(np.isfinite(got)) and math.isclose(got, expected, rel_tol=1e-6),
        lambda got, expected, case: ("wrong_values",
                                     f"your perplexity is {fmt(got)}, expected {fmt(expected)}"),
        _PPL_MISTAKES,
        f"Your perplexity equals the package's evaluation loop on all {len(cases)} cases."), fn)



MISTAKES = {"check_perplexity": _PPL_MISTAKES}
