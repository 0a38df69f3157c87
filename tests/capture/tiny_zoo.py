"""Tiny random models of a representative set of architectures, built from configs in memory."""

from __future__ import annotations

from typing import Any

# model type -> the class a user fine-tunes
REPRESENTATIVE = {
    "llama": "LlamaForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
    "paligemma": "PaliGemmaForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "mistral3": "Mistral3ForConditionalGeneration",
    "phi": "PhiForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "falcon_h1": "FalconH1ForCausalLM",
    "mamba": "MambaForCausalLM",
    "jamba": "JambaForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}

_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 512,
    "moe_intermediate_size": 16,
    "num_experts": 4,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 256,
    "sliding_window": 64,
    # mamba mixers (Falcon-H1)
    "mamba_d_ssm": 32,
    "mamba_n_heads": 4,
    "mamba_d_head": 8,
    "mamba_d_state": 8,
    "mamba_n_groups": 1,
    "mamba_chunk_size": 16,
    "mamba_expand": 1,
    "mamba_d_conv": 2,
    "state_size": 8,
    "attn_layer_period": 2,
    "attn_layer_offset": 1,
    "expert_layer_period": 2,
    "expert_layer_offset": 1,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}
_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "depth": 2,
    "num_attention_heads": 4,
    "num_heads": 4,
    "head_dim": 8,
    "embed_dim": 32,
    "out_hidden_size": 32,
    "image_size": 32,
    "patch_size": 8,
    "fullatt_block_indexes": [1],
    "window_size": 16,
}


def text_settings() -> dict[str, Any]:
    """The tiny text-model settings (a copy)."""
    return dict(_TEXT)


def _shrink(cfg: Any, values: dict[str, Any]) -> None:
    for k, v in values.items():
        if hasattr(cfg, k) and getattr(cfg, k) is not None:
            setattr(cfg, k, v)


def tiny_model(model_type: str, seed: int = 0) -> Any:
    """A randomly initialised tiny model of ``model_type``'s representative class, float32, eval mode."""
    import torch
    import transformers

    cls = getattr(transformers, REPRESENTATIVE[model_type])
    cfg = cls.config_class()
    text = cfg.get_text_config(decoder=True)
    _shrink(text, _TEXT)
    if getattr(text, "layer_types", None) is not None:
        try:
            text.layer_types = [text.layer_types[i % len(text.layer_types)] for i in range(3)]
        except AttributeError:  # derived from other fields (Falcon-H1)
            pass
    if model_type == "qwen2_5_vl":  # multimodal rope sections sum to head_dim / 2
        text.rope_parameters = {**(text.rope_parameters or {}), "mrope_section": [2, 1, 1]}
    vision = getattr(cfg, "vision_config", None)
    if vision is not None:
        _shrink(vision, _VISION)
    if text is not cfg:
        _shrink(cfg, {k: v for k, v in _TEXT.items() if k in ("vocab_size", "pad_token_id")})
        for k in ("image_token_index", "image_token_id", "video_token_id", "vision_start_token_id"):
            if isinstance(getattr(cfg, k, None), int):
                setattr(cfg, k, 500 + len(k) % 10)
        if hasattr(cfg, "mm_tokens_per_image"):
            cfg.mm_tokens_per_image = 4
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    return model
