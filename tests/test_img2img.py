"""KLDBBoundaryPipeline from a user's image (`image=`, `strength=`): diffusers' img2img meaning, tested on tiny parts.

References: outputs of the pipeline stored before `image=` existed (commit 6c096cc), StableDiffusionPipeline with the
guidance callback, diffusers' StableDiffusionImg2ImgPipeline, the scheduler's own `add_noise`, a k-LMS step written
here, and the guidance step rebuilt from the pipeline module's gradient functions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import gen
from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.utils.torch_utils import randn_tensor

from kldb import ImageClassifier, KLDBBoundaryPipeline
from kldb.testing import tiny_components, tiny_pipeline
from pipeline_kldb_boundary import (
    KLDBGuidanceCallback,
    class_prompt,
    kldb_guidance_gradient,
    kldb_score,
    lms_scale_model_input,
    normalize_guidance_gradient,
)

CLASSES = [3, 2]
REFERENCE = Path(__file__).parent / "data" / "image_none_reference.npz"


@pytest.fixture(scope="module")
def pipe() -> KLDBBoundaryPipeline:
    return tiny_pipeline(seed=0)


def photo(seed: int = 0, batch: int | None = None, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    """A smooth random 'photo' in [0, 1]: ``(3, H, W)``, or ``(batch, 3, H, W)``."""
    shape = (batch or 1, 3, size[0] // 4, size[1] // 4)
    coarse = torch.rand(shape, generator=gen(seed))
    images = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    return images if batch is not None else images[0]


class Recorder(ModelHook):
    """Records each UNet call's input sample and output (a diffusers model hook, as the pipeline's own)."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def pre_forward(self, module, *args, **kwargs):
        self.inputs.append((args[0] if args else kwargs["sample"]).detach().clone())
        return args, kwargs

    def post_forward(self, module, output):
        self.outputs.append((output[0] if isinstance(output, tuple) else output.sample).detach().clone())
        return output


class recording:
    """``with recording(unet) as seen``: a :class:`Recorder` on ``unet`` for the block."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.registry = HookRegistry.check_if_exists_or_initialize(unet)
        self.hook = Recorder()

    def __enter__(self) -> Recorder:
        self.registry.register_hook(self.hook, "test_recorder")
        return self.hook

    def __exit__(self, *exc: object) -> None:
        self.registry.remove_hook("test_recorder")


def latents_per_step(record: dict[int, torch.Tensor]):
    def callback(pipeline, i, t, kw):
        record[i] = kw["latents"].clone()
        return kw

    return callback


def encoded_and_noised(pipe, image: torch.Tensor, generator, steps: int, strength: float, batch: int = 1):
    """The starting latent, computed here the way diffusers' img2img describes it, and the timesteps that run."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    t_start = steps - min(int(steps * strength), steps)
    scheduler.set_begin_index(t_start)
    pixels = (2 * image - 1).unsqueeze(0) if image.ndim == 3 else 2 * image - 1
    with torch.no_grad():
        encoded = pipe.vae.encode(pixels).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
    encoded = encoded.expand(batch, -1, -1, -1) if encoded.shape[0] == 1 else encoded
    noise = randn_tensor(encoded.shape, generator=generator)
    first = scheduler.timesteps[t_start : t_start + 1].repeat(encoded.shape[0])
    return scheduler.add_noise(encoded, noise, first), encoded, noise, scheduler, t_start


# ----------------------------------------------------------------------------------------------------------------------
# image=None is exactly the pipeline it was
# ----------------------------------------------------------------------------------------------------------------------


