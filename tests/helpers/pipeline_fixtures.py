"""Tiny diffusers pipelines and their LoRAs, built from configs in the test (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import fixtures as fx

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")  # proj_*: 1x1 convolutions
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def build_pipeline(out: Path, dtype=torch.float32, seed: int = 0) -> Path:
    """A Stable-Diffusion-shaped pipeline: 2-level UNet with cross-attention, tiny CLIP text encoder and VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = _tokenizer(out, "tokenizer", "gpt2", 12)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=12, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=12, projection_dim=12, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ))
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet.to(dtype), vae=vae.to(dtype), text_encoder=text_encoder.to(dtype), tokenizer=tok, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def _tokenizer(out: Path, suffix: str, kind: str, max_length: int):
    tok = fx.make_tokenizer(out.parent / f"_{out.name}_{suffix}", kind)
    tok.model_max_length = max_length
    return tok


def _t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4))


def _flow_vae(latent_channels: int):
    """The one-level VAE of the flow-matching pipelines (only its latent shape matters)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )


def build_flux_pipeline(out: Path, seed: int = 0) -> Path:
    """A Flux-shaped pipeline: a transformer denoiser (double- and single-stream blocks), CLIP and T5 encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok, tok2 = _tokenizer(out, "tokenizer", "gpt2", 12), _tokenizer(out, "tokenizer_2", "t5", 16)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=12, projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ))
    FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(latent_channels=1), text_encoder=text_encoder,
        tokenizer=tok, text_encoder_2=_t5_encoder(len(tok2)), tokenizer_2=tok2, transformer=transformer,
    ).save_pretrained(out)
    return out


def build_sd3_pipeline(out: Path, seed: int = 0) -> Path:
    """An SD3-shaped pipeline: an MMDiT transformer denoiser, two CLIP encoders with projection and a T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok, tok3 = _tokenizer(out, "tokenizer", "gpt2", 12), _tokenizer(out, "tokenizer_3", "t5", 16)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    clip = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=12, projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(latent_channels=4), transformer=transformer,
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer_2=tok,
        text_encoder_3=_t5_encoder(len(tok3)), tokenizer_3=tok3,
    ).save_pretrained(out)
    return out


def build_sdxl_pipeline(out: Path, seed: int = 0) -> Path:
    """An SDXL-shaped pipeline: two CLIP text encoders (the second with projection: pooled conditioning) and a
    UNet that adds text and time embeddings (added_cond_kwargs)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = _tokenizer(out, "tokenizer", "gpt2", 12)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=12 + 6 * 4, cross_attention_dim=24,
        norm_num_groups=4,
    )
    text = dict(vocab_size=len(tok), hidden_size=12, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=12, projection_dim=12, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vae = AutoencoderKL(
        block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=16,
    )
    StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)), tokenizer_2=tok, unet=unet,
        scheduler=EulerDiscreteScheduler(), force_zeros_for_empty_prompt=False,
    ).save_pretrained(out)
    return out


def lora_layers(pipe_dir: Path, seed: int, targets: dict | None = None, r: int = 2, alpha: int = 4):
    """{component: PEFT state dict} of a random LoRA (nonzero B) made by PEFT on the pipeline's modules."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(pipe_dir, local_files_only=True)
    torch.manual_seed(seed)
    out = {}
    for component, targets in (targets or {"unet": UNET_TARGETS, "text_encoder": TEXT_TARGETS}).items():
        if targets:
            module = getattr(pipe, component)
            inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False), module)
            out[component] = {k: v * 3 if "lora_B" in k else v for k, v in get_peft_model_state_dict(module).items()}
    return out


def save_diffusers_lora(layers: dict, out: Path, r: int = 2, alpha: int = 4, pipeline_class=None) -> Path:
    """What diffusers' training scripts write: pytorch_lora_weights.safetensors with the LoRA config as metadata."""
    from diffusers import StableDiffusionPipeline

    pipeline_class = pipeline_class or StableDiffusionPipeline
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    for component, state in layers.items():
        kwargs[f"{component}_lora_layers"] = state
        targets = sorted({k.split(".lora_")[0] for k in state})  # full module names, as PEFT also accepts
        kwargs[f"{component}_lora_adapter_metadata"] = {"r": r, "lora_alpha": alpha, "target_modules": targets}
    pipeline_class.save_lora_weights(str(out), **kwargs)
    return out


def save_kohya_lora(layers: dict, out: Path, alpha: int = 4) -> Path:
    """The kohya / A1111 layout: lora_unet_<path with underscores>.lora_down / lora_up / alpha."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for component, layer_state in layers.items():
        prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
        for key, value in layer_state.items():
            module, _, rest = key.partition(".lora_")
            name = prefix + module.replace(".", "_")
            state[f"{name}.lora_down.weight" if rest.startswith("A") else f"{name}.lora_up.weight"] = value.contiguous()
            state[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(state, str(out / "my_style_lora.safetensors"))
    return out / "my_style_lora.safetensors"
