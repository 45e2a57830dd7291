"""The handwritten digits of scikit-learn as 32x32 RGB images, with the world's fixed split and augmentation."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

LABELS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_SIZE = 32
VAL_FRACTION = 0.1
TEST_FRACTION = 0.2


def split_indices(seed: int = 0) -> dict[str, np.ndarray]:
    """Stratified train / val / test indices into `sklearn.datasets.load_digits`, derived from `seed` alone."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    all_indices = np.arange(len(labels))
    rest, test = train_test_split(all_indices, test_size=TEST_FRACTION, stratify=labels, random_state=seed)
    val_size = VAL_FRACTION / (1.0 - TEST_FRACTION)
    train, val = train_test_split(rest, test_size=val_size, stratify=labels[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def load_digits_split(split: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the images ``[N, 3, 32, 32]`` in [0, 1] and labels ``[N]`` of one split of the digits world.

    The 8x8 images (values 0..16) are scaled to [0, 1], upsampled bilinearly to 32x32 and repeated over
    three channels. The split is stratified and derived from `seed` (the shipped world uses seed 0).
    """
    if split not in SPLITS:
        raise ValueError(f"Expected argument `split` to be one of {list(SPLITS)} but got {split!r}.")
    from sklearn.datasets import load_digits

    digits = load_digits()
    indices = split_indices(seed)[split]
    small = torch.from_numpy(digits.images[indices]).float().div(16.0).unsqueeze(1)  # (N, 1, 8, 8)
    images = F.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0).repeat(1, 3, 1, 1)  # (N, 3, 32, 32)
    labels = torch.from_numpy(digits.target[indices]).long()
    return images.contiguous(), labels


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    max_shift: float = 3.0,
    scale_range: tuple[float, float] = (0.85, 1.1),
    max_rotation_degrees: float = 8.0,
) -> torch.Tensor:
    """Random small shifts (in pixels), scale changes and rotations of a batch ``[B, C, H, W]``, zero background."""
    batch, _, height, _ = images.shape
    uniform = torch.rand(batch, 4, generator=generator)
    shift = (uniform[:, :2] * 2.0 - 1.0) * (2.0 * max_shift / height)
    scale = scale_range[0] + uniform[:, 2] * (scale_range[1] - scale_range[0])
    angle = (uniform[:, 3] * 2.0 - 1.0) * math.radians(max_rotation_degrees)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], dim=1), torch.stack([sin, cos, shift[:, 1]], dim=1)], dim=1
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
