"""One table that says, per architecture family, where things are inside a transformers causal LM.

GPTQ's full-model method (the paper's opt.py / llama.py) needs four facts about a model:
  1. where the list of decoder blocks is,
  2. which modules run before block 0 (embeddings, positions) and after the last block (final norm),
  3. which linears each block has, in "true-sequential" order (groups that see the same input
     are quantized together; later groups are calibrated on the outputs of already-quantized ones),
  4. how each linear stores its weight: nn.Linear is (out, in); GPT-2's Conv1D is (in, out).
Everything else (hooks, Hessians, quantizing) is shared code. Embeddings, lm_head and norms are never in
the groups, so they are never quantized.

This file also holds the "catch the inputs to block 0" trick: run the model with a pre-hook on block 0
(models.capture.hooks) that records what the block receives (hidden states + the kwargs: attention mask,
position ids, rotary embeddings ...) and then raises StopForward, so the rest of the model never runs.
With those inputs the blocks can be run one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .capture import HookCall, StopForward, hooks, model_device, run_until_stopped


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    blocks: str  # attribute path of the nn.ModuleList of decoder blocks
    pre_blocks: tuple[str, ...]  # modules that run before block 0 (missing ones are skipped)
    post_blocks: tuple[str, ...]  # modules that run after the last block, before lm_head, in order
    sequential: tuple[tuple[str, ...], ...]  # linears of one block, true-sequential groups
    conv1d: bool = False  # GPT-2: weights are stored (in, out)
    notes: str = ""

    def groups(self, true_sequential: bool = True) -> list[list[str]]:
        """The quantization groups of one block; one group with everything if not true-sequential."""
        if true_sequential:
            return [list(g) for g in self.sequential]
        return [[name for g in self.sequential for name in g]]

    def linear_names(self) -> list[str]:
        return [name for g in self.sequential for name in g]

    def get_blocks(self, model) -> nn.ModuleList:
        return get_module(model, self.blocks)

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks}.{i}"

    def linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """Name (relative to the block) -> module, in true-sequential order."""
        return {name: get_module(block, name) for name in self.linear_names()}

    def pre_modules(self, model) -> list[nn.Module]:
        return [m for m in (get_module(model, p, missing_ok=True) for p in self.pre_blocks) if m is not None]

    def post_modules(self, model) -> list[nn.Module]:
        return [m for m in (get_module(model, p, missing_ok=True) for p in self.post_blocks) if m is not None]


_LLAMA_GROUPS = (
    ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"),
    ("self_attn.o_proj",),
    ("mlp.up_proj", "mlp.gate_proj"),
    ("mlp.down_proj",),
)

ADAPTERS: dict[str, Adapter] = {}


def _register(adapter: Adapter) -> None:
    for t in adapter.model_types:
        ADAPTERS[t] = adapter


_register(
    Adapter(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        blocks="model.layers",
        pre_blocks=("model.embed_tokens", "model.rotary_emb"),
        post_blocks=("model.norm",),
        sequential=_LLAMA_GROUPS,
        notes="LLaMA, Mistral, Qwen2/3 and SmolLM share one layout; rotary embeddings are computed once "
        "in the model and handed to every block as position_embeddings.",
    )
)
_register(
    Adapter(
        family="opt",
        model_types=("opt",),
        blocks="model.decoder.layers",
        pre_blocks=(
            "model.decoder.embed_tokens",
            "model.decoder.embed_positions",
            "model.decoder.project_in",
        ),
        post_blocks=("model.decoder.final_layer_norm", "model.decoder.project_out"),
        sequential=(
            ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        notes="The GPTQ paper's own model family. project_in/out exist only in OPT-350m.",
    )
)
_register(
    Adapter(
        family="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        pre_blocks=("transformer.wte", "transformer.wpe", "transformer.drop"),
        post_blocks=("transformer.ln_f",),
        sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        conv1d=True,
        notes="GPT-2 uses transformers' Conv1D: weight stored as (in, out), the transpose of nn.Linear.",
    )
)
_register(
    Adapter(
        family="gpt_neox",
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        pre_blocks=("gpt_neox.embed_in", "gpt_neox.emb_dropout", "gpt_neox.rotary_emb"),
        post_blocks=("gpt_neox.final_layer_norm",),
        sequential=(
            ("attention.query_key_value",),
            ("attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ),
        notes="Pythia. Parallel attention + MLP residual; q, k, v are one fused linear.",
    )
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(ADAPTERS))


class UnsupportedModelError(ValueError):
    pass


def get_adapter(model_or_config_or_type: Any) -> Adapter:
    """The adapter for a model, its config, or a model_type string."""
    obj = model_or_config_or_type
    if isinstance(obj, str):
        model_type = obj
    else:
        config = getattr(obj, "config", obj)
        model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"No adapter for model_type '{model_type}'. Supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Adding a family means adding one Adapter entry in "
            "gptq_explorer/models/adapters.py (blocks path, pre/post modules, linears in sequential order)."
        )
    return ADAPTERS[model_type]


def get_module(root: nn.Module, path: str, missing_ok: bool = False):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            if missing_ok:
                return None
            raise AttributeError(f"{type(root).__name__} has no module '{path}' (stopped at '{part}')")
    return obj


# ---------------------------------------------------------------------------------------------------------
# weight orientation


def is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D; matched by name so we need not import it
    return type(module).__name__ == "Conv1D" and not isinstance(module, nn.Conv1d)


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the module stores. A view for nn.Linear, a
    transposed view for Conv1D: clone it before modifying."""
    w = module.weight.data
    return w.t() if is_conv1d(module) else w


