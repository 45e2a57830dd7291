"""Any Hugging Face image classifier, and a three-class subset given by its label names.

Needs: a CUDA GPU with about 12 GB of memory (an estimate), network access on the first run to download Stable Diffusion v1.4
(about 5 GB) and the classifier (google/vit-base-patch16-224, about 350 MB), and this project installed
(`pip install -e .`). Time: 40 k-LMS steps per image, several seconds per guided image on a recent GPU (not measured
here: the project's build machine has no GPU).

Any `AutoModelForImageClassification` works: the pipeline reads the resize, crop and normalisation from its image
processor and the class names from `config.id2label`. Writes prompt-only and guided images for the boundary shared
by three cat classes to outputs/hf_classifier_three_classes/.

    python examples/hf_classifier_three_classes.py
    KLDB_EXAMPLES_TINY=1 python examples/hf_classifier_three_classes.py   # CI: random weights, tiny sizes, CPU
"""

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from kldb.demo import format_summary, save_comparison
from kldb.examples_support import cuda_device, imagenet_labels, tiny_mode, tiny_stable_diffusion, tiny_vit_classifier
from pipeline_kldb_boundary import KLDBBoundaryPipeline

TINY = tiny_mode()
CLASSIFIER = "google/vit-base-patch16-224"
CLASSES = ["tiger cat", "Egyptian cat", "Persian cat"]  # label names exactly as the classifier's id2label has them
NUM_IMAGES, STEPS, INTERVAL, BETA, ALPHA, SEED = 4, 40, 5, 6.0, 0.1, 0
if TINY:
    NUM_IMAGES, STEPS, INTERVAL = 1, 4, 2

# 1. The classifier and its image processor, as transformers loads them
if TINY:  # same architecture family at toy size, random weights, ImageNet label names: nothing downloaded
    classifier, processor = tiny_vit_classifier(imagenet_labels())
else:
    classifier = AutoModelForImageClassification.from_pretrained(CLASSIFIER).eval()
    processor = AutoImageProcessor.from_pretrained(CLASSIFIER)
names = [classifier.config.id2label[i] for i in range(classifier.config.num_labels)]
missing = [c for c in CLASSES if c not in names]
if missing:
    raise SystemExit(f"{missing} are not label names of {CLASSIFIER}; some of its labels: {names[280:290]}")

# 2. Stable Diffusion v1.4 with the classifier as a pipeline component
if TINY:
    device = "cpu"
    pipe = tiny_stable_diffusion(classifier=classifier, classifier_processor=processor)
else:
    device, dtype = cuda_device()
    pipe = KLDBBoundaryPipeline.from_pretrained(
        "CompVis/stable-diffusion-v1-4", classifier=classifier, classifier_processor=processor, torch_dtype=dtype
    )
pipe = pipe.to(device)
pipe.set_progress_bar_config(disable=True)

# 3. Prompt-only and guided images from the same seeds; the prompt is "tiger cat and Egyptian cat and Persian cat"
runs = {}
for row, alpha in (("prompt_only", 0.0), ("guided", ALPHA)):
    generator = torch.Generator(device).manual_seed(SEED)
    runs[row] = [
        pipe(
            classes=CLASSES,
            num_inference_steps=STEPS,
            kldb_guidance_interval=INTERVAL,
            guidance_scale=BETA,
            kldb_guidance_scale=alpha,
            generator=generator,
        )
        for _ in range(NUM_IMAGES)
    ]

# 4. Save the images, a captioned grid and the scores (KLDB is 0 where the three classes get a third each)
settings = {"classifier": CLASSIFIER, "classes": CLASSES, "steps": STEPS, "beta": BETA, "alpha": ALPHA, "seed": SEED}
summary = save_comparison("outputs/hf_classifier_three_classes", runs, names, settings)
print(format_summary(summary))
print("Wrote outputs/hf_classifier_three_classes/" + (" (tiny random models: noise)" if TINY else ""))