def test_without_image_the_outputs_are_those_stored_before_image_to_image_existed(pipe):
    """Guided runs in both gradient modes and with backtracking, bit for bit against outputs of commit 6c096cc.

    The tiny components' random weights depend on the library versions, so the stored outputs hold only in the
    environment that made them (recorded in the file); elsewhere (``make test-compat``) the test is skipped.
    """
    import diffusers
    import transformers

    reference = np.load(REFERENCE, allow_pickle=False)
    here = [
        f"torch=={torch.__version__}",
        f"diffusers=={diffusers.__version__}",
        f"transformers=={transformers.__version__}",
    ]
    if reference["versions"].tolist() != here:
        pytest.skip(f"reference outputs made with {reference['versions'].tolist()}, not {here}")
    for mode in ("unet", "detached"):
        out = pipe(
            classes=CLASSES, num_inference_steps=6, kldb_guidance_interval=2, kldb_gradient=mode, guidance_scale=5.0,
            kldb_guidance_scale=0.3, generator=gen(11), output_type="pt", num_images_per_prompt=2, image=None,
        )  # fmt: skip
        assert out.guided_updates == 6
        assert np.array_equal(out.images.numpy(), reference[f"{mode}_images"])
        assert np.array_equal(out.kldb.numpy(), reference[f"{mode}_kldb"])
        assert out.kldb_start is None and out.pixel_l2 is None and out.ssim is None
    out = pipe(
        classes=CLASSES, num_inference_steps=6, kldb_guidance_interval=3, guidance_scale=5.0, guidance_rescale=0.7,
        kldb_guidance_scale=0.2, kldb_step_control="backtracking", generator=gen(12), output_type="latent",
    )  # fmt: skip
    assert np.array_equal(out.images.numpy(), reference["backtracking_latents"])


def test_without_image_a_guided_call_is_stable_diffusion_with_the_guidance_callback():
    components = tiny_components(seed=0)
    ours = KLDBBoundaryPipeline(**components)
    sd = StableDiffusionPipeline(**{k: v for k, v in components.items() if not k.startswith("classifier")})
    for p in (ours, sd):
        p.set_progress_bar_config(disable=True)
    classifier = ImageClassifier.from_transformers(components["classifier"], components["classifier_processor"])
    common = {"num_inference_steps": 6, "guidance_scale": 5.0, "output_type": "pt"}
    got = ours(classes=CLASSES, kldb_guidance_scale=0.3, kldb_guidance_interval=2, generator=gen(5), **common)
    guidance = KLDBGuidanceCallback(classifier, CLASSES, guidance_scale=0.3, interval=2)
    with guidance.attached(sd):
        expected = sd(
            class_prompt(classifier.labels, CLASSES), generator=gen(5), callback_on_step_end=guidance, **common
        )
    assert guidance.guided_updates == got.guided_updates == 3
    assert torch.equal(got.images, expected.images)


# ----------------------------------------------------------------------------------------------------------------------
# The start: encode, noise to the first step run, run int(T * strength) steps
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_the_starting_latent_is_add_noise_of_the_encoded_image_at_the_first_step_run(pipe, strength):
    image, steps = photo(1), 8
    with recording(pipe.unet) as seen:
        out = pipe(
            image=image, strength=strength, num_inference_steps=steps, guidance_scale=5.0, generator=gen(3),
            output_type="latent", classes=CLASSES, kldb_guidance_scale=0.0,
        )  # fmt: skip
    start, *_, scheduler, t_start = encoded_and_noised(pipe, image, gen(3), steps, strength)
    assert len(seen.inputs) == int(steps * strength) and out.images.shape == (1, 4, 16, 16)
    sigma = scheduler.sigmas[t_start]
    expected_input = lms_scale_model_input(start, sigma)
    torch.testing.assert_close(seen.inputs[0], torch.cat([expected_input] * 2), rtol=0, atol=1e-6)  # (uncond, cond)


def test_a_generator_per_row_draws_each_row_s_encoding_and_noise(pipe):
    images = photo(2, batch=2)
    with recording(pipe.unet) as seen:
        pipe(
            image=images, strength=0.5, num_inference_steps=8, guidance_scale=1.0, generator=[gen(4), gen(5)],
            output_type="latent",
        )  # fmt: skip
    rows = [encoded_and_noised(pipe, images[i], gen(4 + i), 8, 0.5) for i in range(2)]
    start = torch.cat([row[0] for row in rows])
    sigma = rows[0][3].sigmas[rows[0][4]]
    torch.testing.assert_close(seen.inputs[0], lms_scale_model_input(start, sigma), rtol=0, atol=1e-6)


