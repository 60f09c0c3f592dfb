"""metrics.logged_loss: the loss each GPTQ implementation logs, against the layer's relative output error.

The identity behind it (sum of OBS losses = 1/2 tr(dW (H + lambda I) dW^T)) is checked on our engine, on
the paper's reference loop (its H divides by sequences) and, where .venv-outside exists, on GPTQModel 7.6's
own GPTQ.quantize and the `avg_loss` it logs.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gptq_explorer.engine import Hessian, QuantConfig, gptq_quantize
from gptq_explorer.engine.reference import reference_fasterquant
from gptq_explorer.metrics.layer_error import layer_relative_error
from gptq_explorer.metrics.logged_loss import logged_loss, obs_loss, relative_error_from_logged
from gptq_explorer.services.layer_source import SyntheticSource

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE_PYTHON = ROOT / os.environ.get("GPTQ_EXPLORER_OUTSIDE_VENV", ".venv-outside") / "bin" / "python"
SEQLEN = 64  # the synthetic tokens cut into sequences, for the paper's per-sequence H


@pytest.fixture(scope="module")
def case():
    """A 32 x 96 synthetic layer whose input 5 is dead (always 0 in calibration)."""
    data = SyntheticSource(d_out=32, d_in=96, n_calib=512, n_heldout=64, seed=7, rank=24).load()
    X = np.array(data.X_calib, dtype=np.float64)
    X[:, 5] = 0.0
    h = Hessian(X.shape[1])
    h.add_batch(X)
    return np.array(data.W, dtype=np.float64), X, h.H


CONFIGS = [QuantConfig(bits=4, group_size=32), QuantConfig(bits=3, group_size=-1, desc_act=True),
           QuantConfig(bits=2, group_size=32, sym=False, damp_percent=0.1)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label())
def test_engine_loss_is_the_damped_quadratic_form(case, cfg):
    W, X, H = case
    res = gptq_quantize(W, H, cfg)
    assert res.dead_columns[5] and res.dead_columns.sum() == 1
    np.testing.assert_allclose(res.loss, obs_loss(W, res.weight, H, res.damp_percent_used), rtol=1e-9)
    # and from it, the relative output error on the calibration tokens, exactly
    n = X.shape[0]
    rel = layer_relative_error(W, res.weight, X)
    for by, logged in (("explorer", res.loss), ("gptqmodel", res.loss / n)):
        np.testing.assert_allclose(relative_error_from_logged(logged, W, res.weight, H, res.damp_percent_used,
                                                              n_tokens=n, by=by), rel, rtol=1e-9)
    np.testing.assert_allclose(logged_loss(W, res.weight, H, cfg.damp_percent, n_tokens=n), res.loss / n,
                               rtol=1e-9)
    # without the damping term the loss overstates the output error (it is an upper bound)
    assert 2 * res.loss / float(((W @ H) * W).sum()) > rel


def test_paper_reference_error_divides_h_by_sequences(case):
    """The reference loop's `error` (sum of its Losses) with its H = 2/n_seq sum x x^T is n_tok/n_seq (the
    sequence length) times ours; converted back it gives the same relative output error."""
    W, X, H = case
    n_tok = X.shape[0]
    n_seq = n_tok // SEQLEN
    H_paper = H * n_tok / n_seq
    Q, losses = reference_fasterquant(W, np.array(H_paper), bits=4, groupsize=32, sym=True, percdamp=0.01,
                                      dtype=torch.float64)
    Q, error = Q.numpy(), float(losses.sum())
    ours = obs_loss(W, Q, H, 0.01)
    # not exactly: the dead input's diagonal becomes 1 in either scale, so lambda differs by about 1e-5
    np.testing.assert_allclose(error, ours * SEQLEN, rtol=1e-4)
    np.testing.assert_allclose(error, obs_loss(W, Q, H_paper, 0.01), rtol=1e-9)
    np.testing.assert_allclose(relative_error_from_logged(error, W, Q, H, 0.01, n_tokens=n_tok, by="paper",
                                                          n_sequences=n_seq),
                               layer_relative_error(W, Q, X), rtol=1e-4)


def test_bad_logger_is_refused(case):
    W, X, H = case
    with pytest.raises(ValueError, match="by must be one of"):
        relative_error_from_logged(1.0, W, W, H, 0.01, n_tokens=X.shape[0], by="autogptq")
    with pytest.raises(ValueError, match="n_sequences"):
        logged_loss(W, W, H, 0.01, n_tokens=X.shape[0], by="paper")


# GPTQModel's own loop, in its own environment (importing gptqmodel takes ~10 s)
CHILD = """
import json, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[3])
from outside_anchors import _named_linear, _qcfg
from gptqmodel.quantization.gptq import GPTQ
d = np.load(sys.argv[1])
out = {}
for name, case in json.loads(str(d["cases"])).items():
    task = GPTQ(_named_linear(d["W"]), _qcfg(case))
    task.quantizer.configure(perchannel=True)  # as GPTQProcessor does after building the task
    task.H = torch.as_tensor(d["H"], dtype=torch.float32).clone()
    task.nsamples = int(d["n"])  # GPTQModel 7.6 counts tokens
    with torch.inference_mode():
        Q, _s, _z, _g, _t, avg_loss, damp, _n = task.quantize(blocksize=128)
    out[name + "__Q"] = Q.numpy()
    out[name + "__loss"] = np.array(float(avg_loss))
    out[name + "__damp"] = np.array(float(damp))
np.savez(sys.argv[2], **out)
"""


def test_gptqmodel_avg_loss_converts_to_the_relative_error(case, tmp_path):
    if not OUTSIDE_PYTHON.exists():
        if os.environ.get("GPTQ_EXPLORER_REQUIRE_OUTSIDE") == "1":
            pytest.fail(f"no outside environment at {OUTSIDE_PYTHON.parent.parent}")
        pytest.skip(f"no outside environment at {OUTSIDE_PYTHON.parent.parent} "
                    "(scripts/outside_loader_env.sh)")
    W, X, H = case
    n = X.shape[0]
    cases = {"g32": {"bits": 4, "group_size": 32, "sym": True},
             "row-act": {"bits": 3, "group_size": -1, "sym": True, "desc_act": True}}
    np.savez(tmp_path / "in.npz", W=W.astype(np.float32), H=H.astype(np.float32), n=np.array(n),
             cases=np.array(json.dumps(cases)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(OUTSIDE_PYTHON), "-c", CHILD, str(tmp_path / "in.npz"), str(tmp_path / "out.npz"),
            str(ROOT / "tests")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    for name in cases:
        Q, logged, damp = out[f"{name}__Q"].astype(np.float64), float(out[f"{name}__loss"]), float(
            out[f"{name}__damp"])
        # what it logged is 1/2 tr(dW (H + lambda I) dW^T) / n_tokens (float32 arithmetic on its side)
        np.testing.assert_allclose(logged, logged_loss(W, Q, H, damp, n_tokens=n), rtol=1e-4)
        np.testing.assert_allclose(relative_error_from_logged(logged, W, Q, H, damp, n_tokens=n),
                                   layer_relative_error(W, Q, X), rtol=1e-3)
