"""A small stored sweep run made without a pipeline: known KLDB, entropy and probabilities per image."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import PIL.Image
import torch

from kldb.io import atomic_write_json, save_png
from kldb.runfolder import CONFIG_NAME, ManifestWriter, Setting, image_relpath, merge_manifests, read_jsonl
from pipeline_kldb_boundary import entropy, kldb_score

LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CLASSES = (3, 8)
ALPHAS = (0.0, 0.1, 0.5)
BETAS = (3.0, 6.0)


def write_run(out: Path, seeds: int = 6, seed: int = 0) -> list[dict]:
    """Write a run folder as :func:`kldb.sweep.run_sweep` would, with logits drawn so that larger alpha means
    logits closer to equal on {3, 8} (lower KLDB); return the records."""
    rng = np.random.default_rng(seed)
    atomic_write_json(
        out / CONFIG_NAME,
        {
            "fixed": {"pipeline": "kldb.testing:tiny_pipeline", "classifier": None, "num_inference_steps": 4},
            "labels": LABELS,
        },
    )
    order = []
    with ManifestWriter(out / "manifest.rank0.jsonl") as writer:
        for beta in BETAS:
            for alpha in ALPHAS:
                setting = Setting(CLASSES, ("three", "eight"), alpha, beta)
                for s in range(seeds):
                    logits = torch.tensor(rng.normal(0.0, 1.0, size=(1, 10)), dtype=torch.float64)
                    logits[0, 3] += 6.0
                    logits[0, 8] += 6.0 - 4.0 * (1.0 - alpha) * rng.uniform(0.5, 1.5)
                    probabilities = torch.softmax(logits, dim=-1)[0]
                    top = probabilities.topk(5)
                    pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                    record = {
                        "setting": setting.name,
                        "classes": ["three", "eight"],
                        "class_indices": list(CLASSES),
                        "alpha": alpha,
                        "beta": beta,
                        "seed": s,
                        "prompt": "three and eight",
                        "file": image_relpath(setting, s),
                        "kldb": float(kldb_score(logits, CLASSES)[0]),
                        "entropy": float(entropy(logits)[0]),
                        "class_probabilities": [float(probabilities[c]) for c in CLASSES],
                        "top_classes": [int(i) for i in top.indices],
                        "top_labels": [LABELS[int(i)] for i in top.indices],
                        "top_probabilities": [float(p) for p in top.values],
                        "predicted_class": int(top.indices[0]),
                        "predicted_label": LABELS[int(top.indices[0])],
                        "num_classes": 10,
                    }
                    path = save_png(out / record["file"], PIL.Image.fromarray(pixels), {"seed": s})
                    record["bytes"] = path.stat().st_size
                    writer.append(record)
                    order.append(setting.key(s))
    merge_manifests(out, order)
    return read_jsonl(out / "manifest.jsonl")


def ten_class_classifier():
    """A tiny classifier with 10 classes (another label space than the tiny pipeline's 4)."""
    from kldb.testing import tiny_classifier

    return tiny_classifier(num_labels=10)


def renamed_classifier():
    """A tiny classifier with 4 classes whose names differ from the tiny pipeline's."""
    from kldb.testing import tiny_classifier

    model, processor = tiny_classifier(seed=1)
    names = ["nought", "one", "two", "three"]
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    return model, processor


class NaNClassifier(torch.nn.Module):
    """A broken classifier over the tiny pipeline's four labels: its logits are NaN."""

    labels: ClassVar[list[str]] = ["zero", "one", "two", "three"]

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))[:, :1].repeat(1, 4) * self.scale * float("nan")  # (B, 4)


def nan_classifier() -> NaNClassifier:
    return NaNClassifier()


def half_precision_unet_pipeline():
    """Tiny components with the UNet in float16 and the rest in float32, as a world that stores its UNet in half."""
    from kldb.testing import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.unet.to(torch.float16)
    return pipe
