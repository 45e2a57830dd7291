"""The paper's experiment: Stable Diffusion v1.4 + torchvision ResNet-50, on the Chihuahua / papillon boundary.

Needs: a CUDA GPU with about 12 GB of memory (an estimate; float16, one image at a time; the guided steps back-propagate through
the UNet, the VAE decoder and ResNet-50), network access on the first run to download Stable Diffusion v1.4 (about
5 GB) and ResNet-50's IMAGENET1K_V2 weights (about 100 MB), and this project installed (`pip install -e .`).
Time: 40 k-LMS steps per image plus eight guided steps; a few seconds per prompt-only image and several times that
per guided image on a recent GPU (not measured here: the project's build machine has no GPU).

Writes prompt-only (alpha = 0) and KLDB-guided (alpha = 0.1) images from the same seeds to
outputs/paper_sd14_resnet50/ with a captioned grid and results.json (KLDB, entropy, probabilities per image).

    python examples/paper_sd14_resnet50.py
    KLDB_EXAMPLES_TINY=1 python examples/paper_sd14_resnet50.py   # CI: random weights, tiny sizes, CPU, seconds
"""

import torch
from torchvision.models import ResNet50_Weights, resnet50

from kldb.demo import format_summary, save_comparison
from kldb.examples_support import cuda_device, tiny_mode, tiny_stable_diffusion
from pipeline_kldb_boundary import ImageClassifier, KLDBBoundaryPipeline

TINY = tiny_mode()
CLASSES = ["Chihuahua", "papillon"]  # ImageNet label names, as the classifier's weights name them
NUM_IMAGES = 4  # the paper generated 2,500 per setting
STEPS, INTERVAL = 40, 5  # T and k
BETA, ALPHA = 6.0, 0.1  # classifier-free guidance scale and KLDB guidance scale (the paper's best alpha at beta 6)
NEGATIVE_PROMPT = "blurry, deformed, low quality, watermark, text, extra limbs, ugly"
SEED = 28
if TINY:
    NUM_IMAGES, STEPS, INTERVAL = 1, 4, 2

# 1. The classifier: ResNet-50 with its weights' own resize, crop, normalisation and label names
weights = ResNet50_Weights.IMAGENET1K_V2
model = resnet50(weights=None if TINY else weights).eval()  # tiny: same architecture, random weights, no download
classifier = ImageClassifier.from_torchvision(model, weights)

# 2. Stable Diffusion v1.4 with KLDB guidance (the pipeline swaps in the deterministic k-LMS scheduler)
if TINY:
    device, dtype = "cpu", torch.float32
    pipe = tiny_stable_diffusion(classifier=classifier)
else:
    device, dtype = cuda_device()
    pipe = KLDBBoundaryPipeline.from_pretrained(
        "CompVis/stable-diffusion-v1-4", classifier=classifier, torch_dtype=dtype
    )
    # without this package installed: DiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4",
    #     custom_pipeline="<namespace>/kldb-boundary", trust_remote_code=True, custom_revision="<commit>")
    # cheaper guidance (not the paper's exact gradient): add
    #     guidance_vae=AutoencoderTiny.from_pretrained("madebyollin/taesd", torch_dtype=dtype)
    # (from diffusers) to from_pretrained: the gradient then goes through TAESD, the images still through the VAE
pipe = pipe.to(device)
pipe.set_progress_bar_config(disable=True)
pipe.set_lms_scheduler(timestep_spacing="trailing", use_karras_sigmas=True)  # Lin et al. (2024), as the paper

# 3. Prompt-only and guided images from the same seeds, one at a time
runs = {}
for row, alpha in (("prompt_only", 0.0), ("guided", ALPHA)):
    generator = torch.Generator(device).manual_seed(SEED)
    runs[row] = [
        pipe(
            classes=CLASSES,  # prompt: "Chihuahua and papillon"
            num_inference_steps=STEPS,
            kldb_guidance_interval=INTERVAL,
            guidance_scale=BETA,
            kldb_guidance_scale=alpha,
            guidance_rescale=0.7,
            negative_prompt=NEGATIVE_PROMPT,
            generator=generator,
        )
        for _ in range(NUM_IMAGES)
    ]

# 4. Save the images, a captioned grid and the scores
settings = {"classes": CLASSES, "steps": STEPS, "interval": INTERVAL, "beta": BETA, "alpha": ALPHA, "seed": SEED}
summary = save_comparison("outputs/paper_sd14_resnet50", runs, classifier.labels, settings)
print(format_summary(summary))
print("Wrote outputs/paper_sd14_resnet50/grid.png and results.json" + (" (tiny random models: noise)" if TINY else ""))
