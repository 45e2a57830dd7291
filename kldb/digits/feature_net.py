"""An independent feature network for the digits world: the encoder of a denoising autoencoder.

FID in the audited classifier's own penultimate space measures distance in the very space the KLDB guidance moves
through. This network is the digits world's analogue of the paper's InceptionV3: a feature space the guidance does not
optimise. It differs from the audited classifier (:mod:`kldb.digits.train`, a ResNet trained on labels from seed 0) in

- architecture: a plain convolutional autoencoder (stride-2 convolutions, GroupNorm, SiLU, no residual connections)
  whose encoder ends in a linear 64-d embedding;
- objective: denoising reconstruction of augmented training images from Gaussian-noised copies, without labels;
- seed: 1 by default (the world uses 0); only the split is the world's (seed 0), so the test split stays held out.

Its features (:meth:`DenoisingAutoencoder.forward`: images ``[B, 3, H, W]`` in ``[0, 1]`` to ``[B, 64]``) are what
:mod:`kldb.quality` uses as the "independent" space. A k-NN classifier and a linear probe on these features (fitted on
the training split, scored on the test split) show that they separate the digits.

Run ``python -m kldb.digits.feature_net --out kldb/digits/world/feature_net`` (a few minutes on 2 CPU cores). It writes
``model.safetensors`` and ``config.json`` into ``--out`` and records the network under the key ``"feature_net"`` of the
world's ``world_info.json`` (the folder above ``--out``; ``--world-info`` to name another file). The result is a
function of the seed, the split seed and the thread count (``--threads``, 1 by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from kldb.digits.data import IMAGE_SIZE, augment, load_digits_split
from kldb.digits.train import batches, cosine_lr, seed_everything
from kldb.digits.util import count_parameters, setup_process
from kldb.errors import KLDBInputError, KLDBPathError
from kldb.io import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

SCRIPT_VERSION = "1.0.0"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: Where the shipped network lies (beside the world's components).
DEFAULT_PATH = Path(__file__).resolve().parent / "world" / "feature_net"
#: The world-info key the network is recorded under.
WORLD_INFO_KEY = "feature_net"
#: k of the k-NN accuracy recorded for the features.
KNN_NEIGHBOURS = 5
#: The noise level of the recorded denoising loss on the validation split.
EVAL_NOISE_STD = 0.2
ARCHITECTURE = (
    "convolutional denoising autoencoder: encoder of stride-2 3x3 convolutions (GroupNorm, SiLU, no residual "
    "connections) and a linear embedding; mirrored decoder (nearest upsampling, 3x3 convolutions, sigmoid output)"
)
OBJECTIVE = (
    "denoising reconstruction: mean squared error between the decoder's output for a Gaussian-noised, augmented "
    "training image (noise std uniform in [0, max_noise_std]) and the clean augmented image; no labels"
)


@dataclasses.dataclass
class FeatureNetConfig:
    """The architecture, saved as ``config.json`` beside the weights."""

    channels: tuple[int, ...] = (16, 32, 64)  # one stride-2 convolution each: 32 -> 16 -> 8 -> 4 pixels
    embedding_dim: int = 64
    norm_groups: int = 8
    image_size: int = IMAGE_SIZE

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if self.image_size % 2 ** len(self.channels):
            raise KLDBInputError(
                f"Expected argument `image_size` to be divisible by 2 ** len(channels) = {2 ** len(self.channels)} "
                f"but got {self.image_size}."
            )


@dataclasses.dataclass
class FeatureNetTraining:
    """How the network is trained."""

    iterations: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    max_noise_std: float = 0.4
    log_every: int = 100

    @classmethod
    def tiny(cls) -> FeatureNetTraining:
        """A smoke-test setting: a few iterations."""
        return cls(iterations=4, batch_size=16, warmup=1, log_every=1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


class DenoisingAutoencoder(nn.Module):
    """A convolutional denoising autoencoder whose encoder output ``[B, embedding_dim]`` is the feature vector.

    The forward pass is the feature extractor (the contract of torchmetrics' custom FID/KID features): images
    ``[B, 3, H, W]`` in ``[0, 1]`` (resized bilinearly to ``image_size`` when they differ) to ``[B, embedding_dim]``.
    """

    def __init__(self, config: FeatureNetConfig | None = None):
        super().__init__()
        self.config = config or FeatureNetConfig()
        channels, groups = self.config.channels, self.config.norm_groups
        self.bottom_size = self.config.image_size // 2 ** len(channels)
        layers: list[nn.Module] = []
        previous = 3
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1), _norm(width, groups), nn.SiLU()]
            previous = width
        self.encoder = nn.Sequential(*layers)
        flat = channels[-1] * self.bottom_size**2
        self.to_embedding = nn.Linear(flat, self.config.embedding_dim)
        self.from_embedding = nn.Linear(self.config.embedding_dim, flat)
        layers = []
        for width in (*reversed(channels[:-1]), channels[0]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(previous, width, 3, padding=1)]
            layers += [_norm(width, groups), nn.SiLU()]
            previous = width
        layers.append(nn.Conv2d(previous, 3, 3, padding=1))
        self.decoder = nn.Sequential(*layers)

    @property
    def num_features(self) -> int:
        """The width of the feature vector."""
        return self.config.embedding_dim

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` to embeddings ``[B, embedding_dim]``."""
        size = self.config.image_size
        if tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        hidden = self.encoder(images * 2.0 - 1.0)  # (B, C, s, s)
        return self.to_embedding(hidden.flatten(1))  # (B, d)

    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, embedding_dim]`` to images ``[B, 3, image_size, image_size]`` in ``[0, 1]``."""
        hidden = F.silu(self.from_embedding(embeddings))
        hidden = hidden.view(len(embeddings), self.config.channels[-1], self.bottom_size, self.bottom_size)
        return torch.sigmoid(self.decoder(hidden))

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Decode the embedding of ``images``."""
        return self.decode(self.encode(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)

    def encoder_parameters(self) -> int:
        """The number of parameters the features depend on (encoder and embedding layer)."""
        return count_parameters(self.encoder) + count_parameters(self.to_embedding)


# ---------------------------------------------------------------------------------------------------------------------
# Training and evaluation


def add_noise(images: torch.Tensor, std: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    """``images + std * N(0, 1)``, clamped to ``[0, 1]``; ``std`` a number or ``[B, 1, 1, 1]``."""
    return (images + std * torch.randn(images.shape, generator=generator)).clamp(0.0, 1.0)


def train_feature_net(
    seed: int = 1,
    split_seed: int = 0,
    config: FeatureNetConfig | None = None,
    training: FeatureNetTraining | None = None,
    evaluate: bool = True,
) -> tuple[DenoisingAutoencoder, dict[str, Any]]:
    """Train the denoising autoencoder on the training split of the digits world; no labels are used.

    Args:
        seed: the seed of the initialisation, the batches, the augmentation and the noise.
        split_seed: the seed of the world's train / val / test split (the shipped world uses 0).
        config: the architecture.
        training: the optimisation settings.
        evaluate: add the figures of :func:`evaluate_feature_net` to the record.

    Returns:
        The trained network (in eval mode) and its record: settings, parameter counts, training seconds and (with
        ``evaluate``) the figures of :func:`evaluate_feature_net`.
    """
    config = config or FeatureNetConfig()
    training = training or FeatureNetTraining()
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DenoisingAutoencoder(config)
    images, _ = load_digits_split("train", split_seed)  # labels are not used
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    total = training.iterations
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr(step, total, training.warmup))
    index_stream = batches(len(images), training.batch_size, generator)
    model.train()
    started = time.perf_counter()
    progress = tqdm(range(total), desc="feature net", mininterval=10)
    for step in progress:
        clean = augment(images[next(index_stream)], generator)  # (B, 3, 32, 32)
        std = torch.rand(len(clean), 1, 1, 1, generator=generator) * training.max_noise_std
        loss = F.mse_loss(model.reconstruct(add_noise(clean, std, generator)), clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % training.log_every == 0 or step == total - 1:
            progress.set_postfix(loss=f"{loss.item():.5f}")
            logger.info("feature net step %d/%d loss %.5f", step + 1, total, loss.item())
    seconds = time.perf_counter() - started
    model.eval().requires_grad_(False)
    record = {
        "script": "python -m kldb.digits.feature_net",
        "script_version": SCRIPT_VERSION,
        "architecture": ARCHITECTURE,
        "objective": OBJECTIVE,
        "features": f"the {config.embedding_dim}-d embedding (encoder output), DenoisingAutoencoder.forward",
        "seed": seed,
        "split_seed": split_seed,
        "threads": torch.get_num_threads(),
        "config": dataclasses.asdict(config),
        "training": dataclasses.asdict(training),
        "parameters": {"encoder": model.encoder_parameters(), "total": count_parameters(model)},
        "training_seconds": round(seconds, 1),
    }
    if evaluate:
        record.update(evaluate_feature_net(model, split_seed))
    return model, record


@torch.no_grad()
def embed(model: DenoisingAutoencoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features ``[N, d]`` of images ``[N, 3, H, W]`` in ``[0, 1]``, in batches."""
    model.eval()
    return torch.cat([model(images[start : start + batch_size]) for start in range(0, len(images), batch_size)])


@torch.no_grad()
def evaluate_feature_net(model: DenoisingAutoencoder, split_seed: int = 0) -> dict[str, Any]:
    """Reconstruction losses on the validation split and how well the features separate the digits on the test split.

    Returns:
        ``val_reconstruction_mse`` (clean input), ``val_denoising_mse`` (input with Gaussian noise of std
        :data:`EVAL_NOISE_STD`, drawn from seed 0), ``test_knn_accuracy`` (a :data:`KNN_NEIGHBOURS`-NN classifier on
        the features of the training split) and ``test_linear_probe_accuracy`` (logistic regression on standardised
        features of the training split), with ``knn_neighbours``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model.eval()
    val_images, _ = load_digits_split("val", split_seed)
    noisy = add_noise(val_images, EVAL_NOISE_STD, torch.Generator().manual_seed(0))
    train_images, train_labels = load_digits_split("train", split_seed)
    test_images, test_labels = load_digits_split("test", split_seed)
    train_features = embed(model, train_images).double().numpy()
    test_features = embed(model, test_images).double().numpy()
    knn = KNeighborsClassifier(n_neighbors=KNN_NEIGHBOURS).fit(train_features, train_labels.numpy())
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(
        train_features, train_labels.numpy()
    )
    return {
        "val_reconstruction_mse": float(F.mse_loss(model.reconstruct(val_images), val_images)),
        "val_denoising_mse": float(F.mse_loss(model.reconstruct(noisy), val_images)),
        "eval_noise_std": EVAL_NOISE_STD,
        "knn_neighbours": KNN_NEIGHBOURS,
        "test_knn_accuracy": float(knn.score(test_features, test_labels.numpy())),
        "test_linear_probe_accuracy": float(probe.score(test_features, test_labels.numpy())),
        "test_size": len(test_labels),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Saving and loading (safetensors and JSON: no pickle)


def save_feature_net(model: DenoisingAutoencoder, out: str | Path) -> dict[str, Any]:
    """Write ``model.safetensors`` and ``config.json`` into ``out`` atomically; returns the weights' size and sha256."""
    from safetensors.torch import save

    folder = Path(out)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    data = save(state, metadata={"format": "pt"})  # one key: safetensors orders several at random
    atomic_write_bytes(folder / WEIGHTS_NAME, data)
    config = {"class": type(model).__name__, "script_version": SCRIPT_VERSION, **dataclasses.asdict(model.config)}
    atomic_write_json(folder / CONFIG_NAME, config)
    return {"weights_bytes": len(data), "weights_sha256": hashlib.sha256(data).hexdigest()}


def load_feature_net(path: str | Path | None = None, device: str | torch.device = "cpu") -> DenoisingAutoencoder:
    """Load a feature network saved by :func:`save_feature_net` (by default the shipped one), in eval mode, frozen.

    Args:
        path: a folder with ``model.safetensors`` and ``config.json``; ``None`` for :data:`DEFAULT_PATH`.
        device: where to put it.
    """
    from safetensors.torch import load_file

    folder = DEFAULT_PATH if path is None else Path(path)
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / CONFIG_NAME).is_file():
        raise KLDBPathError(
            f"Expected argument `path` to be a folder with {WEIGHTS_NAME} and {CONFIG_NAME} but got {str(folder)!r}; "
            f"train one with `python -m kldb.digits.feature_net --out {folder}`."
        )
    saved = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    if saved.get("class") != DenoisingAutoencoder.__name__:
        raise KLDBInputError(
            f"Expected the {CONFIG_NAME} in `path` to describe a {DenoisingAutoencoder.__name__} but got "
            f"class {saved.get('class')!r} in {str(folder)!r}."
        )
    fields = {field.name for field in dataclasses.fields(FeatureNetConfig)}
    model = DenoisingAutoencoder(FeatureNetConfig(**{key: value for key, value in saved.items() if key in fields}))
    model.load_state_dict(load_file(folder / WEIGHTS_NAME))  # strict: every tensor, with its shape
    return model.to(device).eval().requires_grad_(False)


def record_in_world_info(info_path: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Set the key :data:`WORLD_INFO_KEY` of a ``world_info.json`` to ``record``, keeping every other key as it is."""
    path = Path(info_path)
    info = json.loads(path.read_text(encoding="utf-8"))  # read just before writing: other keys may have changed
    info[WORLD_INFO_KEY] = record
    atomic_write_json(path, info, indent=2)
    return info


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH, help="folder to write the network into")
    parser.add_argument("--seed", type=int, default=1, help="training seed (the world's classifier used 0)")
    parser.add_argument("--split-seed", type=int, default=0, help="the world's train / val / test split seed")
    parser.add_argument(
        "--world-info", type=Path, default=None,
        help="world_info.json to record the network in (default: the one in the folder above --out, if any)",
    )  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="a few iterations (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (part of what fixes the result)")
    args = parser.parse_args(argv)
    if args.world_info is not None and not args.world_info.is_file():
        raise KLDBPathError(
            f"Expected argument `--world-info` to be an existing file but got {str(args.world_info)!r}."
        )
    info_path = args.world_info if args.world_info is not None else args.out.parent / "world_info.json"
    setup_process(args.threads)
    training = FeatureNetTraining.tiny() if args.tiny else FeatureNetTraining()
    model, record = train_feature_net(seed=args.seed, split_seed=args.split_seed, training=training)
    record.update(save_feature_net(model, args.out))
    record["path"] = args.out.name
    if info_path.is_file():
        record_in_world_info(info_path, record)
        logger.info("recorded under %r in %s", WORLD_INFO_KEY, info_path)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
