# written by `smdm convert to-hf` (smdm.convert); loaded by transformers with trust_remote_code=True
"""smdm's masked diffusion model (MDM) in Hugging Face transformers.

    model = AutoModelForMaskedLM.from_pretrained(DIR, trust_remote_code=True)
    logits = model(input_ids).logits  # (B, L, vocab_size - 1); input_ids may hold the mask, config.mask_token_id

The network is transformers' own Llama (pre-RMSNorm blocks, GPT-NeoX half-split RoPE, SwiGLU, no biases, untied
head), which is smdm's block, with the three differences of smdm's MDM:
- bidirectional attention: each forward pass hands LlamaModel an explicit 4D additive mask (B, 1, L, L), which
  LlamaModel uses as it is instead of building its causal mask; it hides only the padding keys
  (attention_mask == 0). The attention implementations kept are the ones that apply such a mask ("sdpa",
  "eager"); flash-attention and flex are switched off here;
- config.vocab_size counts the ids the model reads, the mask token included: it is the last one,
  config.mask_token_id = vocab_size - 1 (smdm's id V for V real tokens);
- the head outputs vocab_size - 1 logits, every token but the mask.
An MDM has no KV cache and no left-to-right `generate()`: it is sampled by iterative unmasking (smdm.generate).
`labels` give the plain cross-entropy of a masked-LM (-100 ignored), not the MDM's ELBO (which weights each
sequence by 1/t). This file imports torch and transformers only (never smdm).
"""

import torch
from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_smdm import SmdmConfig


class SmdmPreTrainedModel(LlamaPreTrainedModel):
    config_class = SmdmConfig
    config: SmdmConfig
    base_model_prefix = "model"
    # only attention implementations that apply a 4D float mask (the bidirectional one) are allowed
    _supports_flash_attn = False
    _supports_flash_attn_2 = False  # the flag's name in transformers 4.x
    _supports_flex_attn = False


def bidirectional_mask(attention_mask, batch: int, length: int, dtype, device) -> torch.Tensor:
    """The additive mask (B, 1, L, L) every query uses: 0 for a key it sees, the dtype's minimum for a padding
    key (attention_mask (B, L) == 0). A 4D mask given by the caller is used as it is."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    if attention_mask is not None and attention_mask.shape != (batch, length):
        raise ValueError(f"attention_mask must have shape {(batch, length)} (B, L), got {tuple(attention_mask.shape)}")
    mask = torch.zeros(batch, 1, length, length, dtype=dtype, device=device)
    if attention_mask is not None:
        hidden = (attention_mask == 0).to(device)[:, None, None, :]  # (B, 1, 1, L): padding keys
        mask = mask.masked_fill(hidden, torch.finfo(dtype).min)
    return mask


class SmdmModel(SmdmPreTrainedModel, LlamaModel):
    """LlamaModel with a bidirectional mask: final-normed hidden states (B, L, hidden_size)."""

    def __init__(self, config):
        super().__init__(config)
        mask_id = getattr(config, "mask_token_id", None)
        if mask_id is not None and mask_id != config.vocab_size - 1:
            raise ValueError(f"config.mask_token_id is {mask_id}: smdm's MDM reads the mask as the last id, "
                             f"vocab_size - 1 = {config.vocab_size - 1}")

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, L, d)
        batch, length = inputs_embeds.shape[:2]
        mask = bidirectional_mask(attention_mask, batch, length, inputs_embeds.dtype, inputs_embeds.device)
        kwargs["use_cache"] = False
        return super().forward(attention_mask=mask, position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)


class SmdmForMaskedLM(SmdmPreTrainedModel):
    """SmdmModel + the untied head: logits (B, L, vocab_size - 1) at every position (never the mask)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = SmdmModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size - 1, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                return_dict=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, **kwargs)
        logits = self.lm_head(out[0])  # (B, L, vocab_size - 1)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                               labels.to(logits.device).reshape(-1), ignore_index=-100)
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=getattr(out, "hidden_states", None),
                              attentions=getattr(out, "attentions", None))
