"""KLDBBoundaryPipeline against StableDiffusionPipeline, Equation 2 by hand, and the diffusers contracts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MeanBrightnessClassifier, gen
from diffusers import DDIMScheduler, StableDiffusionPipeline

from kldb import ImageClassifier, KLDBBoundaryPipeline, KLDBBoundaryPipelineOutput
from kldb.testing import tiny_components
from pipeline_kldb_boundary import kldb_guidance_gradient, lms_scale_model_input, normalize_guidance_gradient

STEPS = 6


def test_alpha_zero_reproduces_stable_diffusion_bit_for_bit():
    components = tiny_components(seed=0)
    sd_components = {k: v for k, v in components.items() if k not in ("classifier", "classifier_processor")}
    sd = StableDiffusionPipeline(**sd_components)
    ours = KLDBBoundaryPipeline(**components)
    for pipe in (sd, ours):
        pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": ["three and two", "one"], "num_inference_steps": STEPS, "guidance_scale": 6.0}
    for output_type in ("np", "pt", "latent"):
        expected = sd(**kwargs, generator=gen(3), output_type=output_type).images
        got = ours(**kwargs, generator=gen(3), output_type=output_type, kldb_guidance_scale=0.0).images
        if output_type in ("pt", "latent"):
            assert torch.equal(got, expected)
        else:
            assert np.array_equal(got, expected)
    # PIL too, and with guidance_rescale (Lin et al.) and trailing timesteps
    for pipe in (sd, ours):
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pil_sd = sd(**kwargs, generator=gen(4), guidance_rescale=0.7).images
    pil_ours = ours(**kwargs, generator=gen(4), guidance_rescale=0.7, classes=[3, 2], kldb_guidance_scale=0).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pil_sd, pil_ours))


def test_determinism(tiny_pipe):
    kwargs = {"classes": [3, 2], "num_inference_steps": STEPS, "output_type": "pt", "kldb_guidance_interval": 2}
    a = tiny_pipe(generator=gen(7), **kwargs)
    b = tiny_pipe(generator=gen(7), **kwargs)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.kldb, b.kldb)
    assert a.guided_updates == b.guided_updates == 3


@pytest.mark.parametrize("mode", ["detached", "unet"])
def test_equation_2_by_hand(tiny_pipe, mode):
    """Guided only at the last step: final latents = unguided final latents - alpha * g*(z_{T-1}, sigma_{T-1})."""
    alpha = 0.3
    seen = {}

    def record(pipe, i, t, kw):
        seen[i] = kw["latents"].clone()
        return kw

    common = {"prompt": "three and two", "num_inference_steps": STEPS, "output_type": "latent", "guidance_scale": 5.0}
    plain = tiny_pipe(**common, generator=gen(1), callback_on_step_end=record, kldb_guidance_scale=0).images
    guided = tiny_pipe(
        **common, generator=gen(1), classes=[3, 2], kldb_guidance_scale=alpha, kldb_guidance_interval=STEPS,
        kldb_gradient=mode,
    )  # fmt: skip
    assert guided.guided_updates == 1 and guided.skipped_updates == 0

    # independent reconstruction of the guidance step at z_{T-1}
    z = seen[STEPS - 2]
    sched = tiny_pipe.scheduler
    sigma = float(sched.sigmas[STEPS - 1])
    t = sched.timesteps[STEPS - 1]
    cond, _ = tiny_pipe.encode_prompt("three and two", "cpu", 1, False)

    def predict_eps(x):
        return tiny_pipe.unet(lms_scale_model_input(x, sigma), t, encoder_hidden_states=cond).sample

    classifier = ImageClassifier.from_transformers(tiny_pipe.classifier, tiny_pipe.classifier_processor)
    vae = tiny_pipe.vae

    def decode(x0):
        return vae.decode(x0 / vae.config.scaling_factor).sample

    if mode == "detached":
        with torch.no_grad():
            eps = predict_eps(z)
        grad, _ = kldb_guidance_gradient(z, sigma, [3, 2], decode, classifier, eps=eps)
    else:
        grad, _ = kldb_guidance_gradient(z, sigma, [3, 2], decode, classifier, predict_eps=predict_eps)
    g_star, ok = normalize_guidance_gradient(grad, z)
    assert ok.all()
    expected = plain - alpha * g_star
    torch.testing.assert_close(guided.images, expected, rtol=1e-4, atol=1e-5)
    # the per-sample norm of the step is alpha * ||z||
    step = (plain - guided.images).flatten(1).norm(dim=1)
    torch.testing.assert_close(step, alpha * z.flatten(1).norm(dim=1), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("mode", ["detached", "unet"])
def test_guidance_lowers_kldb_of_an_analytic_classifier(mode):
    """Mean-brightness classifier (boundary at mean 0.5): guided samples sit closer to it than prompt-only ones."""
    pipe = KLDBBoundaryPipeline(**tiny_components(seed=0, with_classifier=False))
    pipe.set_progress_bar_config(disable=True)
    classifier = MeanBrightnessClassifier()
    kwargs = {
        "prompt": "a handwritten three",
        "classes": ["dark", "bright"],
        "classifier": classifier,
        "num_inference_steps": 10,
        "kldb_guidance_interval": 2,
        "num_images_per_prompt": 8,
        "output_type": "pt",
        "kldb_gradient": mode,
    }
    base = pipe(generator=gen(0), kldb_guidance_scale=0.0, **kwargs)
    guided = pipe(generator=gen(0), kldb_guidance_scale=0.2, **kwargs)
    assert guided.skipped_updates == 0 and guided.guided_updates == 8 * 5
    # the closed-form boundary: guided images' mean brightness is nearer 0.5
    base_gap = (base.images.mean(dim=(1, 2, 3)) - 0.5).abs()
    guided_gap = (guided.images.mean(dim=(1, 2, 3)) - 0.5).abs()
    assert guided_gap.median() < 0.5 * base_gap.median()
    assert guided.kldb.median() < 0.5 * base.kldb.median()


def test_output_fields(tiny_pipe):
    """What the output holds (dict against tuple, field for field: tests/test_diffusers_contract.py)."""
    kwargs = {"classes": [1, 2], "num_inference_steps": 4, "output_type": "np", "kldb_guidance_interval": 2}
    out = tiny_pipe(generator=gen(0), **kwargs)
    assert isinstance(out, KLDBBoundaryPipelineOutput)
    assert out.nsfw_content_detected is None and out.skipped_updates == 0 and out.guided_updates == 2
    assert out.accepted_steps.tolist() == [2] and out.step_halvings.tolist() == out.rejected_steps.tolist() == [0]
    assert out.auto_guidance is None
    assert out.images.shape == (1, 32, 32, 3)
    assert out.probabilities.shape == (1, 4) and torch.allclose(out.probabilities.sum(-1), torch.ones(1))
    assert out.predicted_class.tolist() == out.probabilities.argmax(-1).tolist()
    assert out.classes == [1, 2]


def test_metrics_are_those_of_the_returned_images(tiny_pipe):
    out = tiny_pipe(classes=[0, 3], num_inference_steps=4, generator=gen(5), output_type="pt", kldb_guidance_interval=2)
    classifier = ImageClassifier.from_transformers(tiny_pipe.classifier, tiny_pipe.classifier_processor)
    with torch.no_grad():
        logits = classifier(out.images)
    assert torch.allclose(out.probabilities, torch.softmax(logits, -1))
    from kldb import entropy, kldb_score

    assert torch.allclose(out.kldb, kldb_score(logits, [0, 3]))
    assert torch.allclose(out.entropy, entropy(logits))


def test_batch_matches_single(tiny_pipe):
    kwargs = {"classes": [3, 2], "num_inference_steps": STEPS, "output_type": "pt", "kldb_guidance_interval": 2}
    batch = tiny_pipe(prompt=["three", "two"], generator=[gen(10), gen(11)], **kwargs)
    singles = [tiny_pipe(prompt=p, generator=gen(s), **kwargs) for p, s in (("three", 10), ("two", 11))]
    for i, single in enumerate(singles):
        torch.testing.assert_close(batch.images[i : i + 1], single.images, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batch.kldb[i : i + 1], single.kldb, rtol=1e-3, atol=1e-4)
    assert batch.guided_updates == 2 * 3


def test_num_images_per_prompt(tiny_pipe):
    out = tiny_pipe(
        prompt=["three", "two"], num_images_per_prompt=3, classes=[3, 2], num_inference_steps=4, generator=gen(0),
        output_type="pt", kldb_guidance_interval=2,
    )  # fmt: skip
    assert out.images.shape == (6, 3, 32, 32) and out.kldb.shape == (6,)
    assert out.guided_updates == 6 * 2


def test_interval_one_guides_the_first_step(tiny_pipe):
    kwargs = {"classes": [3, 2], "num_inference_steps": 4, "output_type": "pt", "kldb_guidance_interval": 1}
    out = tiny_pipe(generator=gen(0), **kwargs)
    assert out.guided_updates == 4
    # the initial noise drawn by the pipeline is the one StableDiffusionPipeline would draw
    base = tiny_pipe(generator=gen(0), **{**kwargs, "kldb_guidance_scale": 0.0})
    assert not torch.equal(out.images, base.images)
    noise = torch.randn((1, 4, 16, 16), generator=gen(0))
    again = tiny_pipe(generator=gen(99), latents=noise, **kwargs)
    assert torch.equal(again.images, out.images)


def test_user_callback_runs_at_every_step_and_can_change_latents(tiny_pipe):
    calls = []

    def zero_latents(pipe, i, t, kw):
        calls.append(i)
        return {"latents": torch.zeros_like(kw["latents"])} if i == STEPS - 1 else kw

    kwargs = {"classes": [3, 2], "num_inference_steps": STEPS, "output_type": "latent", "kldb_guidance_interval": 2}
    changed = tiny_pipe(generator=gen(0), callback_on_step_end=zero_latents, **kwargs)
    assert calls == list(range(STEPS))
    assert torch.equal(changed.images, torch.zeros_like(changed.images))  # its return is final, after the guidance
    assert changed.guided_updates == 3


def test_classes_by_name_build_the_paper_prompt(tiny_pipe):
    kwargs = {"num_inference_steps": 4, "output_type": "pt", "kldb_guidance_scale": 0.0}
    by_name = tiny_pipe(classes=["three", "Two"], generator=gen(0), **kwargs)
    explicit = tiny_pipe(prompt="three and two", classes=[3, 2], generator=gen(0), **kwargs)
    assert torch.equal(by_name.images, explicit.images)
    assert by_name.classes == [3, 2]


def test_save_load_round_trip(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path)
    loaded = KLDBBoundaryPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.classifier).__name__ == "ResNetForImageClassification"
    kwargs = {"classes": [3, 2], "num_inference_steps": 4, "output_type": "pt", "kldb_guidance_interval": 2}
    a = tiny_pipe(generator=gen(0), **kwargs)
    b = loaded(generator=gen(0), **kwargs)
    # equal up to float rounding: transformers may pick another attention kernel for a loaded text encoder
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.kldb, b.kldb, rtol=1e-4, atol=1e-5)


def test_classifier_at_from_pretrained_and_per_call(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path)
    classifier = MeanBrightnessClassifier()
    loaded = KLDBBoundaryPipeline.from_pretrained(tmp_path, classifier=classifier)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.classifier, ImageClassifier) and loaded.classifier.model is classifier
    assert loaded.device.type == "cpu"
    out = loaded(
        classes=["dark", "bright"], prompt="three", num_inference_steps=4, output_type="pt", generator=gen(0),
        kldb_guidance_interval=2,
    )  # fmt: skip
    assert out.probabilities.shape == (1, 2)
    per_call = tiny_pipe(
        classes=[0, 1], prompt="three", classifier=classifier, num_inference_steps=4, output_type="pt",
        generator=gen(0), kldb_guidance_interval=2,
    )  # fmt: skip
    assert per_call.probabilities.shape == (1, 2)


def test_a_non_lms_scheduler_is_kept_and_samples_as_stable_diffusion_without_guidance():
    components = tiny_components(seed=0)
    components["scheduler"] = DDIMScheduler.from_config(components["scheduler"].config)
    pipe = KLDBBoundaryPipeline(**components)
    sd = StableDiffusionPipeline(**{k: v for k, v in components.items() if not k.startswith("classifier")})
    assert pipe.scheduler is components["scheduler"]
    common = {"prompt": "three and two", "num_inference_steps": 4, "output_type": "pt", "guidance_scale": 5.0}
    expected = sd(**common, generator=gen(2)).images
    for kwargs in ({"kldb_guidance_scale": 0.0, "classes": [3, 2]}, {}):  # alpha 0, or no classes
        out = pipe(**common, generator=gen(2), **kwargs)
        assert torch.equal(out.images, expected) and out.guided_updates == 0
        assert out.probabilities.shape == (1, 4)  # the images are still scored


def test_set_lms_scheduler_with_karras_sigmas(tiny_pipe):
    """The guided call runs on Karras et al. (2022)'s sigmas, eq. (5) with rho = 7, between the sigmas of the first and
    last "trailing" timesteps (999 and 199 for 5 steps)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2  # SD's scaled_linear schedule
    alphas_cumprod = np.cumprod(1 - betas)
    train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    ramp = np.linspace(0, 1, 5)
    rho, low, high = 7.0, train_sigmas[199], train_sigmas[999]
    expected = (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho
    seen = []

    def record_sigma(pipe, i, t, kw):
        seen.append(float(pipe.scheduler.sigmas[i]))
        return kw

    tiny_pipe.set_lms_scheduler(timestep_spacing="trailing", use_karras_sigmas=True)
    try:
        assert tiny_pipe.scheduler.config.timestep_spacing == "trailing"
        out = tiny_pipe(classes=[3, 2], num_inference_steps=5, generator=gen(0), output_type="pt",
                        callback_on_step_end=record_sigma)  # fmt: skip
        assert torch.isfinite(out.images).all() and out.guided_updates == 1
        np.testing.assert_allclose(seen, expected, rtol=1e-4)
        np.testing.assert_allclose(tiny_pipe.scheduler.sigmas[:-1].numpy(), expected, rtol=1e-4)
    finally:
        tiny_pipe.set_lms_scheduler(timestep_spacing="linspace", use_karras_sigmas=False)

