"""KLDBGuidanceCallback: Equation 2 over whole runs against a loop written here, the model hook, per-call state.

The reference loop follows the paper's order at a guided step: the gradient at z_t through the conditional noise
prediction (or without its Jacobian, "detached"), the correction of z_t, then the k-LMS step with the classifier-free
guidance noise taken at the uncorrected z_t.
"""

from __future__ import annotations

import pytest
import torch
from conftest import gen
from diffusers import LMSDiscreteScheduler, StableDiffusionPipeline
from diffusers.callbacks import SDCFGCutoffCallback
from diffusers.hooks import HookRegistry

from kldb.testing import tiny_components
from pipeline_kldb_boundary import (
    ImageClassifier,
    KLDBBoundaryPipeline,
    KLDBGuidanceCallback,
    KLDBUNetHook,
    kldb_score,
)

PROMPT = "three and two"
CLASSES = [3, 2]
BETA = 5.0


@pytest.fixture(scope="module")
def parts():
    components = tiny_components(seed=0)
    ours = KLDBBoundaryPipeline(**components)
    sd = StableDiffusionPipeline(**{k: v for k, v in components.items() if not k.startswith("classifier")})
    for pipe in (ours, sd):
        pipe.set_progress_bar_config(disable=True)
    classifier = ImageClassifier.from_transformers(components["classifier"], components["classifier_processor"])
    return ours, sd, classifier


