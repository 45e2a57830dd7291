"""Plumbing shared by ``examples/`` and ``examples/notebooks/``: the tiny switch, stand-in models, saving results.

Set ``KLDB_EXAMPLES_TINY=1`` and every example runs on the CPU in seconds, offline: Stable Diffusion is replaced by
:func:`kldb.testing.tiny_components` (same architecture, toy sizes, random weights), the classifiers by
same-architecture models with random weights (torchvision's ResNet-50 with its real ``IMAGENET1K_V2`` transforms and
label names, a two-layer transformers ViT with ImageNet label names), and the step counts are cut. That is how CI
keeps the examples' code paths from rotting; the images are then noise.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kldb.io import atomic_write_json, save_png
from kldb.render import caption_lines, captioned_grid
from pipeline_kldb_boundary import KLDBBoundaryPipeline, KLDBBoundaryPipelineOutput

logger = logging.getLogger(__name__)

#: The environment switch of the tiny, offline form of the examples.
TINY_ENV = "KLDB_EXAMPLES_TINY"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def tiny_mode() -> bool:
    """Whether ``KLDB_EXAMPLES_TINY`` asks for the tiny, offline form of the examples."""
    value = os.environ.get(TINY_ENV, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(
            f"Expected the environment variable `{TINY_ENV}` to be one of {_TRUE + _FALSE} but got {value!r}."
        )
    return value in _TRUE


def cuda_device() -> tuple[str, torch.dtype]:
    """``("cuda", torch.float16)``, or a clear error when no CUDA GPU is visible."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"This example needs a CUDA GPU and none is visible. Set {TINY_ENV}=1 to run its tiny CPU form instead "
            "(random weights, images are noise)."
        )
    return "cuda", torch.float16


def tiny_stable_diffusion(**components: Any) -> KLDBBoundaryPipeline:
    """A Stable-Diffusion-shaped :class:`KLDBBoundaryPipeline` at toy size, random weights; ``components`` override."""
    from kldb.testing import tiny_components

    pipe = KLDBBoundaryPipeline(**{**tiny_components(with_classifier=False), **components})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet-1k class names, in index order, as torchvision ships them (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def tiny_vit_classifier(labels: Sequence[str], image_size: int = 32, seed: int = 0) -> tuple[Any, Any]:
    """A two-layer transformers ViT image classifier with the given label names and its image processor.

    The processor normalises like ``google/vit-base-patch16-224`` (mean 0.5, std 0.5) at ``image_size``.
    """
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    processor = ViTImageProcessor(
        do_resize=True, size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return ViTForImageClassification(config).eval(), processor


def tiny_digits_pipeline(seed: int = 0) -> KLDBBoundaryPipeline:
    """Tiny random components with a ten-class classifier labelled like the digits world ("zero" ... "nine")."""
    from kldb.digits.data import LABELS
    from kldb.testing import tiny_classifier

    classifier, processor = tiny_classifier(num_labels=len(LABELS), seed=seed)
    classifier.config.id2label = dict(enumerate(LABELS))
    classifier.config.label2id = {name: i for i, name in enumerate(LABELS)}
    return tiny_stable_diffusion(classifier=classifier, classifier_processor=processor)


def digits_pipeline(tiny: bool) -> KLDBBoundaryPipeline:
    """The bundled digits world on the CPU, or with ``tiny`` its tiny stand-in; a clear error if it is not trained."""
    if tiny:
        return tiny_digits_pipeline()
    from kldb import digits

    if not (digits.WORLD_PATH / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The digits world is not trained yet (no model_index.json in {digits.WORLD_PATH}). Train it with "
            f"`python -m kldb.digits.train --out {digits.WORLD_PATH}` (about an hour on 2 CPU cores), or set "
            f"{TINY_ENV}=1 to run this example on tiny random components."
        )
    pipe = digits.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def label_names(pipe: KLDBBoundaryPipeline, classifier: Any = None) -> list[str]:
    """The label names of the classifier a call uses (``classifier`` or the pipeline's)."""
    from pipeline_kldb_boundary import as_image_classifier

    adapter = as_image_classifier(classifier if classifier is not None else pipe.classifier, pipe.classifier_processor)
    if adapter.labels is None:
        raise ValueError("Expected the classifier to have label names but it has none; pass `labels=`.")
    return adapter.labels


def save_comparison(
    out_dir: str | os.PathLike[str],
    runs: Mapping[str, Sequence[KLDBBoundaryPipelineOutput]],
    names: Sequence[str],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """Write each run's images (PNG with their KLDB and probabilities), a captioned grid and ``results.json``.

    Args:
        out_dir: output folder (created).
        runs: ``{row name: outputs}``; each output holds one or more images (PIL) with their scores.
        names: the classifier's label names, for the captions.
        settings: what produced the runs (prompt, steps, scales, seeds), stored in ``results.json``.

    Returns:
        The summary written to ``results.json``: per row, the per-image scores and their medians.
    """
    out = Path(out_dir)
    summary: dict[str, Any] = {"settings": dict(settings), "rows": {}}
    grid_rows = []
    for row, outputs in runs.items():
        images = [image for o in outputs for image in o.images]
        kldb = [float(k) for o in outputs for k in o.kldb]
        entropy = [float(e) for o in outputs for e in o.entropy]
        probabilities = [p.tolist() for o in outputs for p in o.probabilities]
        classes = outputs[0].classes
        for i, image in enumerate(images):
            save_png(out / "images" / f"{row}_{i:03d}.png", image, {"row": row, "kldb": kldb[i], "classes": classes})
        summary["rows"][row] = {
            "median_kldb": statistics.median(kldb),
            "median_entropy": statistics.median(entropy),
            "kldb": kldb,
            "entropy": entropy,
            "predicted": [names[max(range(len(p)), key=p.__getitem__)] for p in probabilities],
            "class_probabilities": [[p[c] for c in classes] for p in probabilities],
            "skipped_updates": sum(o.skipped_updates for o in outputs),
        }
        captions = [caption_lines(k, p, names, top=2) for k, p in zip(kldb, probabilities)]
        grid_rows.append((f"{row}: median KLDB {summary['rows'][row]['median_kldb']:.3f}", images, captions))
    save_png(out / "grid.png", captioned_grid(grid_rows))
    atomic_write_json(out / "results.json", summary)
    logger.info("Wrote %s, %s and the images.", out / "grid.png", out / "results.json")
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """One line per row: median KLDB and entropy, and the predicted classes."""
    lines = []
    for row, r in summary["rows"].items():
        predicted = ", ".join(sorted(set(r["predicted"])))
        lines.append(
            f"{row:>12}: median KLDB {r['median_kldb']:.4f}, median entropy {r['median_entropy']:.4f} nats, "
            f"predicted {predicted}"
        )
    return "\n".join(lines)
