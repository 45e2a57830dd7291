"""Named setups for the command line: ``digits`` (the default, offline on a CPU) and ``paper`` (the paper's own).

A preset fills every option the user does not give; any option given on the command line wins.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PAPER_ALPHAS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.5, 1.0)
PAPER_BETAS: tuple[float, ...] = (3.0, 6.0, 9.0)
PAPER_NEGATIVE_PROMPT = "blurry, deformed, low quality, watermark, text, extra limbs, ugly"
#: The paper's method, the same in every preset: its alpha and beta grids, alpha 0.1 and beta 6 for a single setting,
#: 40 k-LMS steps, guidance every 5, the gradient through the UNet (the authors' code).
PAPER_METHOD: dict[str, Any] = {
    "alphas": PAPER_ALPHAS,
    "betas": PAPER_BETAS,
    "alpha": 0.1,
    "beta": 6.0,
    "num_inference_steps": 40,
    "kldb_guidance_interval": 5,
    "kldb_gradient": "unet",
    "kldb_guidance_decoder": "auto",
}


#: The quick start on the digits world (``kldb demo`` / ``make demo``, the quick-start notebook,
#: ``examples/digits_offline.py``): backtracking from alpha 0.2 came within 5 points of the best fixed alpha's median-KLDB
#: drop on each of five measured class subsets (better on the four pairs), made at most 4.7 % of the images worse, at
#: 1.04-1.18x the fixed step's time (``benchmarks/step_control.py``, docs/performance.md). The pipeline's own defaults
#: stay the paper's.
QUICK_START: dict[str, Any] = {"alpha": 0.2, "kldb_step_control": "backtracking", "num_images": 16}


@dataclass(frozen=True)
class Preset:
    """Defaults of ``kldb generate`` / ``kldb sweep`` / ``kldb report``.

    ``reference`` is the real-image set for FID (``"digits"``, a folder, or ``None`` when the user has to give one);
    ``alpha`` and ``beta`` are the single setting of ``kldb generate``; ``kldb_step_control`` sizes each guided step
    (``"fixed"``: the paper's); ``dtype="auto"`` is float16 on a GPU and float32 on a CPU.
    """

    name: str
    description: str
    pipeline: str
    classifier: str | None
    classes: tuple[str, ...]
    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    alpha: float
    beta: float
    num_inference_steps: int
    kldb_guidance_interval: int
    kldb_gradient: str
    kldb_guidance_decoder: str
    kldb_step_control: str
    guidance_rescale: float
    timestep_spacing: str | None
    use_karras_sigmas: bool
    negative_prompt: str | None
    seed: int
    num_images: int
    batch_size: int
    dtype: str
    reference: str | None

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


PRESETS: dict[str, Preset] = {
    "digits": Preset(
        name="digits",
        description=(
            "the bundled digits world, offline on a CPU: classes three / eight, the paper's alpha and beta grids, "
            "backtracking steps from alpha 0.2 (the measured best on this world; --step-control fixed --alpha 0.1 "
            "gives the paper's method)"
        ),
        pipeline="digits",
        classifier=None,
        classes=("three", "eight"),
        **{**PAPER_METHOD, "alpha": QUICK_START["alpha"]},
        kldb_step_control=QUICK_START["kldb_step_control"],
        guidance_rescale=0.0,
        timestep_spacing=None,
        use_karras_sigmas=False,
        negative_prompt=None,
        seed=0,
        num_images=16,
        batch_size=16,
        dtype="float32",
        reference="digits",
    ),
    "paper": Preset(
        name="paper",
        description=(
            "the paper's setup: Stable Diffusion v1.4, torchvision ResNet-50 (IMAGENET1K_V2), Chihuahua / papillon, "
            "40 k-LMS steps, guidance every 5, trailing timesteps, Karras sigmas, guidance_rescale 0.7, negative "
            "prompt, seed 28 (needs the weights, and a GPU to be practical)"
        ),
        pipeline="CompVis/stable-diffusion-v1-4",
        classifier="torchvision:resnet50:IMAGENET1K_V2",
        classes=("Chihuahua", "papillon"),
        **PAPER_METHOD,
        kldb_step_control="fixed",
        guidance_rescale=0.7,
        timestep_spacing="trailing",
        use_karras_sigmas=True,
        negative_prompt=PAPER_NEGATIVE_PROMPT,
        seed=28,
        num_images=100,
        batch_size=8,
        dtype="auto",
        reference=None,
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``."""
    if name not in PRESETS:
        raise ValueError(f"Expected argument `preset` to be one of {sorted(PRESETS)} but got {name!r}.")
    return PRESETS[name]
