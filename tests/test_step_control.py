"""Step-size control (`kldb_step_control`) against a loop written here: accept, halve and reject as specified.

One guided step (the last), "detached" gradient, an analytic mean-brightness classifier whose boundary lies among the
unguided images (so that some steps overshoot it): the reference takes the last step's input latent and conditional
noise prediction from an unguided run, computes g* and the KLDB by hand, and applies each control's rule per image.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MeanBrightnessClassifier, gen

from kldb.testing import tiny_components
from pipeline_kldb_boundary import KLDBBoundaryPipeline, kldb_score

STEPS = 4
PROMPT = "three"


class ShiftedBrightness(MeanBrightnessClassifier):
    """Two classes split at mean brightness ``bias``: logits = (-w, +w) * (mean(image) - bias)."""

    def __init__(self, bias: float):
        super().__init__()
        self.bias = bias

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = images.mean(dim=(1, 2, 3)) - self.bias  # (B,)
        return torch.stack([-self.weight * m, self.weight * m], dim=1)


@pytest.fixture(scope="module")
def pipe():
    pipeline = KLDBBoundaryPipeline(**tiny_components(seed=0, with_classifier=False))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def classifier(pipe):
    """The boundary at the median brightness of the four unguided images: two sit just beside it."""
    images = pipe(prompt=PROMPT, num_inference_steps=STEPS, num_images_per_prompt=4, generator=gen(1),
                  output_type="pt", kldb_guidance_scale=0).images  # fmt: skip
    return ShiftedBrightness(float(images.mean(dim=(1, 2, 3)).median())).eval()


def reference(pipe, classifier, alpha, control, max_halvings=3, trust_radius=0.1, temperature=0.5):
    """Final latents and per-image (accepted, halvings, rejected) of one guided last step, by hand."""
    seen = {}

    def keep(p, i, t, kw):
        seen[i] = kw["latents"].clone()
        return kw

    common = {"prompt": PROMPT, "num_inference_steps": STEPS, "output_type": "latent", "num_images_per_prompt": 4}
    plain = pipe(**common, generator=gen(1), callback_on_step_end=keep, kldb_guidance_scale=0).images
    z = seen[STEPS - 2]
    sigma, t = float(pipe.scheduler.sigmas[STEPS - 1]), pipe.scheduler.timesteps[STEPS - 1]
    cond, _ = pipe.encode_prompt(PROMPT, "cpu", 4, False)
    c = (sigma**2 + 1) ** 0.5
    with torch.no_grad():
        eps = pipe.unet(z / c, t, encoder_hidden_states=cond).sample

    def kldb_of(x0):
        images = (pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        return kldb_score(classifier(images), [0, 1]), torch.softmax(classifier(images), dim=-1)

    zg = z.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, _ = kldb_of(zg - sigma * eps)
        (g,) = torch.autograd.grad(loss.sum(), zg)
    g_star = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * z.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    x0 = z - sigma * eps
    with torch.no_grad():
        kldb0, p0 = kldb_of(x0)
        final, counts = plain.clone(), []
        for i in range(4):
            a, halvings, accepted = alpha, 0, control in ("fixed", "kldb_scaled")
            if control == "kldb_scaled":
                a = alpha * min(1.0, float(kldb0[i]) / temperature)
            for attempt in range(max_halvings + 1 if not accepted else 0):
                k, p = kldb_of(x0[i : i + 1] - a * g_star[i : i + 1])
                good = k[0] < kldb0[i] if control == "backtracking" else 0.5 * (p - p0[i]).abs().sum() <= trust_radius
                if good:
                    accepted = True
                    break
                if attempt < max_halvings:
                    a, halvings = a / 2, halvings + 1
            if accepted:
                final[i] = plain[i] - a * g_star[i]
            counts.append((int(accepted), halvings, int(not accepted)))
    return final, counts


@pytest.mark.parametrize(
    ("control", "alpha", "options"),
    [
        ("fixed", 0.05, {}),
        ("backtracking", 0.05, {}),  # accepted at once, after halvings, and rejected after 3 halvings
        ("backtracking", 0.2, {"max_halvings": 1}),
        ("trust_region", 0.05, {"trust_radius": 0.05}),
        ("trust_region", 0.5, {"trust_radius": 0.2, "max_halvings": 2}),
        ("kldb_scaled", 0.2, {"temperature": 2.0}),
    ],
)
def test_step_control_matches_the_hand_written_rule(pipe, classifier, control, alpha, options):
    expected, counts = reference(pipe, classifier, alpha, control, **options)
    names = {"max_halvings": "kldb_max_halvings", "trust_radius": "kldb_trust_radius", "temperature": "kldb_step_temperature"}
    out = pipe(
        prompt=PROMPT, classes=[0, 1], classifier=classifier, num_inference_steps=STEPS, num_images_per_prompt=4,
        kldb_guidance_interval=STEPS, kldb_guidance_scale=alpha, kldb_gradient="detached", kldb_step_control=control,
        output_type="latent", generator=gen(1), **{names[k]: v for k, v in options.items()},
    )  # fmt: skip
    torch.testing.assert_close(out.images, expected, rtol=1e-4, atol=1e-5)
    assert list(zip(out.accepted_steps.tolist(), out.step_halvings.tolist(), out.rejected_steps.tolist())) == counts
    assert out.guided_updates == sum(a for a, _, _ in counts) and out.skipped_updates == 0


def test_the_cases_the_rules_are_tested_on_occur(pipe, classifier):
    """The parametrised backtracking case above reaches each outcome: accepted at once, halved, rejected."""
    _, counts = reference(pipe, classifier, 0.05, "backtracking")
    outcomes = {"accepted at once" if a and not h else "halved" if a else "rejected" for a, h, _ in counts}
    assert outcomes == {"accepted at once", "halved", "rejected"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kldb_step_control": "armijo"}, r"`kldb_step_control` has to be one of \('fixed', 'backtracking', 'kldb_scaled', 'trust_region'\) but is 'armijo'"),
        ({"kldb_max_halvings": -1}, r"`kldb_max_halvings` has to be a non-negative integer but is -1"),
        ({"kldb_trust_radius": 0.0}, r"`kldb_trust_radius` has to be a positive finite number but is 0.0"),
        ({"kldb_step_temperature": float("inf")}, r"`kldb_step_temperature` has to be a positive finite number but is inf"),
    ],
)
def test_bad_step_control_arguments(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(prompt=PROMPT, num_inference_steps=2, output_type="latent", kldb_guidance_scale=0, **kwargs)


# --- kldb_guidance_scale="auto" ------------------------------------------------------------------------------------


def test_auto_picks_the_grid_alpha_with_the_lowest_pilot_median(pipe, classifier):
    from pipeline_kldb_boundary import AUTO_GRID, AUTO_SEEDS

    common = {"prompt": PROMPT, "classes": [0, 1], "classifier": classifier, "num_inference_steps": STEPS,
              "kldb_guidance_interval": 2}  # fmt: skip
    generators = [gen(AUTO_SEEDS[0]), gen(5)]  # the first returned image shares a default pilot seed
    out = pipe(**common, kldb_guidance_scale="auto", generator=generators, num_images_per_prompt=2, output_type="pt")
    record = out.auto_guidance
    assert record["grid"] == list(AUTO_GRID) and len(record["seeds"]) == len(AUTO_SEEDS)
    assert not {AUTO_SEEDS[0], 5} & set(record["seeds"])  # the pilot never samples the returned images
    # the pilot's medians, recomputed: one image per pilot seed at each alpha
    medians = []
    for alpha in AUTO_GRID:
        pilot = pipe(**common, kldb_guidance_scale=alpha, generator=[gen(x) for x in record["seeds"]],
                     num_images_per_prompt=len(record["seeds"]), output_type="pt")  # fmt: skip
        medians.append(float(pilot.kldb.median()))
    assert record["median_kldb"] == medians
    assert record["kldb_guidance_scale"] == AUTO_GRID[min(range(len(medians)), key=lambda i: (medians[i], AUTO_GRID[i]))]
    assert record["seconds"] > 0
    chosen = pipe(**common, kldb_guidance_scale=record["kldb_guidance_scale"], generator=[gen(AUTO_SEEDS[0]), gen(5)],
                  num_images_per_prompt=2, output_type="pt")  # fmt: skip
    assert torch.equal(out.images, chosen.images)


def test_auto_needs_classes(pipe):
    with pytest.raises(ValueError, match=r"`kldb_guidance_scale='auto'` needs `classes`"):
        pipe(prompt=PROMPT, num_inference_steps=2, kldb_guidance_scale="auto")


def test_auto_grid_and_seeds_are_checked(pipe, classifier):
    with pytest.raises(ValueError, match=r"Expected argument `grid` to be a non-empty list of positive alphas but got \[0.1, -1\]"):
        pipe.choose_guidance_scale([0, 1], grid=[0.1, -1], prompt=PROMPT, classifier=classifier)
    with pytest.raises(ValueError, match=r"Expected argument `seeds` to be a non-empty list of ints but got \[\]"):
        pipe.choose_guidance_scale([0, 1], seeds=[], prompt=PROMPT, classifier=classifier)


def test_auto_pilots_the_first_prompt_of_a_batch_of_embeddings(pipe, classifier):
    embeds, negative = pipe.encode_prompt([PROMPT, "one"], "cpu", 1, True)
    out = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, classes=[0, 1], classifier=classifier,
               num_inference_steps=STEPS, kldb_guidance_interval=2, kldb_guidance_scale="auto", output_type="pt",
               generator=[gen(0), gen(1)])  # fmt: skip
    assert out.images.shape[0] == 2 and out.auto_guidance["kldb_guidance_scale"] in out.auto_guidance["grid"]
