"""Tiny, randomly initialised components for tests, benchmarks and the offline forms of the examples.

Everything is built from configs in code under a fixed seed, with a locally built tokenizer: nothing is downloaded.
Shapes follow Stable Diffusion (4-channel latents, CLIP text encoder, UNet2DConditionModel with cross-attention) at
toy sizes, so every code path of the pipeline runs in seconds on a CPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, LMSDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, ResNetConfig, ResNetForImageClassification, ViTImageProcessor

from pipeline_kldb_boundary import KLDBBoundaryPipeline

TINY_LABELS = ["zero", "one", "two", "three"]


def tiny_tokenizer(model_max_length: int = 16):
    """A CLIP tokenizer in which every word of the digits world's vocabulary is one token."""
    from kldb.digits.train import build_tokenizer

    with tempfile.TemporaryDirectory() as directory:
        return build_tokenizer(Path(directory), model_max_length)


def sd_scheduler(**overrides: Any) -> LMSDiscreteScheduler:
    """k-LMS with Stable Diffusion v1.4's noise schedule."""
    config = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "steps_offset": 1,
    }
    config.update(overrides)
    return LMSDiscreteScheduler(**config)


def tiny_classifier(num_labels: int = len(TINY_LABELS), seed: int = 0) -> tuple[ResNetForImageClassification, Any]:
    """A tiny transformers ResNet image classifier with its image processor (16 x 16, mean/std 0.5)."""
    torch.manual_seed(seed)
    labels = TINY_LABELS[:num_labels] if num_labels <= len(TINY_LABELS) else [f"class_{i}" for i in range(num_labels)]
    config = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=num_labels,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model = ResNetForImageClassification(config).eval()
    processor = ViTImageProcessor(
        do_resize=True, size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return model, processor


def tiny_components(seed: int = 0, with_classifier: bool = True) -> dict[str, Any]:
    """Components of a :class:`KLDBBoundaryPipeline` at toy size (32 x 32 images, 16 x 16 x 4 latents)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
        )
    )
    components: dict[str, Any] = {
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "unet": unet.eval(),
        "scheduler": sd_scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }
    if with_classifier:
        components["classifier"], components["classifier_processor"] = tiny_classifier(seed=seed)
    return components


def tiny_guidance_vae(seed: int = 0) -> AutoencoderTiny:
    """An ``AutoencoderTiny`` on the latents of :func:`tiny_components` (4 channels, factor 2), random weights."""
    torch.manual_seed(seed)
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    ).eval()


def tiny_pipeline(seed: int = 0, with_classifier: bool = True) -> KLDBBoundaryPipeline:
    """A :class:`KLDBBoundaryPipeline` on :func:`tiny_components`, progress bar off."""
    pipe = KLDBBoundaryPipeline(**tiny_components(seed, with_classifier))
    pipe.set_progress_bar_config(disable=True)
    return pipe
