"""Tiny random-init models of every adapter family, saved as safetensors folders with a byte-level
tokenizer (no network): the helpers the tests build their models with (the fixtures are in conftest.py)."""

from __future__ import annotations

import torch

TINY_FAMILIES = ("llama", "opt", "gpt2", "gpt_neox")
EXTRA_LLAMA_LIKE = ("mistral", "qwen2")
VOCAB = 260  # 256 byte tokens + <|endoftext|> + spare rows


def make_byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per UTF-8 byte, exact round trip."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", model_max_length=1 << 30
    )


def tiny_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=256, eos_token_id=256)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        return cls(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            **common,
        )
    if family == "opt":
        return tf.OPTConfig(
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
            pad_token_id=257,
            **common,
        )
    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_inner=96, n_layer=2, n_head=4, n_positions=256, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            rotary_pct=0.25,
            **common,
        )
    raise KeyError(family)


def make_tiny_model(family: str, folder, seed: int = 0):
    """Random-init tiny model of a family, saved with safetensors + the byte tokenizer into folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    with torch.no_grad():  # larger-than-default weights so that quantization error is visible in logits
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.normal_(0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    make_byte_tokenizer().save_pretrained(folder)
    return folder
