"""From a real photo to its nearest boundary image: Stable Diffusion v1.4 + torchvision ResNet-50, Chihuahua / papillon.

Needs: a CUDA GPU with about 12 GB of memory (an estimate; float16, one image at a time; the guided steps back-propagate
through the UNet, the VAE decoder and ResNet-50), network access on the first run to download Stable Diffusion v1.4
(about 5 GB) and ResNet-50's IMAGENET1K_V2 weights (about 100 MB), a photo (a Chihuahua or a papillon, say), and this
project installed (`pip install -e ".[audit]"`: SSIM comes from torchmetrics).
Time: one image-to-image call per cell of the strength x alpha grid (three here), each running
int(40 * strength) k-LMS steps; seconds to tens of seconds per call on a recent GPU (not measured here: the
project's build machine has no GPU).

The photo is center-cropped to a square and resized to 512 x 512 (the pipeline itself never resizes: its height and
width have to be divisible by the VAE factor, 8). Each cell starts from the photo noised to `strength` and runs KLDB
guidance toward the Chihuahua / papillon boundary; the nearest boundary image is the edit closest to the photo (pixel
L2) whose KLDB is below 0.1 nats. Writes every candidate, nearest.png and counterfactual.json (KLDB before and after,
distances, classes before and after) to outputs/real_image_to_boundary/.

    python examples/real_image_to_boundary.py my_dog.jpg
    KLDB_EXAMPLES_TINY=1 python examples/real_image_to_boundary.py   # CI: random weights, tiny sizes, CPU, seconds
"""

import sys

import PIL.Image
import torch
from torchvision.models import ResNet50_Weights, resnet50

from kldb.counterfactual import counterfactual, write_counterfactual
from kldb.examples_support import cuda_device, tiny_mode, tiny_stable_diffusion
from pipeline_kldb_boundary import ImageClassifier, KLDBBoundaryPipeline

TINY = tiny_mode()
CLASSES = ["Chihuahua", "papillon"]  # ImageNet label names, as the classifier's weights name them
STRENGTHS, ALPHAS = (0.3, 0.5, 0.7), (0.1,)  # how much of the schedule runs from the photo; the paper's alpha
THRESHOLD = 0.1  # KLDB (nats) below which an edit counts as on the boundary
STEPS, INTERVAL, BETA = 40, 5, 6.0  # T, k (counted from the first step run) and the classifier-free guidance scale
NEGATIVE_PROMPT = "blurry, deformed, low quality, watermark, text, extra limbs, ugly"
SIZE, SEED = 512, 28
OUT = "outputs/real_image_to_boundary"
if TINY:
    STEPS, INTERVAL, SIZE = 4, 1, 32


def square(photo: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """Center-crop to a square, then resize to ``size`` x ``size`` (bicubic)."""
    side = min(photo.size)
    left, top = (photo.width - side) // 2, (photo.height - side) // 2
    return photo.convert("RGB").crop((left, top, left + side, top + side)).resize((size, size), PIL.Image.BICUBIC)


# 1. The photo: a file named on the command line; the tiny form makes a smooth random one
if TINY:
    coarse = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(SEED)).mul(255).byte()
    photo = PIL.Image.fromarray(coarse.permute(1, 2, 0).numpy()).resize((SIZE, SIZE), PIL.Image.BILINEAR)
elif len(sys.argv) == 2:
    photo = square(PIL.Image.open(sys.argv[1]), SIZE)
else:
    raise SystemExit("usage: python examples/real_image_to_boundary.py PHOTO (or KLDB_EXAMPLES_TINY=1 without PHOTO)")

# 2. The classifier: ResNet-50 with its weights' own resize, crop, normalisation and label names
weights = ResNet50_Weights.IMAGENET1K_V2
model = resnet50(weights=None if TINY else weights).eval()  # tiny: same architecture, random weights, no download
classifier = ImageClassifier.from_torchvision(model, weights)

# 3. Stable Diffusion v1.4 with KLDB guidance and the k-LMS scheduler as the paper sets it
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
pipe.set_lms_scheduler(timestep_spacing="trailing", use_karras_sigmas=True)  # Lin et al. (2024), as the paper

# 4. The strength x alpha grid from the photo, the same seed in every cell; the nearest boundary image
result = counterfactual(
    pipe,
    photo,
    CLASSES,  # prompt: "Chihuahua and papillon"
    strengths=STRENGTHS,
    alphas=ALPHAS,
    threshold=THRESHOLD,
    seed=SEED,
    num_inference_steps=STEPS,
    kldb_guidance_interval=INTERVAL,
    guidance_scale=BETA,
    guidance_rescale=0.7,
    negative_prompt=NEGATIVE_PROMPT,
)
write_counterfactual(result, OUT)
for c in result.candidates:
    print(
        f"strength {c.strength:g} alpha {c.alpha:g}: KLDB {c.kldb_start:.3f} -> {c.kldb:.3f}, pixel L2 {c.pixel_l2:.2f}, "
        f"class {classifier.labels[c.predicted_class_start]} -> {classifier.labels[c.predicted_class]}"
    )
found = f"nearest boundary image: {OUT}/nearest.png" if result.found else f"no edit reached KLDB < {THRESHOLD}"
print(f"{found}; all candidates and counterfactual.json in {OUT}" + (" (tiny random models: noise)" if TINY else ""))
