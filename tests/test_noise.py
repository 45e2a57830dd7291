"""kldb.noise.initial_noise draws what the pipeline itself draws for the same generator."""

from __future__ import annotations

import pytest
import torch
from conftest import gen

from kldb.noise import initial_noise

KWARGS = {"classes": [3, 2], "num_inference_steps": 2, "kldb_guidance_interval": 1, "output_type": "pt"}


@pytest.mark.parametrize("per_image", [False, True], ids=["one-generator", "a-generator-per-image"])
def test_given_noise_samples_what_the_generator_samples(tiny_pipe, per_image):
    def fresh() -> torch.Generator | list[torch.Generator]:
        return [gen(5), gen(6)] if per_image else gen(5)

    noise = initial_noise(tiny_pipe, 2, fresh())
    assert noise.shape == (2, 4, 16, 16) and noise.dtype == tiny_pipe.text_encoder.dtype
    by_generator = tiny_pipe(num_images_per_prompt=2, generator=fresh(), **KWARGS)
    by_latents = tiny_pipe(num_images_per_prompt=2, latents=noise, **KWARGS)
    torch.testing.assert_close(by_latents.images, by_generator.images, rtol=0, atol=0)
    torch.testing.assert_close(by_latents.kldb, by_generator.kldb, rtol=0, atol=0)


def test_size_and_dtype(tiny_pipe):
    noise = initial_noise(tiny_pipe, 3, gen(0), height=48, width=64, dtype=torch.float64)
    assert noise.shape == (3, 4, 48 // tiny_pipe.vae_scale_factor, 64 // tiny_pipe.vae_scale_factor)
    assert noise.dtype == torch.float64
    expected = torch.randn((3, 4, 24, 32), generator=gen(0), dtype=torch.float64)  # diffusers' randn_tensor on a CPU
    torch.testing.assert_close(noise, expected, rtol=0, atol=0)