def reference_loop(pipe, classifier, noise, steps, interval, alpha, mode):
    """Guided k-LMS sampling written out step by step (the authors' order), returning the final latents."""
    scheduler = LMSDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", noise.shape[0], True)
    unet, vae = pipe.unet, pipe.vae
    z = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[i])
        c = (sigma**2 + 1) ** 0.5
        with torch.no_grad():
            eps_uncond, eps_cond = unet(torch.cat([z, z]) / c, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        eps = eps_uncond + BETA * (eps_cond - eps_uncond)
        z_step = z
        if (i + 1) % interval == 0:
            zg = z.detach().requires_grad_(True)
            with torch.enable_grad():
                e = unet(zg / c, t, encoder_hidden_states=cond).sample if mode == "unet" else eps_cond
                x0 = zg - sigma * e
                images = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
                loss = kldb_score(classifier(images), CLASSES).sum()
                (g,) = torch.autograd.grad(loss, zg)
            g_star = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * z.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            z_step = z - alpha * g_star
        with torch.no_grad():
            z = scheduler.step(eps, t, z_step).prev_sample
    return z


@pytest.mark.parametrize(("mode", "steps", "interval"), [("unet", 40, 5), ("detached", 40, 5), ("unet", 8, 1)])
def test_whole_run_equals_the_reference_loop(parts, mode, steps, interval):
    ours, _, classifier = parts
    noise = torch.randn(2, 4, 16, 16, generator=gen(11))
    expected = reference_loop(ours, classifier, noise, steps, interval, 0.2, mode)
    out = ours(
        prompt=PROMPT, classes=CLASSES, latents=noise, num_inference_steps=steps, guidance_scale=BETA,
        kldb_guidance_scale=0.2, kldb_guidance_interval=interval, kldb_gradient=mode, output_type="latent",
        num_images_per_prompt=2,
    )  # fmt: skip
    assert out.guided_updates == 2 * (steps // interval) and out.skipped_updates == 0
    unguided = ours(prompt=PROMPT, latents=noise, num_inference_steps=steps, guidance_scale=BETA,
                    output_type="latent", num_images_per_prompt=2)  # fmt: skip
    assert (expected - unguided.images).abs().max() > 1e-2  # the guidance moved the latents: the test can fail
    torch.testing.assert_close(out.images, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["unet", "detached"])
def test_callback_alone_on_stable_diffusion_gives_the_pipeline_images(parts, mode):
    ours, sd, classifier = parts
    common = {"prompt": PROMPT, "num_inference_steps": 6, "output_type": "pt", "guidance_scale": BETA}
    callback = KLDBGuidanceCallback(classifier, CLASSES, guidance_scale=0.2, interval=2, gradient=mode)
    alone = sd(**common, generator=gen(4), callback_on_step_end=callback).images
    assert callback.guided_updates == 3 and callback.skipped_updates == 0
    guided = ours(**common, generator=gen(4), classes=CLASSES, kldb_guidance_scale=0.2, kldb_guidance_interval=2,
                  kldb_gradient=mode)  # fmt: skip
    torch.testing.assert_close(alone, guided.images, rtol=0, atol=1e-5)
    plain = sd(**common, generator=gen(4)).images
    assert (plain - alone).abs().max() > 1e-3
    assert KLDBUNetHook.on(sd.unet).guidance is None  # detached at the end of the call


@pytest.mark.parametrize("interval", [1, 5])
@pytest.mark.parametrize("attach", [False, True])
def test_a_reused_callback_gives_a_fresh_ones_images(parts, interval, attach):
    _, sd, classifier = parts
    common = {"prompt": PROMPT, "num_inference_steps": 10, "output_type": "pt", "guidance_scale": BETA}

    def run(callback, seed):
        if attach:
            with callback.attached(sd):
                return sd(**common, generator=gen(seed), callback_on_step_end=callback).images
        return sd(**common, generator=gen(seed), callback_on_step_end=callback).images

    reused = KLDBGuidanceCallback(classifier, CLASSES, guidance_scale=0.3, interval=interval)
    run(reused, 1)
    first_counts = (reused.guided_updates, reused.skipped_updates)
    again = run(reused, 2)
    fresh = KLDBGuidanceCallback(classifier, CLASSES, guidance_scale=0.3, interval=interval)
    expected = run(fresh, 2)
    assert torch.equal(again, expected)
    assert (reused.guided_updates, reused.skipped_updates) == (fresh.guided_updates, fresh.skipped_updates)
    assert first_counts == (fresh.guided_updates, fresh.skipped_updates)  # counts are per call, not accumulated
    # alone, the first step's UNet call is not seen: with interval 1 it is skipped (and said so), unless attached
    assert fresh.skipped_updates == (1 if interval == 1 and not attach else 0)


def test_user_callback_has_the_last_word(parts):
    """diffusers' `test_callback_inputs` scenario: zeroing the latents at the last (guided) step gives zeros."""
    ours, _, _ = parts
    seen = []

    def zero_at_last_step(pipe, i, t, callback_kwargs):
        seen.append(callback_kwargs["latents"].clone())
        if i == pipe.num_timesteps - 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    kwargs = {"classes": CLASSES, "num_inference_steps": 4, "kldb_guidance_interval": 2, "output_type": "latent"}
    out = ours(generator=gen(0), callback_on_step_end=zero_at_last_step,
               callback_on_step_end_tensor_inputs=ours._callback_tensor_inputs, **kwargs)  # fmt: skip
    assert out.guided_updates == 2
    assert torch.equal(out.images, torch.zeros_like(out.images))
    # the user's callback sees the guided latents: what it saw at the last step is the guided pipeline's result
    guided = ours(generator=gen(0), **kwargs).images
    torch.testing.assert_close(seen[-1], guided, rtol=0, atol=0)


def test_a_callback_that_returns_nothing_is_refused(parts):
    ours, _, _ = parts
    with pytest.raises(TypeError, match=r"Expected `callback_on_step_end` to return a dict of tensors .* but it returned NoneType"):
        ours(classes=CLASSES, num_inference_steps=2, kldb_guidance_interval=1, generator=gen(0), output_type="latent",
             callback_on_step_end=lambda pipe, i, t, kw: None)  # fmt: skip


def test_gradient_uses_what_the_step_used_after_cfg_is_switched_off(parts):
    """After SDCFGCutoffCallback the steps run conditional-only; the guidance takes its rows from the UNet call."""
    ours, _, classifier = parts
    kwargs = {"prompt": PROMPT, "num_inference_steps": 8, "output_type": "latent", "guidance_scale": BETA}
    cutoff = ours(**kwargs, generator=gen(3), classes=CLASSES, kldb_guidance_interval=2,
                  callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=4))  # fmt: skip
    assert cutoff.guided_updates == 4 and cutoff.skipped_updates == 0
    # the same run with the guidance's gradient taken by hand: after the cutoff (end of step 5) the UNet gets the
    # conditional embedding alone, so conditional rows = all rows
    noise = torch.randn(1, 4, 16, 16, generator=gen(3))
    scheduler = LMSDiscreteScheduler.from_config(ours.scheduler.config)
    scheduler.set_timesteps(8)
    cond, uncond = ours.encode_prompt(PROMPT, "cpu", 1, True)
    z = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[i])
        c = (sigma**2 + 1) ** 0.5
        with torch.no_grad():
            if i <= 4:
                eu, ec = ours.unet(torch.cat([z, z]) / c, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
                eps = eu + BETA * (ec - eu)
            else:
                eps = ours.unet(z / c, t, encoder_hidden_states=cond).sample
        z_step = z
        if (i + 1) % 2 == 0:
            zg = z.detach().requires_grad_(True)
            with torch.enable_grad():
                x0 = zg - sigma * ours.unet(zg / c, t, encoder_hidden_states=cond).sample
                images = (ours.vae.decode(x0 / ours.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
                (g,) = torch.autograd.grad(kldb_score(classifier(images), CLASSES).sum(), zg)
            z_step = z - 0.1 * g / g.norm() * z.norm()
        with torch.no_grad():
            z = scheduler.step(eps, t, z_step).prev_sample
    torch.testing.assert_close(cutoff.images, z, rtol=1e-4, atol=1e-4)


def test_the_hook_is_registered_through_diffusers_hook_registry(parts):
    ours, _, _ = parts
    registry = HookRegistry.check_if_exists_or_initialize(ours.unet)
    hook = registry.get_hook(KLDBUNetHook.name)
    assert isinstance(hook, KLDBUNetHook) and hook.guidance is None
    seen = []

    class Spy(KLDBGuidanceCallback):
        def unet_forward(self, forward, args, kwargs):
            seen.append(self)
            return super().unet_forward(forward, args, kwargs)

    spy = Spy(ImageClassifier.from_transformers(ours.classifier, ours.classifier_processor), CLASSES, interval=2)
    with spy.attached(ours):
        assert hook.guidance is spy
        ours(prompt=PROMPT, num_inference_steps=4, generator=gen(0), output_type="latent", callback_on_step_end=spy)
    assert len(seen) == 4 and hook.guidance is None and spy.guided_updates == 2


def test_the_hook_passes_through_after_a_failed_call(parts):
    ours, sd, _ = parts

    def failing(images):
        raise RuntimeError("classifier failed")

    with pytest.raises(RuntimeError, match="classifier failed"):
        ours(classes=[0, 1], classifier=failing, num_inference_steps=4, kldb_guidance_interval=2, generator=gen(0))
    assert KLDBUNetHook.on(ours.unet).guidance is None
    common = {"prompt": PROMPT, "num_inference_steps": 4, "output_type": "pt", "generator": gen(0)}
    expected = sd(**common).images
    common["generator"] = gen(0)
    assert torch.equal(ours(**common, kldb_guidance_scale=0).images, expected)


def test_a_second_explicitly_attached_guidance_is_refused(parts):
    ours, _, classifier = parts
    first = KLDBGuidanceCallback(classifier, CLASSES)
    second = KLDBGuidanceCallback(classifier, CLASSES)
    with (
        first.attached(ours),
        pytest.raises(ValueError, match="Another KLDBGuidanceCallback is already attached"),
        second.attached(ours),
    ):
        pass


def test_conditional_rows_are_told_apart_by_content_not_order():
    rows = KLDBGuidanceCallback._conditional_rows
    negative = torch.zeros(2, 3, 4)
    positive = torch.ones(2, 3, 4)
    assert rows(torch.cat([negative, positive]), negative, 2) == slice(2, 4)
    assert rows(torch.cat([positive, negative]), negative, 2) == slice(0, 2)
    assert rows(positive, negative, 2) == slice(0, 2)  # classifier-free guidance off: every row is conditional
    assert rows(torch.cat([positive, positive]), negative, 2) is None  # neither half is the negative: unknown
    assert rows(torch.cat([negative, positive]), None, 2) is None
    assert rows(torch.cat([negative, positive]), negative, None) is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"interval": 0}, ValueError, r"Expected argument `interval` to be a positive integer but got 0"),
        ({"guidance_scale": -1.0}, ValueError, r"Expected argument `guidance_scale` to be finite and >= 0 but got -1.0"),
        ({"guidance_scale": "0.1"}, TypeError, r"Expected argument `guidance_scale` to be a float but got '0.1'"),
        ({"classes": []}, ValueError, r"Expected argument `classes` to be a non-empty sequence of distinct class indices but got \[\]"),
        ({"classes": [3, 3]}, ValueError, r"distinct class indices but got \[3, 3\]"),
        ({"classes": "three"}, ValueError, r"distinct class indices but got 'three'"),
        ({"classifier": "resnet"}, TypeError, r"Expected argument `classifier` to be a callable mapping images to logits but got str"),
    ],
)
def test_bad_callback_arguments(parts, kwargs, error, match):
    _, _, classifier = parts
    with pytest.raises(error, match=match):
        KLDBGuidanceCallback(**{"classifier": classifier, "classes": CLASSES, **kwargs})


def test_a_classifier_returning_too_few_rows_is_refused(parts):
    ours, _, _ = parts

    class FirstImageOnly(torch.nn.Module):
        def forward(self, images):
            return torch.stack([images.mean(dim=(1, 2, 3)), -images.mean(dim=(1, 2, 3))], dim=1)[:1]

    with pytest.raises(ValueError, match=r"Expected the `classifier` to return logits for each of the 2 images it was given but it returned 1 rows"):
        ours(classes=[0, 1], classifier=FirstImageOnly(), prompt=PROMPT, num_inference_steps=2, kldb_guidance_interval=1,
             generator=gen(0))  # fmt: skip


def test_shapes_that_disagree_are_refused():
    from pipeline_kldb_boundary import kldb_guidance_gradient, normalize_guidance_gradient

    z = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"Expected argument `eps` to have the shape of `z` \(2, 4, 8, 8\) but got \(1, 4, 8, 8\)"):
        kldb_guidance_gradient(z, 1.0, [0, 1], lambda x: x, lambda x: x, eps=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"Expected argument `grad` to have the shape of `z` \(2, 4, 8, 8\) but got \(2, 4, 8\)"):
        normalize_guidance_gradient(torch.zeros(2, 4, 8), z)
