# written by `smdm convert to-hf` (smdm.convert); loaded by transformers with trust_remote_code=True
"""Configuration of smdm's masked diffusion model (MDM) for Hugging Face transformers: see modeling_smdm.py."""

from transformers import LlamaConfig


class SmdmConfig(LlamaConfig):
    """LlamaConfig (the same block) under its own model type, so that transformers never loads an MDM's weights as
    a causal Llama. vocab_size counts the mask token, the last id: config.json's `mask_token_id` is
    vocab_size - 1 (LlamaConfig keeps the key as an attribute), and the head has vocab_size - 1 outputs."""

    model_type = "smdm"