def test_strength_one_is_text_to_image_from_the_image_latents_plus_noise_at_the_first_sigma(pipe):
    """img2img at strength 1 runs all T steps from E(x) + sigma_0 * n, where E(x) is the image's (scaled) encoding and n
    the generator's noise drawn after it; text-to-image starts from init_noise_sigma * latents. So, with guidance:
    pipe(image=x, strength=1) == pipe(latents=(E(x) + sigma_0 * n) / init_noise_sigma)."""
    image, steps = photo(3), 6
    common = {
        "classes": CLASSES, "num_inference_steps": steps, "guidance_scale": 5.0, "kldb_guidance_scale": 0.3,
        "kldb_guidance_interval": 2, "output_type": "pt",
    }  # fmt: skip
    from_image = pipe(image=image, strength=1.0, generator=gen(6), **common)
    start, encoded, noise, scheduler, t_start = encoded_and_noised(pipe, image, gen(6), steps, 1.0)
    assert t_start == 0
    torch.testing.assert_close(start, encoded + scheduler.sigmas[0] * noise, rtol=0, atol=0)
    from_latents = pipe(latents=start / scheduler.init_noise_sigma, generator=gen(99), **common)
    assert from_image.guided_updates == from_latents.guided_updates == 3
    torch.testing.assert_close(from_image.images, from_latents.images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_image.kldb, from_latents.kldb, rtol=1e-4, atol=1e-5)
    assert (from_image.images - from_latents.images).abs().max() < 1e-4


def test_without_guidance_and_k_lms_history_it_is_diffusers_img2img_bit_for_bit():
    """With a scheduler whose step keeps no history (Euler), the image-to-image call without guidance is exactly
    diffusers' StableDiffusionImg2ImgPipeline: preprocessing, encoding, noise, the strength rule, the loop."""
    components = tiny_components(seed=0)
    euler = EulerDiscreteScheduler.from_config(components["scheduler"].config)
    ours = KLDBBoundaryPipeline(**{**components, "scheduler": euler})
    theirs = StableDiffusionImg2ImgPipeline(
        **{k: v for k, v in components.items() if not k.startswith("classifier")} | {"scheduler": euler}
    )
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    image = photo(4)
    for strength, steps, per_prompt in ((0.6, 10, 1), (0.35, 8, 2), (1.0, 5, 1)):
        kwargs = {
            "prompt": "three", "image": image, "strength": strength, "num_inference_steps": steps,
            "guidance_scale": 5.0, "num_images_per_prompt": per_prompt, "output_type": "pt",
        }  # fmt: skip
        steps_run: dict[int, torch.Tensor] = {}
        expected = theirs(**kwargs, generator=gen(7), callback_on_step_end=latents_per_step(steps_run))
        got = ours(**kwargs, generator=gen(7), kldb_guidance_scale=0.0)
        assert len(steps_run) == int(steps * strength)
        assert torch.equal(got.images, expected.images)


