"""The initial noise of a sampling run, for kldb code that fixes the latents itself.

The pipeline draws its own initial latents (diffusers' ``StableDiffusionPipeline.prepare_latents``); code that needs
them before the call (the same noise in every setting, or the latent a step starts from) draws them here, the same
way, so that ``pipe(latents=initial_noise(pipe, n, generator))`` samples what ``pipe(generator=generator,
num_images_per_prompt=n)`` samples.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor


def initial_noise(
    pipe: torch.nn.Module | object,
    num_images: int,
    generator: torch.Generator | list[torch.Generator] | None,
    height: int | None = None,
    width: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Unscaled initial latents ``[num_images, c, height / f, width / f]`` (``f`` the pipeline's VAE factor).

    Args:
        pipe: a Stable Diffusion pipeline (``unet``, ``vae_scale_factor``, ``text_encoder``).
        num_images: images in the batch.
        generator: one generator for the batch, or one per image, as the pipeline's ``generator``.
        height, width: image size; ``None`` is the model's default (``unet.config.sample_size * f``).
        dtype: ``None`` is the dtype the pipeline draws in: its prompt embeddings', the text encoder's.

    Returns:
        Standard normal noise on the pipeline's execution device, drawn as ``prepare_latents`` draws it; the pipeline
        scales latents it is given by the scheduler's ``init_noise_sigma`` itself.
    """
    factor = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * factor
    width = width or pipe.unet.config.sample_size * factor
    if dtype is None:
        dtype = pipe.text_encoder.dtype if getattr(pipe, "text_encoder", None) is not None else pipe.unet.dtype
    shape = (num_images, pipe.unet.config.in_channels, height // factor, width // factor)  # (B, c, h, w)
    return randn_tensor(shape, generator=generator, device=pipe._execution_device, dtype=dtype)
