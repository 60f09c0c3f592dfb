"""The child side of tests/test_engine_methods_anchors.py: GPTQModel's own code on the parent's inputs.

Run with the python of ``.venv-outside`` (GPTQModel 7.6.0), never by pytest itself:

    .venv-outside/bin/python tests/outside_anchors.py IN.npz OUT.npz

IN.npz holds ``cases``, a JSON list of {"name", "kind", **params}, and each case's arrays as
``<name>__<array>``. OUT.npz holds the answers the same way, plus ``meta`` (JSON: versions, seconds).
Importing gptqmodel takes ~10 s, so the parent batches every case into one run. This file imports only
numpy, torch and gptqmodel (not our package): what comes back is GPTQModel's arithmetic alone.

Kinds (what GPTQModel code answers; the parent compares our engine with it):

* ``gptaq``: ``GPTAQ.quantize(blocksize)`` on an nn.Linear with weight W, given H and dXXT directly (set
  as the object's accumulated statistics, in float32 as GPTQModel keeps them), so both engines start
  from the very same matrices. Params: bits, group_size, sym, damp, desc_act, static_groups, alpha,
  blocksize, and optionally mse (the grid search's norm). Returns Q (fake-quantized, d_out x d_in), scale
  and zero (d_out x n_groups), g_idx.
* ``gptaq_stats``: ``GPTAQ.process_batch`` on inputs X and the full-precision model's inputs X_fp, fed
  one token per batch row so that its sample count is the token count (it counts batch rows). Returns
  H and dXXT.
* ``quantizer``: ``Quantizer.find_params(weight=True)`` with ``perchannel=True`` and the config's
  ``mse`` norm, group by group. Params: bits, sym, mse, group_size. Returns scale and zero (d_out x
  n_groups) and Q (each group through ``Quantizer.quantize``).
* ``gar``: group-aware reordering, composed as ``GPTQ.quantize`` composes it: ``compute_local_perms``
  (with its values), ``compute_global_perm`` (max metric, from those values), ``compose_final_perm``,
  ``extend_perm_with_tail``. Input diag (what GPTQ.quantize reads: diag(H) after the dead-column fix).
  Returns perm (final), local (full groups x group_size), global.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def _named_linear(W, name="anchor"):
    import torch
    from gptqmodel.looper.named_module import NamedModule

    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.as_tensor(W, dtype=torch.float32))
    return NamedModule(lin, name=name, full_name=f"model.layers.0.{name}", layer_index=0)


def _qcfg(case, **extra):
    from gptqmodel.quantization.config import QuantizeConfig

    return QuantizeConfig(
        bits=case["bits"],
        group_size=case["group_size"],
        sym=case["sym"],
        desc_act=case.get("desc_act", False),
        static_groups=case.get("static_groups", False),
        damp_percent=case.get("damp", 0.01),
        mse=float(case.get("mse", 0.0)),  # > 0: the Quantizer's shrink search with this norm
        act_group_aware=False,  # GPTQModel turns GAR on by default for GPTQ; the gar cases call it directly
        offload_to_disk=False,
        **extra,
    )


def _gptaq(case, W, native_inputs=()):
    from gptqmodel.looper.native_processor import NATIVE_INPUTS_STATE_KEY
    from gptqmodel.quantization.config import GPTAQConfig
    from gptqmodel.quantization.gptaq import GPTAQ

    module = _named_linear(W)
    module.state[NATIVE_INPUTS_STATE_KEY] = list(native_inputs)  # GPTAQ.__init__ pops it
    task = GPTAQ(module, _qcfg(case, gptaq=GPTAQConfig(alpha=case.get("alpha", 0.25), device="cpu")))
    task.quantizer.configure(perchannel=True)  # what GPTQProcessor does after building the task
    return task


def run_gptaq(case, arrays):
    import torch

    task = _gptaq(case, arrays["W"])
    # The statistics process_batch would have accumulated; nsamples only scales the reported loss.
    task.H = torch.as_tensor(arrays["H"], dtype=torch.float32).clone()
    task.dXXT = torch.as_tensor(arrays["dXXT"], dtype=torch.float32).clone()
    task.nsamples = int(case.get("nsamples", 1))
    Q, scale, zero, g_idx, *_ = task.quantize(blocksize=case["blocksize"])
    return {"Q": Q.numpy(), "scale": scale.numpy(), "zero": zero.numpy(), "g_idx": g_idx.numpy()}


def run_gptaq_stats(case, arrays):
    import torch

    X = torch.as_tensor(arrays["X"], dtype=torch.float32)
    X_fp = torch.as_tensor(arrays["X_fp"], dtype=torch.float32)
    d_in = X.shape[1]
    W = np.zeros((1, d_in), dtype=np.float32)
    # (tokens, 1, d_in): process_batch counts inp.shape[0] as samples, so this makes n = tokens
    task = _gptaq(case | {"bits": 4, "group_size": -1, "sym": True}, W, [X_fp.reshape(-1, 1, d_in)])
    task.process_batch(X.reshape(-1, 1, d_in))
    return {"H": task.H.numpy(), "dXXT": task.dXXT.numpy(), "nsamples": np.array(task.nsamples)}


def run_quantizer(case, arrays):
    import torch
    from gptqmodel.quantization.quantizer import Quantizer

    W = torch.as_tensor(arrays["W"], dtype=torch.float32)
    width = W.shape[1] if case["group_size"] == -1 else case["group_size"]
    quantizer = Quantizer(qcfg=_qcfg(case), name="anchor")
    quantizer.configure(perchannel=True)
    scales, zeros, Q = [], [], torch.empty_like(W)
    for s in range(0, W.shape[1], width):
        quantizer.find_params(W[:, s : s + width], weight=True)
        scales.append(quantizer.scale.clone())
        zeros.append(quantizer.zero.clone())
        Q[:, s : s + width] = quantizer.quantize(W[:, s : s + width])
    return {"scale": torch.cat(scales, 1).numpy(), "zero": torch.cat(zeros, 1).numpy(), "Q": Q.numpy()}


def run_gar(case, arrays):
    import torch
    from gptqmodel.quantization.gar import (
        compose_final_perm,
        compute_global_perm,
        compute_local_perms,
        extend_perm_with_tail,
    )

    diag = torch.as_tensor(arrays["diag"], dtype=torch.float32)
    g = case["group_size"]
    local, values = compute_local_perms(diag, g, return_values=True)
    glob = compute_global_perm(diag, g, precomputed_values=values)
    perm = extend_perm_with_tail(compose_final_perm(local, glob, g), diag.numel())
    return {"perm": perm.numpy(), "local": local.numpy(), "global": glob.numpy()}


RUNNERS = {"gptaq": run_gptaq, "gptaq_stats": run_gptaq_stats, "quantizer": run_quantizer, "gar": run_gar}


def main(argv: list[str]) -> int:
    src, dst = argv[1], argv[2]
    import torch

    torch.set_num_threads(int(os.environ.get("GPTQ_EXPLORER_THREADS", "2")))
    t0 = time.perf_counter()
    import gptqmodel

    t_import = time.perf_counter() - t0
    data = np.load(src)
    cases = json.loads(str(data["cases"]))
    out, seconds = {}, {}
    for case in cases:
        name = case["name"]
        prefix = f"{name}__"
        arrays = {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}
        t = time.perf_counter()
        with torch.inference_mode():
            result = RUNNERS[case["kind"]](case, arrays)
        seconds[name] = round(time.perf_counter() - t, 3)
        out |= {f"{prefix}{k}": np.asarray(v) for k, v in result.items()}
    meta = {
        "gptqmodel": gptqmodel.__version__,
        "torch": torch.__version__,
        "import_s": round(t_import, 1),
        "cases_s": seconds,
    }
    np.savez(dst, meta=np.array(json.dumps(meta)), **out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
