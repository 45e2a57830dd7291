"""Train the digits world's validity oracle: a second digits classifier, independent of the audited one.

Run ``python -m kldb.digits.validity_classifier --out kldb/digits/world/validity_classifier`` (a few minutes on 2 CPU
cores; ``--tiny`` for a smoke run of a few iterations). :mod:`kldb.validity` uses it by default to judge whether the
images of a digits run are still images of the audited classes.

It differs from the audited classifier (:mod:`kldb.digits.train`, a ResNet with batch norm and ReLU, seed 0) in
architecture, seed and training:

- a ConvNeXt (Liu et al., 2022; transformers' ``ConvNextForImageClassification``): a 4x4 patchify stem, depthwise 7x7
  convolutions, layer norm, GELU, inverted bottlenecks, layer scale and stochastic depth;
- its own seed (1); the same train / val / test split of :mod:`kldb.digits.data`, so its test images are unseen by both;
- stronger augmentation: larger shifts, scale changes and rotations than the audited classifier's, plus brightness,
  background, blur and pixel noise, since generated images are not as clean as the scanned digits;
- outlier exposure (Hendrycks et al., 2019): a share of each batch are images that are no digit (the digits' 4x4
  blocks shuffled, smooth noise), trained towards the uniform distribution, so that a low maximum probability means
  "no digit" rather than nothing at all;
- temperature scaling on the validation split (Guo et al., 2017), baked into the last layer.

The folder it writes is a transformers image-classification model with its image processor (``config.json``,
``model.safetensors``, ``preprocessor_config.json``), the format of the audited classifier, so that
``kldb.loading.load_classifier(path)`` loads it. It is recorded in the world's ``world_info.json`` under the key
``"validity_classifier"`` (no other key of the file is changed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import ConvNextConfig, ConvNextForImageClassification

from kldb.digits.calibration import expected_calibration_error, fit_temperature
from kldb.digits.data import IMAGE_SIZE, LABELS, augment, load_digits_split
from kldb.digits.train import batches, build_processor, classifier_logits, cosine_lr, seed_everything
from kldb.digits.util import count_parameters, folder_size_bytes, setup_process
from kldb.io import atomic_write_json

logger = logging.getLogger(__name__)

WORLD_INFO_KEY = "validity_classifier"
DEFAULT_SEED = 1  # the audited classifier's is 0


@dataclasses.dataclass
class ValidityClassifierConfig:
    """Architecture, augmentation and training length of the validity classifier."""

    patch_size: int = 4
    hidden_sizes: tuple[int, ...] = (32, 64, 96)
    depths: tuple[int, ...] = (1, 2, 1)
    drop_path_rate: float = 0.1
    iterations: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    max_shift: float = 4.0
    scale_range: tuple[float, float] = (0.75, 1.15)
    max_rotation_degrees: float = 15.0
    max_background: float = 0.15
    min_gain: float = 0.6
    blur_probability: float = 0.3
    max_noise_std: float = 0.08
    outlier_fraction: float = 0.125
    outlier_weight: float = 0.5
    split_seed: int = 0  # the world's split (kldb.digits.data.split_indices)
    log_every: int = 100

    @classmethod
    def tiny(cls) -> ValidityClassifierConfig:
        """A smoke run of a few seconds: a tiny network and a few iterations."""
        return cls(hidden_sizes=(8, 16), depths=(1, 1), iterations=3, batch_size=16, log_every=1)


def build_validity_classifier(config: ValidityClassifierConfig) -> ConvNextForImageClassification:
    """A ConvNeXt over the ten digit labels with random weights (seed the global generator first)."""
    convnext_config = ConvNextConfig(
        num_channels=3,
        patch_size=config.patch_size,
        num_stages=len(config.hidden_sizes),
        hidden_sizes=list(config.hidden_sizes),
        depths=list(config.depths),
        drop_path_rate=config.drop_path_rate,
        image_size=IMAGE_SIZE,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: index for index, label in enumerate(LABELS)},
    )
    return ConvNextForImageClassification(convnext_config)


def _uniform(shape: Sequence[int], generator: torch.Generator, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator)


def strong_augment(images: torch.Tensor, generator: torch.Generator, config: ValidityClassifierConfig) -> torch.Tensor:
    """Geometric (:func:`kldb.digits.data.augment`, wider ranges) then photometric augmentation of ``[B, 3, H, W]``.

    Photometric: a stroke gain in ``[min_gain, 1]``, a grey background up to ``max_background``, a 3x3 Gaussian blur
    with probability ``blur_probability`` and Gaussian pixel noise of standard deviation up to ``max_noise_std``.
    """
    batch = len(images)
    x = augment(images, generator, config.max_shift, config.scale_range, config.max_rotation_degrees)
    gain = _uniform((batch, 1, 1, 1), generator, config.min_gain, 1.0)
    background = _uniform((batch, 1, 1, 1), generator, 0.0, config.max_background)
    x = background + gain * x * (1.0 - background)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16.0).expand(3, 1, 3, 3)  # (3, 1, 3, 3) depthwise
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    blur = torch.rand(batch, 1, 1, 1, generator=generator) < config.blur_probability
    x = torch.where(blur, blurred, x)
    noise_std = _uniform((batch, 1, 1, 1), generator, 0.0, config.max_noise_std)
    x = x + noise_std * torch.randn(x.shape, generator=generator)
    return x.clamp(0.0, 1.0)


def outlier_images(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images ``[B, 3, 32, 32]`` that show no digit: half have the 64 4x4 blocks of a digit shuffled (its ink, not its
    shape), half are smooth noise (random 4x4 or 8x8 fields upsampled), grey for all three channels."""
    batch, channels, height, width = images.shape
    half = batch // 2
    blocks = images[:half].reshape(half, channels, height // 4, 4, width // 4, 4).permute(0, 1, 2, 4, 3, 5)
    blocks = blocks.reshape(half, channels, -1, 4, 4)  # (b, 3, 64, 4, 4)
    order = torch.rand(half, blocks.shape[2], generator=generator).argsort(dim=1)
    blocks = blocks[torch.arange(half)[:, None], :, order].permute(0, 2, 1, 3, 4)  # (b, 3, 64, 4, 4)
    shuffled = blocks.reshape(half, channels, height // 4, width // 4, 4, 4).permute(0, 1, 2, 4, 3, 5)
    shuffled = shuffled.reshape(half, channels, height, width)
    rest = batch - half
    fields = []
    for size in (4, 8):
        field = torch.rand(rest, 1, size, size, generator=generator)
        fields.append(F.interpolate(field, size=(height, width), mode="bilinear", align_corners=False))
    pick = torch.rand(rest, 1, 1, 1, generator=generator) < 0.5
    noise = torch.where(pick, fields[0], fields[1]) * _uniform((rest, 1, 1, 1), generator, 0.3, 1.0)
    return torch.cat([shuffled, noise.expand(rest, channels, height, width)])


def train_validity_classifier(
    config: ValidityClassifierConfig, train: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator
) -> ConvNextForImageClassification:
    """Cross-entropy on augmented digits plus ``outlier_weight`` times cross-entropy to the uniform distribution on
    outliers (outlier exposure); AdamW with warmup and cosine decay."""
    model = build_validity_classifier(config)
    images, labels = train
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total = config.iterations
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr(step, total, total // 20 + 1))
    num_outliers = max(1, round(config.outlier_fraction * config.batch_size))
    index_stream = batches(len(images), config.batch_size, generator)
    outlier_stream = batches(len(images), num_outliers, generator)
    model.train()
    for step in tqdm(range(total), desc="validity classifier", mininterval=10):
        index = next(index_stream)
        digits = strong_augment(images[index], generator, config)
        outliers = strong_augment(outlier_images(images[next(outlier_stream)], generator), generator, config)
        logits = model(pixel_values=(torch.cat([digits, outliers]) - 0.5) / 0.5).logits  # (B + b, 10)
        digit_loss = F.cross_entropy(logits[: len(index)], labels[index])
        outlier_loss = -logits[len(index) :].log_softmax(dim=-1).mean()  # cross-entropy to uniform, up to a constant
        loss = digit_loss + config.outlier_weight * outlier_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % config.log_every == 0 or step == total - 1:
            logger.info(
                "validity classifier step %d/%d loss %.4f (digits %.4f, outliers %.4f)",
                step + 1, total, loss.item(), digit_loss.item(), outlier_loss.item(),
            )  # fmt: skip
    return model.eval()


def bake_linear_temperature(model: ConvNextForImageClassification, temperature: float) -> None:
    """Divide the ConvNeXt's final linear layer by ``temperature``: its logits become the calibrated ones."""
    with torch.no_grad():
        model.classifier.weight.div_(temperature)
        model.classifier.bias.div_(temperature)


def record_in_world_info(info_path: Path, entry: dict[str, Any]) -> None:
    """Set the key ``"validity_classifier"`` of a ``world_info.json`` to ``entry``, keeping every other key as it is
    on disk at this moment (read just before the atomic write)."""
    info = json.loads(info_path.read_text(encoding="utf-8"))
    info[WORLD_INFO_KEY] = entry
    atomic_write_json(info_path, info)


def build_validity_classifier_folder(
    out: Path, seed: int = DEFAULT_SEED, config: ValidityClassifierConfig | None = None
) -> dict[str, Any]:
    """Train the validity classifier from ``seed``, save it to ``out`` and return what ``world_info.json`` records.

    The test accuracy is measured on the saved folder as :func:`kldb.loading.load_classifier` loads it.
    """
    from kldb.loading import load_classifier

    config = config or ValidityClassifierConfig()
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    train = load_digits_split("train", config.split_seed)
    val_images, val_labels = load_digits_split("val", config.split_seed)
    test_images, test_labels = load_digits_split("test", config.split_seed)

    started = time.perf_counter()
    model = train_validity_classifier(config, train, generator)
    training_seconds = time.perf_counter() - started
    val_logits = classifier_logits(model, val_images)
    temperature = fit_temperature(val_logits, val_labels)
    test_logits_before = classifier_logits(model, test_images)
    bake_linear_temperature(model, temperature)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_processor().save_pretrained(out)

    oracle = load_classifier(str(out))
    outliers = outlier_images(test_images, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        test_logits = oracle(test_images)
        outlier_max = oracle(outliers).softmax(dim=-1).amax(dim=-1)
    test_max = test_logits.softmax(dim=-1).amax(dim=-1)
    return {
        "architecture": {
            "class": type(model).__name__,
            "patch_size": config.patch_size,
            "hidden_sizes": list(config.hidden_sizes),
            "depths": list(config.depths),
        },
        "seed": seed,
        "split_seed": config.split_seed,
        "parameters": count_parameters(model),
        "test_accuracy": float((test_logits.argmax(dim=-1) == test_labels).float().mean()),
        "temperature": temperature,
        "test_ece_before": expected_calibration_error(test_logits_before, test_labels),
        "test_ece_after": expected_calibration_error(test_logits, test_labels),
        "test_share_max_probability_at_least_0.5": float((test_max >= 0.5).float().mean()),
        "test_outliers_share_max_probability_below_0.5": float((outlier_max < 0.5).float().mean()),
        "training_seconds": round(training_seconds, 1),
        "folder_bytes": folder_size_bytes(out),
        "config": dataclasses.asdict(config),
        "command": f"python -m kldb.digits.validity_classifier --out {out.as_posix()} --seed {seed}",
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the classifier into")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--tiny", action="store_true", help="a tiny network and a few iterations (smoke test)")
    parser.add_argument("--iterations", type=int, default=None, help="override the iteration count")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--world-info",
        type=Path,
        default=None,
        help="the world_info.json to record the classifier in (default: the one beside --out, if there is one)",
    )
    args = parser.parse_args(argv)
    setup_process(args.threads)
    config = ValidityClassifierConfig.tiny() if args.tiny else ValidityClassifierConfig()
    if args.iterations is not None:
        config.iterations = args.iterations
    entry = build_validity_classifier_folder(args.out, args.seed, config)
    info_path = args.world_info if args.world_info is not None else args.out.parent / "world_info.json"
    if info_path.is_file():
        record_in_world_info(info_path, entry)
        logger.info("recorded under %r in %s", WORLD_INFO_KEY, info_path)
    print(json.dumps({key: value for key, value in entry.items() if key != "config"}, indent=2))
    return entry


if __name__ == "__main__":
    main()