def set_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Write an (out, in) weight back into the module, in its own orientation, dtype and device."""
    w = module.weight.data
    src = W.t() if is_conv1d(module) else W
    if tuple(src.shape) != tuple(w.shape):
        raise ValueError(
            f"weight shape {tuple(W.shape)} (out, in) does not fit {type(module).__name__} "
            f"with stored shape {tuple(w.shape)}"
        )
    w.copy_(src.to(dtype=w.dtype, device=w.device))


def find_linear_like(module: nn.Module) -> dict[str, nn.Module]:
    """All nn.Linear / Conv1D modules inside a module (name relative to it)."""
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}


def quantizable_modules(model, adapter: Adapter | None = None) -> dict[str, nn.Module]:
    """Full module path -> module for every linear GPTQ quantizes, block by block in sequential order."""
    adapter = adapter or get_adapter(model)
    out = {}
    for i, block in enumerate(adapter.get_blocks(model)):
        for name, mod in adapter.linears(block).items():
            out[f"{adapter.block_prefix(i)}.{name}"] = mod
    return out


# ---------------------------------------------------------------------------------------------------------
# catching the inputs of block 0 and running blocks one at a time


@dataclass
class BlockInputs:
    """What block 0 receives: hidden states for every sample plus the extra arguments the model passes to
    every block (the same for all samples of one seqlen: we never pad)."""

    hidden: torch.Tensor  # (nsamples, seqlen, hidden)
    args: tuple = ()  # positional arguments after hidden_states (GPT-2 passes cache and mask positionally)
    kwargs: dict = field(default_factory=dict)  # attention_mask, position_ids, position_embeddings, ...


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def catch_block_inputs(
    model,
    ids: torch.Tensor,
    adapter: Adapter | None = None,
    batch_size: int = 8,
    device=None,
    dtype: torch.dtype | None = None,
) -> BlockInputs:
    """Run the model on calibration ids (nsamples, seqlen) and stop at block 0, returning its inputs.

    Only the pre-block modules (embeddings, positions, rotary) run; with `device` set they are moved there
    for the duration and moved back, like the paper's code. The extra kwargs are taken from a batch of one
    sample, so their batch dimension is 1 and broadcasts over any batch later.
    """
    adapter = adapter or get_adapter(model)
    blocks = adapter.get_blocks(model)
    home = model_device(model)
    device = torch.device(device) if device is not None else home
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    pre = adapter.pre_modules(model)
    hidden: list[torch.Tensor] = []
    extra: dict[str, Any] = {}

    def record(call: HookCall) -> None:
        kwargs = dict(call.kwargs)
        if call.args:
            x, rest = call.args[0], tuple(call.args[1:])
        else:
            x, rest = kwargs.pop("hidden_states"), ()
        hidden.append(x.detach().to(dtype) if dtype is not None else x.detach())
        if not extra:
            extra["args"], extra["kwargs"] = rest, kwargs
        raise StopForward

    if device != home:
        for m in pre:
            m.to(device)
    try:
        with hooks({"block0": blocks[0]}, record, when="before"):
            # sample 0 alone first, so the recorded kwargs have batch dimension 1
            starts = [0, *range(1, ids.shape[0], batch_size)]
            ends = [1, *[min(s + batch_size, ids.shape[0]) for s in starts[1:]]]
            for s, e in zip(starts, ends):
                if s >= e:
                    continue
                if run_until_stopped(model, input_ids=ids[s:e].to(device), use_cache=False) is not None:
                    raise RuntimeError("the model finished its forward pass without calling block 0")
    finally:
        if device != home:
            for m in pre:
                m.to(home)
    return BlockInputs(torch.cat(hidden), extra.get("args", ()), extra.get("kwargs", {}))


def run_block(block: nn.Module, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    """One block's forward on hidden states x (batch, seqlen, hidden) with the caught extra arguments."""
    out = block(x, *inputs.args, **inputs.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_blocks(blocks, inputs: BlockInputs, batch_size: int = 8, device=None) -> torch.Tensor:
    """Run hidden states through a sequence of blocks, batch by batch; returns the last block's outputs."""
    x = inputs.hidden
    dev = torch.device(device) if device is not None else x.device
    kw = BlockInputs(x, _to(inputs.args, dev), _to(inputs.kwargs, dev))
    for block in blocks:
        outs = [
            run_block(block, x[i : i + batch_size].to(dev), kw).to(x.device)
            for i in range(0, x.shape[0], batch_size)
        ]
        x = torch.cat(outs)
    return x


@torch.no_grad()
def head_inputs(model, input_ids: torch.Tensor) -> torch.Tensor:
    """What the model's output embedding (lm_head) receives for input_ids (batch, seqlen): the last block's
    outputs after the final norm, (batch, seqlen, hidden). The forward pass stops there, so the logits,
    seqlen x vocab floats per window, are never made at once; the output embedding turns slices of this into
    logits (metrics.perplexity_eval, a slice of tokens at a time)."""
    got: list[torch.Tensor] = []

    def record(call: HookCall) -> None:
        got.append(call.input)
        raise StopForward

    with hooks({"head": model.get_output_embeddings()}, record, when="before"):
        if run_until_stopped(model, input_ids=input_ids, use_cache=False) is not None:
            raise RuntimeError("the model finished its forward pass without calling its output embeddings")
    return got[0]


@torch.no_grad()
def head_logits(model, hidden: torch.Tensor, adapter: Adapter | None = None) -> torch.Tensor:
    """Logits from the last block's outputs: final norm (+ OPT project_out) then lm_head."""
    adapter = adapter or get_adapter(model)
    for m in adapter.post_modules(model):
        hidden = m(hidden)
    return model.get_output_embeddings()(hidden)
