"""Per-layer output error: what GPTQ minimises, ||X W^T - X Q^T||^2, reported per element.

W, Q: (out, in) weights (original and quantized); X: (tokens, in) or (..., in) layer inputs.
Works for NumPy arrays and torch tensors (the result is a Python float). Computed as X (W - Q)^T so the
difference is formed before the matmul (no cancellation between two large products).
"""

from __future__ import annotations

import numpy as np

from ..lazy_torch import is_tensor


def _is_torch(*xs) -> bool:
    return any(is_tensor(x) for x in xs)


def _prep(W, Q, X):
    if _is_torch(W, Q, X):
        import torch

        W, Q, X = (torch.as_tensor(a) for a in (W, Q, X))
        dt = torch.float64 if torch.float64 in (W.dtype, Q.dtype, X.dtype) else torch.float32
        dev = W.device
        W, Q, X = W.to(dev, dt), Q.to(dev, dt), X.to(dev, dt)
    else:
        W, Q, X = (np.asarray(a, dtype=np.float64) for a in (W, Q, X))
    if W.shape != Q.shape or W.ndim != 2:
        raise ValueError(
            f"W and Q must be the same (out, in) shape; got {tuple(W.shape)} and {tuple(Q.shape)}"
        )
    if X.shape[-1] != W.shape[1]:
        raise ValueError(f"X's last dimension ({X.shape[-1]}) must equal in_features ({W.shape[1]})")
    return W, Q, X.reshape(-1, X.shape[-1])


def layer_output_sse(W, Q, X) -> float:
    """||X W^T - X Q^T||^2 (sum of squared output errors)."""
    W, Q, X = _prep(W, Q, X)
    E = X @ (W - Q).T
    return float((E * E).sum())


def layer_output_mse(W, Q, X) -> float:
    """||X W^T - X Q^T||^2 / numel(X W^T): mean squared error per output element."""
    W, Q, X = _prep(W, Q, X)
    E = X @ (W - Q).T
    return float((E * E).sum()) / (X.shape[0] * W.shape[0])


def layer_relative_error(W, Q, X) -> float:
    """||X W^T - X Q^T||^2 / ||X W^T||^2 (0 = exact; scale-free, comparable across layers)."""
    W, Q, X = _prep(W, Q, X)
    E, Y = X @ (W - Q).T, X @ W.T
    den = float((Y * Y).sum())
    return float((E * E).sum()) / den if den > 0 else 0.0


def output_mse_from_hessian(W, Q, H, hessian_scale: float = 2.0) -> float:
    """The same MSE from a Hessian instead of the inputs: if H = hessian_scale * mean_t x_t x_t^T (the
    reference code accumulates H = 2/n sum x x^T), then ||X D^T||^2 / (n * out) = tr(D H D^T) / (scale * out)
    with D = W - Q. Saves keeping X around."""
    if _is_torch(W, Q, H):
        import torch

        W, Q, H = (torch.as_tensor(a).to(torch.float64) for a in (W, Q, H))
        D = W - Q.to(W.device)
        return float(((D @ H.to(W.device)) * D).sum()) / (hessian_scale * W.shape[0])
    W, Q, H = (np.asarray(a, dtype=np.float64) for a in (W, Q, H))
    D = W - Q
    return float(((D @ H) * D).sum()) / (hessian_scale * W.shape[0])


def heldout_layer_errors(
    quantized_model,
    original_model,
    ids,
    seqlen: int = 512,
    batch_size: int = 1,
    max_windows=None,
    progress=True,
) -> dict[str, dict]:
    """Per-layer output error on held-out tokens, the out-of-sample twin of the calibration-side
    `output_mse` in quantize_model's report.

    The quantized model runs on non-overlapping windows of `ids`; at every quantized linear its input x
    (produced by the quantized layers upstream, exactly as during sequential GPTQ) gives
    ||x W^T - x Q^T||^2 with W from original_model and Q from quantized_model. Returns
    {module path: {"output_mse": ..., "output_rel_error": ..., "tokens": ...}}.
    """
    import torch
    from tqdm.auto import tqdm

    from gptq_explorer.models.adapters import get_weight, quantizable_modules
    from gptq_explorer.models.capture import hooks

    with torch.no_grad():  # forward passes only: no autograd graph
        qmods = quantizable_modules(quantized_model)
        omods = dict(original_model.named_modules())
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        n_windows = ids.numel() // seqlen if max_windows is None else min(ids.numel() // seqlen, max_windows)
        if n_windows < 1:
            raise ValueError(f"need at least one window: got {ids.numel()} tokens for seqlen={seqlen}")
        acc = {n: [0.0, 0.0, 0] for n in qmods}  # sum squared error, sum squared reference output, tokens
        diff = {n: (get_weight(omods[n]).float() - get_weight(m).float()) for n, m in qmods.items()}
        ref = {n: get_weight(omods[n]).float() for n in qmods}

        def measure(call):
            x = call.input.reshape(-1, call.input.shape[-1]).float()
            D, W = diff[call.name].to(x.device), ref[call.name].to(x.device)
            e, y = x @ D.T, x @ W.T
            a = acc[call.name]
            a[0] += float((e * e).sum())
            a[1] += float((y * y).sum())
            a[2] += x.shape[0]

        dev = next(quantized_model.parameters()).device
        windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
        with hooks(qmods, measure):
            for i in tqdm(range(0, n_windows, batch_size), desc="held-out layer error", disable=not progress):
                quantized_model(input_ids=windows[i : i + batch_size].to(dev), use_cache=False)
        out = {}
        for n, (sse, ssy, t) in acc.items():
            rows = diff[n].shape[0]
            out[n] = {
                "output_mse": sse / (t * rows),
                "output_rel_error": sse / ssy if ssy > 0 else 0.0,
                "tokens": t,
            }
        return out
