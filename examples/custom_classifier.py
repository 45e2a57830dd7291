"""Your own classifier: a plain `torch.nn.Module` with its own preprocessing, wrapped in `ImageClassifier`.

Needs: a CUDA GPU with about 10 GB of memory (an estimate), network access on the first run to download Stable Diffusion v1.4
(about 5 GB), and this project installed (`pip install -e .`). Time: 40 k-LMS steps per image, a few seconds per
image on a recent GPU (not measured here: the project's build machine has no GPU). Replace `ColourClassifier` and
its preprocessing with your own model; load your trained weights with `load_state_dict` (safetensors recommended).

`ImageClassifier` gives any module the contract the guidance needs: images (B, 3, H, W) in [0, 1] in, logits
(B, n) out, with the resize / crop / normalisation you name applied in torch so that gradients reach the image.

    python examples/custom_classifier.py
    KLDB_EXAMPLES_TINY=1 python examples/custom_classifier.py   # CI: tiny random diffusion model, CPU, seconds
"""

import torch

from kldb.demo import format_summary, save_comparison
from kldb.examples_support import cuda_device, tiny_mode, tiny_stable_diffusion
from pipeline_kldb_boundary import ImageClassifier, KLDBBoundaryPipeline

TINY = tiny_mode()
NUM_IMAGES, STEPS, INTERVAL, BETA, ALPHA, SEED = 4, 40, 5, 7.5, 0.1, 0
if TINY:
    NUM_IMAGES, STEPS, INTERVAL = 1, 4, 2


class ColourClassifier(torch.nn.Module):
    """A small CNN over 64 x 64 normalised images with three classes; stands in for your own model."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2, padding=1),  # (B, 16, 32, 32)
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),  # (B, 32, 16, 16)
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),  # (B, 32, 1, 1)
        )
        self.head = torch.nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))  # (B, n) logits, no softmax


torch.manual_seed(0)
model = (
    ColourClassifier().eval()
)  # your model: model.load_state_dict(safetensors.torch.load_file("weights.safetensors"))
classifier = ImageClassifier(
    model,
    resize=72,  # shorter edge to 72 px
    crop=64,  # then a 64 x 64 center crop
    mean=[0.5, 0.5, 0.5],  # normalisation the model was trained with
    std=[0.25, 0.25, 0.25],
    labels=["red apple", "green apple", "yellow banana"],
)

if TINY:
    device = "cpu"
    pipe = tiny_stable_diffusion(classifier=classifier)
else:
    device, dtype = cuda_device()
    pipe = KLDBBoundaryPipeline.from_pretrained(
        "CompVis/stable-diffusion-v1-4", classifier=classifier, torch_dtype=dtype
    )
pipe = pipe.to(device)
pipe.set_progress_bar_config(disable=True)

runs = {}
for row, alpha in (("prompt_only", 0.0), ("guided", ALPHA)):
    generator = torch.Generator(device).manual_seed(SEED)
    runs[row] = [
        pipe(
            classes=["red apple", "green apple"],  # by label name, or by index: [0, 1]
            num_inference_steps=STEPS,
            kldb_guidance_interval=INTERVAL,
            guidance_scale=BETA,
            kldb_guidance_scale=alpha,
            generator=generator,
        )
        for _ in range(NUM_IMAGES)
    ]

settings = {"classes": ["red apple", "green apple"], "steps": STEPS, "beta": BETA, "alpha": ALPHA, "seed": SEED}
summary = save_comparison("outputs/custom_classifier", runs, classifier.labels, settings)
print(format_summary(summary))
print("Wrote outputs/custom_classifier/" + (" (tiny random models: noise)" if TINY else ""))
