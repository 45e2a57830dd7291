"""The bundled digits world, offline on the CPU: images on the boundary between "three" and "eight".

Needs: no GPU and no network; the digits world trained into kldb/digits/world
(`python -m kldb.digits.train --out kldb/digits/world`, about an hour on 2 CPU cores) and this project installed
(`pip install -e .`). Time: about a minute on 2 CPU cores for 16 prompt-only and 16 guided images of 40 steps.

Writes prompt-only (alpha = 0) and KLDB-guided images from the same seeds to outputs/digits_offline/. The guided row
uses the measured quick-start setting (kldb.presets.QUICK_START: backtracking from alpha 0.2); set STEP_CONTROL =
"fixed" and ALPHA = 0.1 for the paper's step.

    python examples/digits_offline.py
    KLDB_EXAMPLES_TINY=1 python examples/digits_offline.py   # CI: tiny random components, seconds
"""

import torch

from kldb import digits
from kldb.demo import digits_pipeline, format_summary, save_comparison
from kldb.examples_support import label_names, tiny_mode
from kldb.presets import QUICK_START

TINY = tiny_mode()
CLASSES = ["three", "eight"]
NUM_IMAGES, STEPS, INTERVAL, SEED = QUICK_START["num_images"], 40, 5, 0
ALPHA, STEP_CONTROL = QUICK_START["alpha"], QUICK_START["kldb_step_control"]
if TINY:
    NUM_IMAGES, STEPS, INTERVAL = 2, 4, 2

pipe = digits_pipeline(tiny=TINY)  # KLDBBoundaryPipeline with the digits classifier, float32, CPU
beta = 7.5 if TINY else digits.world_info()["default_guidance_scale"]  # classifier-free guidance scale

runs = {}
for row, alpha in (("prompt_only", 0.0), ("guided", ALPHA)):
    generators = [torch.Generator().manual_seed(SEED + i) for i in range(NUM_IMAGES)]  # same seeds in both rows
    runs[row] = [
        pipe(
            classes=CLASSES,  # prompt: "three and eight"
            num_images_per_prompt=NUM_IMAGES,
            num_inference_steps=STEPS,
            kldb_guidance_interval=INTERVAL,
            guidance_scale=beta,
            kldb_guidance_scale=alpha,
            kldb_step_control=STEP_CONTROL,
            generator=generators,
        )
    ]

settings = {"classes": CLASSES, "steps": STEPS, "interval": INTERVAL, "beta": beta, "alpha": ALPHA, "seed": SEED,
            "step_control": STEP_CONTROL}  # fmt: skip
summary = save_comparison("outputs/digits_offline", runs, label_names(pipe), settings)
print(format_summary(summary))
print("Wrote outputs/digits_offline/grid.png and results.json" + (" (tiny random components: noise)" if TINY else ""))
