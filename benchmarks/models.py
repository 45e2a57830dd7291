"""The pipelines the guidance benchmark runs on: the digits world, an SD-v1.4-shaped pipeline, tiny components.

The SD-shaped pipeline has Stable Diffusion v1.4's real architectures (UNet, VAE, CLIP ViT-L/14 text encoder) and a
torchvision ResNet-50 as classifier, built from the configs written below with random weights: nothing is downloaded,
and the cost of sampling and of the guidance pass does not depend on the values of the weights. Its images and KLDB
values mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from kldb.presets import PRESETS
from pipeline_kldb_boundary import ImageClassifier, KLDBBoundaryPipeline

MODELS = ("digits", "sd", "tiny")

#: `CompVis/stable-diffusion-v1-4` unet/config.json (architecture keys).
SD14_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

#: `CompVis/stable-diffusion-v1-4` vae/config.json (architecture keys).
SD14_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

#: `openai/clip-vit-large-patch14` text_config, as SD v1.4's text encoder; the vocabulary is the local tokenizer's.
CLIP_L_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}


@dataclass
class BenchSetting:
    """A pipeline with the call settings the benchmark uses on it."""

    model: str
    pipeline: KLDBBoundaryPipeline
    classes: list[str]
    height: int
    width: int
    guidance_scale: float
    kldb_guidance_scale: float
    kldb_meaningful: bool
    description: str
    parameters: dict[str, int] = field(default_factory=dict)


def count_parameters(pipe: KLDBBoundaryPipeline) -> dict[str, int]:
    """Parameters per torch module component of ``pipe``."""
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }


def sd14_shaped_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> KLDBBoundaryPipeline:
    """SD v1.4's UNet, VAE and CLIP-L text encoder, TAESD (diffusers' default ``AutoencoderTiny``, the
    ``"madebyollin/taesd"`` architecture) as ``guidance_vae``, and a torchvision ResNet-50 (ImageNet preprocessing and
    labels of ``IMAGENET1K_V2``), all with random weights drawn under ``seed``."""
    from torchvision.models import ResNet50_Weights, resnet50

    from kldb.testing import sd_scheduler, tiny_tokenizer

    tokenizer = tiny_tokenizer(model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD14_UNET_CONFIG)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**SD14_VAE_CONFIG)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **CLIP_L_TEXT_CONFIG,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(seed)
    taesd = AutoencoderTiny()  # its defaults are TAESD's architecture (scaling_factor 1: SD's scaled latents)
    torch.manual_seed(seed)
    weights = ResNet50_Weights.IMAGENET1K_V2  # the enum carries preprocessing and labels; no weights are loaded
    classifier = ImageClassifier.from_torchvision(resnet50(weights=None).eval(), weights)
    pipe = KLDBBoundaryPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        classifier=classifier,
        guidance_vae=taesd.eval(),
    )
    return pipe.to(dtype=dtype)


def build_setting(model: str, device: str, dtype: torch.dtype, height: int | None, seed: int = 0) -> BenchSetting:
    """The pipeline for ``model`` (one of :data:`MODELS`) on ``device`` in ``dtype``, with its call settings.

    The classes, beta and alpha are a preset's (:data:`kldb.presets.PRESETS`): the digits preset's for the digits
    world and the tiny components (classes "three" and "two" there: the tiny classifier has four labels), the paper's
    for the SD-shaped pipeline. ``height`` (square images) overrides the model's own default resolution; ``None``
    keeps it.
    """
    if model == "digits":
        from kldb.digits import load_pipeline

        pipe = load_pipeline(torch_dtype=dtype, device=device)
        preset, classes, kldb_meaningful = PRESETS["digits"], list(PRESETS["digits"].classes), True
        description = "the shipped digits world (kldb.digits.load_pipeline()), classes three / eight"
    elif model == "sd":
        pipe = sd14_shaped_pipeline(seed=seed, dtype=dtype).to(device)
        preset, classes, kldb_meaningful = PRESETS["paper"], list(PRESETS["paper"].classes), False
        height = height or 512
        description = (
            "SD-v1.4-shaped pipeline with RANDOM weights (UNet, VAE, CLIP-L text encoder, torchvision ResNet-50): "
            "costs are real, images and KLDB values are meaningless"
        )
    elif model == "tiny":
        from kldb.testing import tiny_guidance_vae, tiny_pipeline

        pipe = tiny_pipeline(seed=seed)
        pipe.register_modules(guidance_vae=tiny_guidance_vae(seed=seed))
        pipe.to(device=device, dtype=dtype)
        preset, classes, kldb_meaningful = PRESETS["digits"], ["three", "two"], False
        description = "tiny random components (kldb.testing.tiny_pipeline()), for CI: numbers mean nothing"
    else:
        raise ValueError(f"Expected argument `model` to be one of {MODELS} but got {model!r}.")
    size = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    setting = BenchSetting(
        model=model,
        pipeline=pipe,
        classes=classes,
        height=size,
        width=size,
        guidance_scale=preset.beta,
        kldb_guidance_scale=preset.alpha,
        kldb_meaningful=kldb_meaningful,
        description=description,
    )
    setting.pipeline.set_progress_bar_config(disable=True)
    setting.parameters = count_parameters(setting.pipeline)
    return setting
