"""Perplexity with the GPTQ paper's protocol (opt_eval / llama_eval in the reference code).

The token stream is cut into non-overlapping windows of `seqlen`; the trailing N % seqlen tokens are
dropped; each window starts with a fresh context (no sliding, no stride). Per window the loss is the mean
cross-entropy of the seqlen-1 next-token predictions (the first token is never scored), and

    PPL = exp(mean over windows of the per-window mean CE)

(the paper writes it as exp(sum(loss_i * seqlen) / (n_windows * seqlen)): the same number).
llama.cpp / AutoGPTQ-style perplexities (BOS-replaced first token, only the second half of each window
scored) are NOT comparable with this.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..models.adapters import UnsupportedModelError, get_adapter, head_inputs


@dataclass
class PerplexityResult:
    ppl: float
    n_windows: int
    n_tokens: int  # tokens in the evaluated windows (n_windows * seqlen)
    seqlen: int
    nll: list[float] = field(
        default_factory=list
    )  # per-window mean CE (nats/token); paper's nll = this * seqlen
    tokens_dropped: int = 0  # the tail shorter than one window
    seconds: float = 0.0
    dtype: str = "float32"  # the compute dtype of the forward passes

    @property
    def mean_nll(self) -> float:
        return sum(self.nll) / len(self.nll)


def _as_stream(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"ids must be one token stream, shape (N,) or (1, N); got {tuple(ids.shape)}")
    return ids


def _auto_batch(seqlen: int, vocab: int) -> int:
    # keep the float32 logits of one batch around 256 MB
    return max(1, min(16, (64 * 2**20) // max(1, seqlen * vocab)))


def _autocast(device: torch.device, amp_dtype):
    if amp_dtype is None or amp_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


# Tokens per product of the vocabulary projection: their logits and log-softmax (tokens x vocab floats
# each) take LOGITS_BYTES, tens of MB whatever the window and the vocabulary, where a whole window's take
# hundreds (800 MB for SmolLM2's 2048-token windows). 256 SmolLM2 tokens (48 MB) ran fastest of 128-512
# at two threads, about as fast as the whole window (docs/performance.md); never fewer than
# HEAD_MIN_TOKENS, whose products would run slower.
LOGITS_BYTES = 48 * 2**20
HEAD_MIN_TOKENS = 64


def head_tokens(vocab: int) -> int:
    return max(HEAD_MIN_TOKENS, LOGITS_BYTES // (4 * vocab))


def _output_embeddings(model):
    """The module whose output is the model's logits, as is, where a family adapter says where things are
    (every supported family: no scaling or capping after it); None for any other model, whose logits come
    from its own forward."""
    try:
        get_adapter(model)
    except UnsupportedModelError:
        return None
    return model.get_output_embeddings()


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, amp_dtype=None) -> torch.Tensor:
    """Per-window mean next-token CE for a batch of windows (batch, seqlen); float32 on the CPU.

    For a supported family the forward pass stops at the output embedding (models.head_inputs), which then
    makes the logits a few tokens at a time (head_tokens): the same numbers as the whole window's logits,
    without two window-sized tensors (seqlen x vocab floats, 400 MB for SmolLM2 at 2048 tokens)."""
    device = next(model.parameters()).device
    windows = windows.to(device)
    targets = windows[:, 1:]
    head = _output_embeddings(model)
    if head is None:
        with _autocast(device, amp_dtype):
            logits = model(input_ids=windows, use_cache=False).logits
        logits = logits[:, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        return ce.view(targets.shape).mean(dim=1).cpu()
    with _autocast(device, amp_dtype):
        hidden = head_inputs(model, windows)
    ce = torch.empty(targets.shape, device=device)
    step = head_tokens(head.weight.shape[0])
    for b in range(targets.shape[0]):
        for a in range(0, targets.shape[1], step):
            e = min(a + step, targets.shape[1])
            with _autocast(device, amp_dtype):
                logits = head(hidden[b, a:e])
            ce[b, a:e] = F.cross_entropy(logits.float(), targets[b, a:e], reduction="none")
    return ce.mean(dim=1).cpu()


@torch.no_grad()
def perplexity(
    model,
    ids,
    seqlen: int = 2048,
    batch_size: int | None = None,
    progress: bool | Callable[[float], None] = True,
    device=None,
    amp_dtype: torch.dtype | None = None,
    max_windows: int | None = None,
    desc: str = "perplexity",
    check: Callable[[], None] | None = None,
) -> PerplexityResult:
    """Perplexity of a causal LM on a token stream with the paper's protocol (see the module doc).

    ids: 1-D LongTensor (or (1, N)). batch_size: windows per forward pass (None: as many as would keep one
    batch's whole logits near 256 MB; a supported family's are made a slice at a time, see window_losses).
    device: move the model there for the evaluation (and back after).
    amp_dtype: e.g. torch.bfloat16 to run the forward passes under autocast (the loss stays float32).
    max_windows: evaluate only the first windows (quick looks).
    progress: True = a tqdm bar (`desc`), False = nothing, or a callable given the fraction of windows done
    after each batch (a dashboard's progress bar).
    check: called before each batch; raise from it to cancel (the exception propagates, the model is put
    back where it was).
    """
    ids = _as_stream(ids)
    n = ids.numel()
    n_windows = n // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(
            f"perplexity needs at least one window: got {n} tokens for seqlen={seqlen}. "
            "Give more evaluation tokens or a shorter seqlen."
        )
    home = next(model.parameters()).device
    moved = device is not None and torch.device(device) != home
    if moved:
        model.to(device)
    was_training = model.training
    model.eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    bs = batch_size or _auto_batch(seqlen, vocab)
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)

    from tqdm.auto import tqdm

    report = progress if callable(progress) else None
    losses: list[float] = []
    t0 = time.perf_counter()
    try:
        with tqdm(total=n_windows, desc=desc, unit="win", disable=progress is not True, leave=False) as bar:
            for i in range(0, n_windows, bs):
                if check is not None:
                    check()
                losses += window_losses(model, windows[i : i + bs], amp_dtype).tolist()
                bar.update(min(bs, n_windows - i))
                bar.set_postfix(ppl=f"{math.exp(sum(losses) / len(losses)):.3f}")
                if report is not None:
                    report(len(losses) / n_windows)
    finally:
        model.train(was_training)
        if moved:
            model.to(home)
    return PerplexityResult(
        ppl=math.exp(sum(losses) / len(losses)),
        n_windows=n_windows,
        n_tokens=n_windows * seqlen,
        seqlen=seqlen,
        nll=losses,
        tokens_dropped=n - n_windows * seqlen,
        seconds=time.perf_counter() - t0,
        dtype=str(amp_dtype or torch.float32).replace("torch.", ""),
    )