def test_k_lms_starts_its_multistep_at_order_one_at_the_first_step_run(pipe):
    """The first step run is an Euler step z_1 = z_0 + (sigma_{s+1} - sigma_s) * eps(z_0) (an epsilon model's
    derivative is eps), the second the 2-step Adams-Bashforth step on the two derivatives seen: not diffusers'
    img2img, whose first k-LMS steps use order-4 coefficients of steps that never ran (huggingface/diffusers#5630)."""
    steps, strength = 10, 0.5
    latents = {}
    with recording(pipe.unet) as seen:  # guidance_scale 1: no classifier-free guidance, eps is the UNet's output
        pipe(
            image=photo(5), strength=strength, num_inference_steps=steps, guidance_scale=1.0, generator=gen(8),
            output_type="latent", callback_on_step_end=latents_per_step(latents),
        )  # fmt: skip
    *_, scheduler, s = encoded_and_noised(pipe, photo(5), gen(8), steps, strength)
    sigmas = scheduler.sigmas.double()
    z0 = seen.inputs[0].double() * (sigmas[s] ** 2 + 1) ** 0.5
    eps0, eps1 = seen.outputs[0].double(), seen.outputs[1].double()
    euler = z0 + (sigmas[s + 1] - sigmas[s]) * eps0
    torch.testing.assert_close(latents[0].double(), euler, rtol=1e-5, atol=1e-5)
    # second step: integrate the line through (sigma_s, eps0), (sigma_{s+1}, eps1) from sigma_{s+1} to sigma_{s+2}
    a, b, c = sigmas[s], sigmas[s + 1], sigmas[s + 2]
    w1 = ((c - a) ** 2 - (b - a) ** 2) / (2 * (b - a))  # integral of (tau - a) / (b - a)
    w0 = (c - b) - w1
    expected = latents[0].double() + w1 * eps1 + w0 * eps0
    torch.testing.assert_close(latents[1].double(), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# The guidance counts from the first step run, at the noise levels of the steps run
# ----------------------------------------------------------------------------------------------------------------------


def test_guided_steps_count_from_the_first_step_run(pipe):
    """T = 10 at strength 0.6 runs 6 steps; with k = 5 the one guided step is the 5th run (schedule index 8), not
    schedule step 5 or 10."""
    common = {"image": photo(6), "strength": 0.6, "num_inference_steps": 10, "guidance_scale": 5.0, "classes": CLASSES}
    plain, guided = {}, {}
    pipe(**common, generator=gen(9), kldb_guidance_scale=0.0, callback_on_step_end=latents_per_step(plain))
    out = pipe(
        **common, generator=gen(9), kldb_guidance_scale=0.5, kldb_guidance_interval=5,
        callback_on_step_end=latents_per_step(guided),
    )  # fmt: skip
    assert out.guided_updates == 1 and out.skipped_updates == 0
    assert sorted(plain) == sorted(guided) == list(range(6))
    assert all(torch.equal(plain[i], guided[i]) for i in range(4))
    assert not torch.equal(plain[4], guided[4])


@pytest.mark.parametrize("mode", ["detached", "unet"])
def test_equation_2_at_an_image_to_image_step(pipe, mode):
    """Guided only at the last step run: final latents = unguided final latents - alpha * g*(z, sigma) with the
    latent z and noise level sigma of that step in the schedule (index t_start + 4 of 10)."""
    alpha, steps, strength = 0.3, 10, 0.5
    common = {
        "image": photo(7), "strength": strength, "num_inference_steps": steps, "guidance_scale": 5.0,
        "output_type": "latent", "prompt": "three and two",
    }  # fmt: skip
    seen = {}
    plain = pipe(**common, generator=gen(1), callback_on_step_end=latents_per_step(seen), kldb_guidance_scale=0).images
    guided = pipe(
        **common, generator=gen(1), classes=CLASSES, kldb_guidance_scale=alpha, kldb_guidance_interval=5,
        kldb_gradient=mode,
    )  # fmt: skip
    assert guided.guided_updates == 1 and guided.skipped_updates == 0
    *_, scheduler, t_start = encoded_and_noised(pipe, photo(7), gen(1), steps, strength)
    index = t_start + 4
    z, sigma, t = seen[3], float(scheduler.sigmas[index]), scheduler.timesteps[index]
    cond, _ = pipe.encode_prompt("three and two", "cpu", 1, False)

    def predict_eps(x):
        return pipe.unet(lms_scale_model_input(x, sigma), t, encoder_hidden_states=cond).sample

    classifier = ImageClassifier.from_transformers(pipe.classifier, pipe.classifier_processor)

    def decode(x0):
        return pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample

    if mode == "detached":
        with torch.no_grad():
            eps = predict_eps(z)
        grad, _ = kldb_guidance_gradient(z, sigma, CLASSES, decode, classifier, eps=eps)
    else:
        grad, _ = kldb_guidance_gradient(z, sigma, CLASSES, decode, classifier, predict_eps=predict_eps)
    g_star, ok = normalize_guidance_gradient(grad, z)
    assert ok.all()
    torch.testing.assert_close(guided.images, plain - alpha * g_star, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs: formats, batches, prompts
# ----------------------------------------------------------------------------------------------------------------------


def quantized(seed: int, batch: int = 1) -> np.ndarray:
    """``(batch, H, W, 3)`` float32 in [0, 1] on the 8-bit grid, so that PIL, numpy and torch forms agree exactly."""
    return np.round(photo(seed, batch=batch).permute(0, 2, 3, 1).numpy() * 255).astype(np.float32) / 255


def test_pil_numpy_and_tensor_inputs_give_the_same_result(pipe):
    array = quantized(10)  # (1, H, W, 3)
    forms = {
        "pil": PIL.Image.fromarray((array[0] * 255).round().astype(np.uint8)),
        "pil grayscale-free RGBA": PIL.Image.fromarray((array[0] * 255).round().astype(np.uint8)).convert("RGBA"),
        "array HWC": array[0],
        "array BHWC": array,
        "tensor CHW": torch.from_numpy(array[0]).permute(2, 0, 1),
        "tensor BCHW": torch.from_numpy(array).permute(0, 3, 1, 2),
        "list of tensors": [torch.from_numpy(array[0]).permute(2, 0, 1)],
    }
    common = {"strength": 0.5, "num_inference_steps": 6, "classes": CLASSES, "kldb_guidance_interval": 3}
    results = {name: pipe(image=form, generator=gen(11), output_type="pt", **common) for name, form in forms.items()}
    first = results["pil"]
    for name, out in results.items():
        assert torch.equal(out.images, first.images), name
        assert torch.equal(out.kldb_start, first.kldb_start), name


def test_a_batch_of_images_matches_each_image_alone(pipe):
    arrays = quantized(12, batch=2)
    common = {"strength": 0.5, "num_inference_steps": 6, "classes": CLASSES, "kldb_guidance_interval": 3}
    pils = [PIL.Image.fromarray((a * 255).round().astype(np.uint8)) for a in arrays]
    batch = pipe(image=pils, generator=[gen(20), gen(21)], output_type="pt", **common)
    as_array = pipe(image=arrays, generator=[gen(20), gen(21)], output_type="pt", **common)
    assert batch.images.shape == (2, 3, 32, 32) and batch.guided_updates == 2
    assert torch.equal(batch.images, as_array.images)
    for i in range(2):
        alone = pipe(image=pils[i], generator=gen(20 + i), output_type="pt", **common)
        torch.testing.assert_close(batch.images[i : i + 1], alone.images, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch.kldb_start[i : i + 1], alone.kldb_start, rtol=0, atol=1e-6)


def test_images_pair_with_prompts_and_repeat_per_prompt(pipe):
    """Two images with two prompts and two images per prompt: rows (image 0, image 0, image 1, image 1), as the
    prompts are repeated; one image serves every prompt."""
    images = photo(13, batch=2)
    out = pipe(
        image=images, prompt=["three", "two"], num_images_per_prompt=2, strength=0.5, num_inference_steps=4,
        generator=[gen(30 + i) for i in range(4)], output_type="pt",
    )  # fmt: skip
    for row, (index, prompt) in enumerate([(0, "three"), (0, "three"), (1, "two"), (1, "two")]):
        alone = pipe(
            image=images[index], prompt=prompt, strength=0.5, num_inference_steps=4, generator=gen(30 + row),
            output_type="pt",
        )  # fmt: skip
        torch.testing.assert_close(out.images[row : row + 1], alone.images, rtol=1e-5, atol=1e-5)
    one_image = pipe(image=images[0], prompt=["three", "two"], strength=0.5, num_inference_steps=4, output_type="pt")
    assert one_image.images.shape[0] == 2
    assert torch.equal(one_image.probabilities_start[0], one_image.probabilities_start[1])


def test_the_prompt_defaults_to_the_class_names_and_without_classes_to_empty(pipe):
    common = {"image": photo(14), "strength": 0.5, "num_inference_steps": 4, "output_type": "pt"}
    by_default = pipe(**common, classes=CLASSES, kldb_guidance_scale=0.0, generator=gen(2))
    explicit = pipe(**common, classes=CLASSES, prompt="three and two", kldb_guidance_scale=0.0, generator=gen(2))
    assert torch.equal(by_default.images, explicit.images)
    unconditional = pipe(**common, generator=gen(2))
    empty = pipe(**common, prompt="", generator=gen(2))
    assert torch.equal(unconditional.images, empty.images)
    assert not torch.equal(unconditional.images, by_default.images)


# ----------------------------------------------------------------------------------------------------------------------
# The output says how far each image moved
# ----------------------------------------------------------------------------------------------------------------------


def test_start_scores_and_distances_against_independent_references(pipe):
    from torchmetrics.functional.image import structural_similarity_index_measure

    array = quantized(15, batch=2)
    out = pipe(
        image=array, strength=0.6, num_inference_steps=5, classes=CLASSES, kldb_guidance_interval=3,
        generator=gen(3), output_type="pt",
    )  # fmt: skip
    inputs = torch.from_numpy(array).permute(0, 3, 1, 2)
    classifier = ImageClassifier.from_transformers(pipe.classifier, pipe.classifier_processor)
    with torch.no_grad():
        logits = classifier(inputs)
    torch.testing.assert_close(out.kldb_start, kldb_score(logits, CLASSES), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.probabilities_start, torch.softmax(logits, -1), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.predicted_class_start, logits.argmax(-1))
    returned = out.images.numpy().astype(np.float64)
    l2 = np.sqrt(((returned - inputs.numpy().astype(np.float64)) ** 2).reshape(2, -1).sum(axis=1))
    np.testing.assert_allclose(out.pixel_l2.numpy(), l2, rtol=1e-5)
    ssim = structural_similarity_index_measure(out.images, inputs, data_range=1.0, reduction="none")
    torch.testing.assert_close(out.ssim, ssim, rtol=1e-5, atol=1e-6)
    # other output types carry the same numbers (computed before the conversion)
    pil = pipe(
        image=array, strength=0.6, num_inference_steps=5, classes=CLASSES, kldb_guidance_interval=3,
        generator=gen(3), output_type="pil",
    )  # fmt: skip
    assert torch.equal(pil.pixel_l2, out.pixel_l2) and torch.equal(pil.kldb, out.kldb)
    # the tuple form has every field in order
    tup = pipe(image=array, strength=0.6, num_inference_steps=5, generator=gen(3), output_type="pt", return_dict=False)
    assert len(tup) == 18 and tup[-5] is None and tup[-2] is not None  # no classes: no kldb_start; pixel_l2


def test_identical_images_are_at_distance_zero_and_ssim_one():
    from pipeline_kldb_boundary import pixel_l2, structural_similarity

    images = photo(16, batch=2)
    assert pixel_l2(images, images).tolist() == [0.0, 0.0]
    torch.testing.assert_close(structural_similarity(images, images), torch.ones(2))
    with pytest.raises(ValueError, match=r"`images` and `references` to be tensors of one shape"):
        pixel_l2(images, images[:1])
    with pytest.raises(ValueError, match=r"`images` and `references` to be tensors of one shape"):
        structural_similarity(images, images[:1])


def test_without_torchmetrics_ssim_is_none_and_a_warning_says_how_to_install_it(pipe, monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "torchmetrics.functional.image", None)  # import fails as if not installed
    with caplog.at_level(logging.WARNING):
        out = pipe(image=photo(17), strength=0.5, num_inference_steps=4, output_type="pt")
    assert out.ssim is None and out.pixel_l2 is not None
    assert "pip install torchmetrics" in caplog.text


# ----------------------------------------------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"strength": 0.0}, ValueError, r"`strength` has to be a number in \(0, 1\] but is 0.0"),
        ({"strength": 1.5}, ValueError, r"`strength` has to be a number in \(0, 1\] but is 1.5"),
        ({"strength": -0.2}, ValueError, r"`strength` has to be a number in \(0, 1\] but is -0.2"),
        ({"strength": True}, ValueError, r"`strength` has to be a number in \(0, 1\] but is True"),
        ({"strength": "0.5"}, ValueError, r"`strength` has to be a number in \(0, 1\] but is '0.5'"),
        ({"strength": 0.1}, ValueError, r"`strength` \* `num_inference_steps` has to leave at least one step.*0.1 \* 4"),
        ({"latents": torch.zeros(1, 4, 16, 16)}, ValueError, r"`latents` and `image` were both given"),
        ({"image": torch.rand(3, 33, 32)}, ValueError, r"`image` to have a height and width divisible by the VAE "
         r"factor 2 but it is 33x32"),
        ({"image": PIL.Image.new("RGB", (31, 32))}, ValueError, r"divisible by the VAE factor 2 but it is 32x31"),
        ({"height": 64}, ValueError, r"`height` and `width` have to be the size of `image` \(32x32\) or None but are 64"),
        ({"image": "photo.png"}, TypeError, r"Expected argument `image` to be a PIL image.*but got str"),
        ({"image": []}, TypeError, r"Expected argument `image` to be a PIL image"),
        ({"image": [torch.rand(3, 32, 32), PIL.Image.new("RGB", (32, 32))]}, TypeError, r"but got a list of"),
        ({"image": np.zeros((32, 32, 3), dtype=np.uint8)}, ValueError, r"`image` to be .* but got ndarray of shape "
         r"\(32, 32, 3\) and dtype uint8"),
        ({"image": torch.rand(1, 32, 32)}, ValueError, r"but got Tensor of shape \(1, 32, 32\)"),
        ({"image": torch.rand(3, 32, 32) * 2 - 1}, ValueError, r"`image` to hold values in \[0, 1\] but they span"),
        ({"image": [torch.rand(3, 32, 32), torch.rand(3, 16, 16)]}, ValueError, r"images of one size but got sizes"),
        ({"image": torch.rand(3, 3, 32, 32), "prompt": ["a", "b"]}, ValueError, r"`image` holds 3 images but there "
         r"are 2 prompts"),
        ({"kldb_guidance_interval": 3, "strength": 0.5}, ValueError, r"`kldb_guidance_interval` has to be at most the "
         r"number of steps an image-to-image call runs, int\(num_inference_steps \* strength\) = 2, but is 3"),
        ({"kldb_guidance_scale": "auto"}, ValueError, r"`kldb_guidance_scale='auto'` is not available with `image`"),
        ({"generator": [gen(0)], "num_images_per_prompt": 2}, ValueError, r"list of generators of length 1"),
        ({"callback_steps": 1}, TypeError, r"Unexpected keyword arguments for a call with `image`: \['callback_steps'\]"),
    ],
)  # fmt: skip
def test_bad_image_inputs_are_refused_with_a_clear_error(pipe, kwargs, error, match):
    call = {
        "image": photo(0), "strength": 0.5, "num_inference_steps": 4, "classes": CLASSES, "output_type": "pt",
        "kldb_guidance_interval": 1,
    }  # fmt: skip
    call.update(kwargs)
    with pytest.raises(error, match=match):
        pipe(**call)


def test_strength_without_an_image_is_refused(pipe):
    with pytest.raises(ValueError, match=r"`strength` \(0.5\) was given without `image`"):
        pipe(classes=CLASSES, strength=0.5, num_inference_steps=2)
