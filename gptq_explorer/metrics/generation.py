"""Greedy sample generations: what a quantized model says, next to what the original says."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

# The prompts every report's "samples" use (the CLI's --samples, the shipped runs, Model Lab): one factual,
# one code, one about the topic, one story opening, so prose and code damage both show.
SAMPLE_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Quantization makes neural networks",
    "Once upon a time, there was",
)
SAMPLE_TOKENS = 20


def generate_samples(model, tokenizer, prompts: Sequence[str] = SAMPLE_PROMPTS,
                     max_new_tokens: int = SAMPLE_TOKENS, check: Callable[[], None] | None = None
                     ) -> dict[str, str]:
    """{prompt: its greedy continuation (the new text only)}. check() is called before each prompt
    (raise from it to cancel)."""
    import torch

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    out = {}
    for prompt in prompts:
        if check is not None:
            check()
        enc = tokenizer(prompt, return_tensors="pt")
        device = next(model.parameters()).device
        eos = tokenizer.eos_token_id
        mask = enc.get("attention_mask")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # generation-config chatter, not the user's concern
            ids = model.generate(input_ids=enc["input_ids"].to(device),
                                 attention_mask=None if mask is None else mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=eos if eos is not None else 0)
        out[prompt] = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out
