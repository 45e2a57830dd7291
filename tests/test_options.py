"""Cost options of the guidance: each gives the default path's images where it should."""

from __future__ import annotations

import pytest
import torch
from conftest import gen

from kldb.testing import tiny_pipeline
from pipeline_kldb_boundary import kldb_guidance_gradient, normalize_guidance_gradient

KWARGS = {"classes": [3, 2], "num_inference_steps": 6, "kldb_guidance_interval": 2, "output_type": "pt"}


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.mark.parametrize("mode", ["unet", "detached"])
def test_checkpointing_changes_nothing_but_memory(pipe, mode):
    base = pipe(generator=gen(0), num_images_per_prompt=2, kldb_gradient=mode, **KWARGS)
    pipe.enable_guidance_checkpointing()
    try:
        assert pipe.unet.is_gradient_checkpointing and pipe.vae.is_gradient_checkpointing
        checkpointed = pipe(generator=gen(0), num_images_per_prompt=2, kldb_gradient=mode, **KWARGS)
    finally:
        pipe.disable_guidance_checkpointing()
    assert not pipe.unet.is_gradient_checkpointing
    torch.testing.assert_close(checkpointed.images, base.images, rtol=1e-5, atol=1e-6)
    assert checkpointed.guided_updates == base.guided_updates == 6


def test_vae_slicing_changes_nothing(pipe):
    base = pipe(generator=gen(1), num_images_per_prompt=3, **KWARGS)
    pipe.vae.enable_slicing()
    try:
        sliced = pipe(generator=gen(1), num_images_per_prompt=3, **KWARGS)
    finally:
        pipe.vae.disable_slicing()
    torch.testing.assert_close(sliced.images, base.images, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_guidance_pass(pipe, dtype):
    base = pipe(generator=gen(2), num_images_per_prompt=2, **KWARGS)
    mixed = pipe(generator=gen(2), num_images_per_prompt=2, kldb_autocast_dtype=dtype, **KWARGS)
    assert torch.isfinite(mixed.images).all()
    assert mixed.skipped_updates == 0 and mixed.guided_updates == 6
    # low-precision gradients point nearly the same way: the images stay close to the float32 ones
    assert (mixed.images - base.images).abs().mean() < 0.05


def test_bad_autocast_dtype(pipe):
    with pytest.raises(ValueError, match=r"`kldb_autocast_dtype` has to be None, torch.float16 or torch.bfloat16 but is torch.int8"):
        pipe(generator=gen(0), kldb_autocast_dtype=torch.int8, **KWARGS)


def test_loss_scaling_rescues_float16_underflow():
    """A gradient of about 1e-9 per element flushes to zero in float16; scaled by 2^16 it survives, same direction."""
    z = torch.randn(2, 3, 4, 4, generator=gen(0))
    eps = torch.zeros_like(z)

    def classify(images):
        m = (images.double().mean(dim=(1, 2, 3)) - 0.5) * 1e-3  # float64 logits near the boundary: tiny gradients
        return torch.stack([m, -m], dim=1)

    def run(dtype, scale):
        grad, _ = kldb_guidance_gradient(z.to(dtype), 1.0, [0, 1], lambda x: x, classify, eps=eps.to(dtype),
                                         loss_scale=scale)  # fmt: skip
        return grad

    reference = run(torch.float64, 1.0)
    assert reference.abs().max() < 1e-8 and (reference != 0).any()  # zero only where the [0, 1] clamp cuts
    assert (run(torch.float16, 1.0) == 0).all()  # the underflow the authors hit: every update would be skipped
    scaled = run(torch.float16, 2.0**16)
    g16, ok = normalize_guidance_gradient(scaled.float(), z)
    g64, _ = normalize_guidance_gradient(reference, z.double())
    assert ok.all()
    cosine = torch.nn.functional.cosine_similarity(g16.double().flatten(1), g64.flatten(1))
    assert (cosine > 0.99).all()
