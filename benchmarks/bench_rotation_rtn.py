"""Why the Hadamard rotation makes RTN worse on SmolLM2-135M (3-bit g128 sym), layer by layer.

    python benchmarks/bench_rotation_rtn.py                     # every block, the per-kind table (~3-5 min)
    python benchmarks/bench_rotation_rtn.py --blocks 0,15,29 --per-layer
    python benchmarks/bench_rotation_rtn.py --ablation          # + whole-model RTN perplexities (~15 min)

The method table (docs/methods.md) has RTN 3-bit g128 at prose perplexity 151 and RTN with the rotation at
290, while the rotation is GPTQ's best single method. This script measures, for every linear of the chosen
blocks, RTN's error with and without the rotation (seed 0) on the full-precision model's calibration
inputs (32 x 512 prose windows, seed 0, as bench_methods.py), with diagnostics for the page's hypothesis:

  out, out_r    RTN's output error tr(D H D^T) / tr(W H W^T), D = W - Q (Q in the original basis), without
                and with the rotation; x = out_r / out
  w_x           the same ratio for the weight error ||D||^2 / ||W||^2
  max/rms       median over rows and groups of 128 of max|w| / rms(w), of W and of W R^T
  kurt          the same medians of the groups' kurtosis (3 for a Gaussian)
  H1%           the share of tr(H) in H's top 1% eigendirections (k = d_in / 100)
  e1%, e1%_r    the share of the output error in those directions, without and with the rotation (an error
                spread evenly over all directions has e1% = H1%)
  top_x, rest_x how the rotation changes the output error in those directions and in all the others
  ch_w          the rms of W on the top 1% inputs by diag(H) (the outlier channels), over W's rms
  ch_0          the share of those weights that plain RTN rounds to 0
  ch_e, ch_e_r  the error per weight on those inputs over the layer's mean error per weight (plain RTN's)
  tok0, tok0_r  the share of the output error on each window's first token (1/512 of the tokens)
  g_out, g_x    GPTQ's output error (same grid, the layer's own H) and how the rotation changes it
  g_e1, g_e1_r  the share of GPTQ's output error in H's top 1% eigendirections, without and with rotation

--ablation quantizes the whole model with RTN and the rotation on all linears, on none, on every linear
but v_proj and on v_proj alone, and measures perplexity as the method table does (16,384 tokens per corpus,
windows of 512): the first two rows repeat the table's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"]
# the linears that share an input (and so a Hessian) with the one named first
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}
NSAMPLES, SEQLEN, SEED = 32, 512, 0
GROUP = 128


def configs():
    from gptq_explorer.engine import QuantConfig

    plain = QuantConfig(bits=3, group_size=GROUP, sym=True)
    return plain, plain.replace(rotation="hadamard")


def group_stats(W: np.ndarray) -> tuple[float, float]:
    """Medians over rows and groups of max|w| / rms(w) and of the kurtosis."""
    ratios, kurts = [], []
    for s in range(0, W.shape[1], GROUP):
        G = W[:, s : s + GROUP]
        ratios.append(np.abs(G).max(axis=1) / np.sqrt((G**2).mean(axis=1)))
        c = G - G.mean(axis=1, keepdims=True)
        kurts.append((c**4).mean(axis=1) / (c**2).mean(axis=1) ** 2)
    return float(np.median(np.concatenate(ratios))), float(np.median(np.concatenate(kurts)))


def rtn_errors(W: np.ndarray) -> dict:
    """D = W - Q for plain and rotated RTN (Q in the original basis), plain RTN's codes and its zero code."""
    from gptq_explorer.engine import rtn_quantize

    plain, rotated = configs()
    a, b = rtn_quantize(W, plain), rtn_quantize(W, rotated)
    return {"D": W - a.weight, "D_r": W - b.weight, "codes": np.asarray(a.codes), "zero": plain.maxq // 2 + 1}


def gptq_errors(W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """D = W - Q for plain and rotated GPTQ on the same grid (torch engine, float64)."""
    import torch

    from gptq_explorer.engine import gptq_quantize

    return tuple(W - np.asarray(gptq_quantize(W, H, c, backend="torch", dtype=torch.float64).weight)
                 for c in configs())


def collect(blocks: list[int], kinds: list[str]) -> dict:
    """One forward pass of the full-precision model over the calibration windows. Per linear: W (float64),
    its Hessian (one per input: q/k/v and gate/up share theirs), its inputs on each window's first token."""
    import torch

    from gptq_explorer.data import calibration_windows
    from gptq_explorer.engine import Hessian
    from gptq_explorer.models import load_model
    from gptq_explorer.models.capture import hooks, run_until_stopped

    torch.set_num_threads(1)
    lm = load_model()
    adapter = lm.adapter
    all_blocks = adapter.get_blocks(lm.model)
    ids = calibration_windows(lm.tokenizer, "prose", NSAMPLES, SEQLEN, SEED)
    modules, hessians, owner, first = {}, {}, {}, {}
    for b in blocks:
        linears = adapter.linears(all_blocks[b])
        for kind in kinds:
            modules[(b, kind)] = linears[kind]
            first[(b, kind)] = []
            source = (b, SHARED_INPUT.get(kind, kind))
            if source not in hessians:  # the first selected linear of an input feeds its Hessian
                hessians[source] = Hessian(linears[kind].in_features, backend="torch")
                owner[(b, kind)] = source

    def record(call) -> None:
        x = call.input.detach().reshape(-1, call.input.shape[-1]).to(torch.float32)
        if call.name in owner:
            hessians[owner[call.name]].add_batch(x)
        first[call.name].append(x[::SEQLEN].double().numpy())  # each window's first token

    t0 = time.perf_counter()
    with hooks(modules, record):
        for s in range(0, NSAMPLES, 8):
            run_until_stopped(lm.model, input_ids=ids[s : s + 8], use_cache=False)
    print(f"forward pass and Hessians: {time.perf_counter() - t0:.0f} s", flush=True)
    layers = {}
    for (b, kind), module in modules.items():
        h = hessians[(b, SHARED_INPUT.get(kind, kind))]
        layers[(b, kind)] = {"W": module.weight.detach().to(torch.float64).numpy().copy(),
                             "H": np.asarray(h.H.cpu(), dtype=np.float64), "tokens": h.n_tokens,
                             "X0": np.concatenate(first[(b, kind)])}
    return layers


def diagnose(L: dict) -> dict:
    from gptq_explorer.engine.rotation import Rotation

    W, H = L["W"], L["H"]
    e = rtn_errors(W)
    D, D_r = e["D"], e["D_r"]
    G, G_r = gptq_errors(W, H)
    n = W.shape[1]
    k = max(1, n // 100)
    errors = (("p", D), ("r", D_r), ("gp", G), ("gr", G_r))
    out = {t: float(((E @ H) * E).sum()) for t, E in (*errors, ("w", W))}  # tr(E H E^T)
    lam, V = np.linalg.eigh(H)
    lam, V = lam[::-1], V[:, ::-1]
    top = {t: float((((E @ V[:, :k]) ** 2) * lam[:k]).sum()) for t, E in errors}
    ch = np.argsort(np.diag(H))[::-1][:k]
    mean_err = float((D**2).mean())
    r_plain, k_plain = group_stats(W)
    r_rot, k_rot = group_stats(Rotation(W.shape[1]).weight(W))
    # sum over tokens of ||D x||^2 = n/2 tr(D H D^T) (H = 2/n sum x x^T); the first tokens' part of it
    tok0 = {t: float(((L["X0"] @ E.T) ** 2).sum()) / (L["tokens"] / 2 * out[t])
            for t, E in (("p", D), ("r", D_r))}
    return {
        "out": out["p"] / out["w"], "out_r": out["r"] / out["w"], "x": out["r"] / out["p"],
        "w_x": float((D_r**2).sum() / (D**2).sum()),
        "ratio": r_plain, "ratio_r": r_rot, "kurt": k_plain, "kurt_r": k_rot,
        "H1": float(lam[:k].sum() / lam.sum()),
        "e1": top["p"] / out["p"], "e1_r": top["r"] / out["r"],
        "top_x": top["r"] / top["p"], "rest_x": (out["r"] - top["r"]) / (out["p"] - top["p"]),
        "ch_w": float(np.sqrt((W[:, ch] ** 2).mean() / (W**2).mean())),
        "ch_0": float((e["codes"][:, ch] == e["zero"]).mean()),
        "ch_e": float((D[:, ch] ** 2).mean()) / mean_err,
        "ch_e_r": float((D_r[:, ch] ** 2).mean()) / mean_err,
        "tok0": tok0["p"], "tok0_r": tok0["r"],
        "g_out": out["gp"] / out["w"], "g_x": out["gr"] / out["gp"],
        "g_e1": top["gp"] / out["gp"], "g_e1_r": top["gr"] / out["gr"],
    }


TWO_DIGITS = ("x", "w_x", "ratio", "ratio_r", "kurt", "kurt_r", "H1", "e1", "e1_r", "top_x", "rest_x", "ch_w",
              "ch_0", "ch_e", "ch_e_r")
COLUMNS = ([("out", "{:.4f}"), ("out_r", "{:.4f}")] + [(c, "{:.2f}") for c in TWO_DIGITS]
           + [("tok0", "{:.3f}"), ("tok0_r", "{:.3f}"), ("g_out", "{:.4f}"), ("g_x", "{:.2f}"),
              ("g_e1", "{:.2f}"), ("g_e1_r", "{:.2f}")])
HEAD = {"ratio": "max/rms", "ratio_r": "_r", "kurt_r": "_r"}


def row(label: str, d: dict, width: int) -> str:
    return f"{label:<{width}s} " + " ".join(f"{f.format(d[c]):>7s}" for c, f in COLUMNS)


def table(results: dict, per_layer: bool) -> None:
    width = 22

    def header(label: str) -> None:
        print(f"{label:<{width}s} " + " ".join(f"{HEAD.get(c, c):>7s}" for c, _ in COLUMNS))

    if per_layer:
        header("layer")
        for (b, kind), d in results.items():
            print(row(f"{b:2d} {kind}", d, width))
        print()
    header(f"median of {len({b for b, _ in results})} blocks")
    for kind in KINDS:
        ds = [d for (b, k), d in results.items() if k == kind]
        if ds:
            med = {c: statistics.median(d[c] for d in ds) for c, _ in COLUMNS}
            worse = sum(d["x"] > 1 for d in ds)
            print(row(kind, med, width) + f"   worse in {worse}/{len(ds)} blocks")


def ablation() -> None:
    """Whole-model RTN 3-bit g128 with the rotation on subsets of the linears; perplexity as the method table
    measures it (16,384 tokens per corpus, windows of 512, one thread)."""
    import torch

    from gptq_explorer.data import evaluation_ids
    from gptq_explorer.metrics.perplexity_eval import perplexity
    from gptq_explorer.models import load_model
    from gptq_explorer.models.quantize import quantize_model

    torch.set_num_threads(1)
    lm = load_model()
    plain, rotated = configs()
    ids = {c: evaluation_ids(lm.tokenizer, c, 16384) for c in ("prose", "code")}
    runs = {"rotation on none": (plain, None), "rotation on all": (rotated, None),
            "all but v_proj": (rotated, {"*.v_proj": {"rotation": None}}),
            "v_proj only": (plain, {"*.v_proj": {"rotation": "hadamard"}})}
    print(f"\n{'RTN 3-bit g128':18s} {'prose':>8s} {'code':>8s}")
    for name, (cfg, overrides) in runs.items():
        qm = quantize_model(lm.model, None, cfg, method="rtn", overrides=overrides, inplace=False,
                            progress=False, hessian_condition=False)
        ppl = {c: perplexity(qm.model, x, seqlen=512, progress=False).ppl for c, x in ids.items()}
        print(f"{name:18s} {ppl['prose']:8.2f} {ppl['code']:8.2f}", flush=True)
        del qm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="all", help="comma-separated block indices (default: all 30)")
    ap.add_argument("--kinds", default="all", help="comma-separated linears, e.g. self_attn.v_proj")
    ap.add_argument("--per-layer", action="store_true", help="print every layer's row, not only the medians")
    ap.add_argument("--ablation", action="store_true", help="also the whole-model RTN perplexities")
    args = ap.parse_args()
    blocks = list(range(30)) if args.blocks == "all" else [int(b) for b in args.blocks.split(",")]
    kinds = KINDS if args.kinds == "all" else args.kinds.split(",")
    print(f"RTN 3-bit g128 sym, rotation seed 0; calibration {NSAMPLES} x {SEQLEN} prose windows "
          f"(seed {SEED}), full-precision inputs, one thread", flush=True)
    layers = collect(blocks, kinds)
    order = sorted(layers, key=lambda key: (key[0], KINDS.index(key[1])))
    results = {key: diagnose(layers[key]) for key in order}
    table(results, args.per_layer)
    if args.ablation:
        ablation()


if __name__ == "__main__":
    main()
