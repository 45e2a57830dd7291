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
    seen = []  # the dtype the VAE decoder's first convolution computes in, and whether autocast is on, per forward

    def spy(module, args, output):
        seen.append((torch.is_autocast_enabled("cpu"), output.dtype))

    handle = pipe.vae.decoder.conv_in.register_forward_hook(spy)
    try:
        mixed = pipe(generator=gen(2), num_images_per_prompt=2, kldb_autocast_dtype=dtype, **KWARGS)
    finally:
        handle.remove()
    # the 3 guidance passes ran under autocast in `dtype`; the final decode of the returned images did not
    assert seen.count((True, dtype)) == 3 and seen[-1] == (False, torch.float32) and len(seen) == 4
    assert not torch.equal(mixed.images, base.images)
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


# --- "unet" mode shares the guided step's own UNet forward --------------------------------------------------------


class RowCounter:
    """Counts the UNet's forward passes and the batch rows they process (a pre-hook on its first layer, which sees
    every forward, also those the guidance's wrapper of ``unet.forward`` makes)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = self.rows = 0
        self.handle = module.conv_in.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls += 1
        self.rows += (args[0] if args else kwargs["input"]).shape[0]


def test_shared_forward_runs_no_extra_unet_rows(pipe):
    """Guided steps cost no extra UNet forward rows: 6 steps x 2 x 2 rows, the same as prompt-only sampling."""
    counter = RowCounter(pipe.unet)
    try:
        pipe(generator=gen(0), num_images_per_prompt=2, kldb_guidance_scale=0.0, **KWARGS)
        prompt_only = (counter.calls, counter.rows)
        counter.calls = counter.rows = 0
        out = pipe(generator=gen(0), num_images_per_prompt=2, **KWARGS)
        shared = (counter.calls, counter.rows)
        counter.calls = counter.rows = 0
        out_detached = pipe(generator=gen(0), num_images_per_prompt=2, kldb_gradient="detached", **KWARGS)
        detached = (counter.calls, counter.rows)
    finally:
        counter.handle.remove()
    assert out.guided_updates == out_detached.guided_updates == 6
    assert prompt_only == (6, 24) and detached == (6, 24)
    # the 3 guided steps each run their batch as an unconditional and a conditional half
    assert shared == (9, 24)


def test_a_guided_first_step_recomputes_and_the_rest_share(pipe):
    """Before the first step ends the conditional rows are unknown: step 1 predicts again, the others share."""
    from kldb import KLDBGuidanceCallback, as_image_classifier

    classifier = as_image_classifier(pipe.classifier, pipe.classifier_processor)
    guidance = KLDBGuidanceCallback(classifier, [3, 2], guidance_scale=0.1, interval=1)
    counter = RowCounter(pipe.unet)
    try:
        with guidance.attached(pipe):
            pipe(prompt="three and two", num_inference_steps=4, generator=gen(0), num_images_per_prompt=2,
                 output_type="latent", callback_on_step_end=guidance)  # fmt: skip
    finally:
        counter.handle.remove()
    assert guidance.guided_updates == 8 and guidance.shared_forwards == 3
    # step 1: one call of 4 rows, then 2 rows again for the gradient; steps 2-4: two calls of 2 rows each
    assert (counter.calls, counter.rows) == (1 + 1 + 3 * 2, 4 + 2 + 3 * 4)


@pytest.mark.parametrize("case", ["detached", "autocast"])
def test_no_sharing_where_it_would_change_sampling(pipe, case):
    """Detached mode needs no UNet gradient; under autocast the sampler must keep its float32 noise prediction."""
    counter = RowCounter(pipe.unet)
    try:
        kwargs = {"kldb_gradient": "detached"} if case == "detached" else {"kldb_autocast_dtype": torch.bfloat16}
        out = pipe(generator=gen(0), num_images_per_prompt=2, **kwargs, **KWARGS)
    finally:
        counter.handle.remove()
    assert out.guided_updates == 6
    assert counter.calls == 6 + (0 if case == "detached" else 3)  # autocast: the prediction is made again


def test_shared_forward_with_cfg_switched_off_midway(pipe):
    """After diffusers' SDCFGCutoffCallback the batch is conditional only: the whole call runs with gradients.

    (SDCFGCutoffCallback itself supports one image per prompt only: it keeps ``prompt_embeds[-1:]``.)
    """
    from diffusers.callbacks import SDCFGCutoffCallback

    counter = RowCounter(pipe.unet)
    try:
        out = pipe(generator=gen(3), callback_on_step_end=SDCFGCutoffCallback(0.5),
                   **{**KWARGS, "num_inference_steps": 8})  # fmt: skip
    finally:
        counter.handle.remove()
    # the cutoff acts at the end of step 5 (step_index 4): steps 1-5 with CFG (guided 2, 4 split in two calls),
    # steps 6-8 without (guided 6, 8: one conditional call each, with gradients)
    assert out.guided_updates == 4 and out.skipped_updates == 0
    assert counter.calls == 8 + 2 and counter.rows == 5 * 2 + 3 * 1
