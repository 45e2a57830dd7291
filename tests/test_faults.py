"""Numerical faults never put a nan into the latents or the images: updates are skipped, counted and warned about."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import MeanBrightnessClassifier, gen

from kldb import ImageClassifier
from pipeline_kldb_boundary import MAX_LATENT_STDS, latents_are_usable, normalize_guidance_gradient

KWARGS = {"prompt": "three", "num_inference_steps": 6, "kldb_guidance_interval": 2, "output_type": "pt"}


class FaultyClassifier(torch.nn.Module):
    """Brightness logits, except that images listed in ``bad`` get ``value`` (nan or inf) logits."""

    labels = ("dark", "bright")

    def __init__(self, value: float, bad: tuple[int, ...] = (0,)):
        super().__init__()
        self.inner = MeanBrightnessClassifier()
        self.value, self.bad = value, list(bad)

    def forward(self, images):
        logits = self.inner(images)
        mask = torch.zeros(len(images), 1, dtype=torch.bool)
        mask[[i for i in self.bad if i < len(images)]] = True
        return torch.where(mask, torch.full_like(logits, self.value), logits)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_skip_only_that_image(tiny_pipe, caplog, value):
    classifier = FaultyClassifier(value, bad=(0,))
    with caplog.at_level(logging.WARNING):
        out = tiny_pipe(
            classes=[0, 1], classifier=classifier, num_images_per_prompt=3, generator=gen(0), **KWARGS
        )  # fmt: skip
    assert torch.isfinite(out.images).all()
    assert out.skipped_updates == 3 and out.guided_updates == 6  # image 0 at each of the 3 guided steps
    assert "KLDB guidance skipped 3 of 9 per-sample updates" in caplog.text
    # the healthy images got exactly the updates they get without the faulty one
    healthy = tiny_pipe(classes=[0, 1], classifier=MeanBrightnessClassifier(), num_images_per_prompt=3,
                        generator=gen(0), **KWARGS)  # fmt: skip
    torch.testing.assert_close(out.images[1:], healthy.images[1:], rtol=1e-4, atol=1e-5)
    unguided = tiny_pipe(classes=[0, 1], classifier=MeanBrightnessClassifier(), num_images_per_prompt=3,
                         generator=gen(0), kldb_guidance_scale=0.0, **KWARGS)  # fmt: skip
    torch.testing.assert_close(out.images[0], unguided.images[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["detached", "unet"])
def test_zero_gradient_is_skipped_and_counted(tiny_pipe, caplog, mode):
    # logits that do not depend on the image: the gradient is exactly zero (as when fp16 underflows)
    def constant(images):
        return images.sum(dim=(1, 2, 3))[:, None] * 0 + torch.tensor([[1.0, 0.0]])

    with caplog.at_level(logging.WARNING):
        out = tiny_pipe(classes=[0, 1], classifier=ImageClassifier(constant, labels=["a", "b"]), generator=gen(0),
                        num_images_per_prompt=2, kldb_gradient=mode, **KWARGS)  # fmt: skip
    assert out.skipped_updates == 6 and out.guided_updates == 0
    assert "skipped 6 of 6" in caplog.text
    base = tiny_pipe(classes=[0, 1], classifier=ImageClassifier(constant, labels=["a", "b"]), generator=gen(0),
                     num_images_per_prompt=2, kldb_guidance_scale=0.0, **KWARGS)  # fmt: skip
    if mode == "detached":
        assert torch.equal(out.images, base.images)
    else:
        # "unet" runs a guided step's UNet forward as two half batches (the conditional one with gradients on) instead
        # of one batched call: the same noise prediction up to float rounding
        torch.testing.assert_close(out.images, base.images, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("alpha", [1e12, 1e30, 3e38])
@pytest.mark.parametrize("mode", ["detached", "unet"])
def test_huge_alpha_never_produces_nan(tiny_pipe, alpha, mode):
    out = tiny_pipe(classes=[3, 2], kldb_guidance_scale=alpha, kldb_gradient=mode, generator=gen(0),
                    num_images_per_prompt=2, **KWARGS)  # fmt: skip
    assert torch.isfinite(out.images).all() and torch.isfinite(out.kldb).all()
    assert out.skipped_updates == 6 and out.guided_updates == 0


def test_alpha_one_is_not_refused(tiny_pipe):
    out = tiny_pipe(classes=[3, 2], kldb_guidance_scale=1.0, generator=gen(0), **KWARGS)
    assert out.skipped_updates == 0 and out.guided_updates == 3


def test_latents_are_usable():
    z = torch.randn(4, 4, 8, 8, generator=gen(0))
    z[1, 0, 0, 0] = float("nan")
    z[2] *= 2 * MAX_LATENT_STDS
    z[3, 0, 0, 0] = float("inf")
    assert latents_are_usable(z, 0.0).tolist() == [True, False, False, False]
    assert latents_are_usable(z[:3], 10.0).tolist() == [True, False, True]  # 2e4 std is fine at sigma 10


def test_normalize_guidance_gradient():
    z = torch.randn(3, 4, 2, 2, generator=gen(0))
    grad = torch.randn(3, 4, 2, 2, generator=gen(1))
    grad[1] = 0
    grad[2, 0, 0, 0] = float("nan")
    g_star, ok = normalize_guidance_gradient(grad, z)
    assert ok.tolist() == [True, False, False]
    torch.testing.assert_close(g_star[0].norm(), z[0].norm())
    torch.testing.assert_close(g_star[0] / g_star[0].norm(), grad[0] / grad[0].norm())
    assert torch.equal(g_star[1:], torch.zeros_like(g_star[1:]))
