"""Train the digits latent-diffusion world from a seed: classifier, VAE, CLIP text encoder, UNet, scheduler.

Run ``python -m kldb.digits.train --out kldb/digits/world --seed 0`` (about an hour on 2 CPU cores) or add
``--tiny`` for a smoke run of a few iterations. The last stage distils the small decoder the guidance gradient uses
(``guidance_vae/``, :mod:`kldb.digits.guidance_decoder`). Everything is derived from `sklearn.datasets.load_digits`
and the seed; the result is one folder in diffusers layout that `KLDBBoundaryPipeline.from_pretrained` loads.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, LMSDiscreteScheduler, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    ResNetConfig,
    ResNetForImageClassification,
    ViTImageProcessor,
)

from kldb.digits.calibration import expected_calibration_error, fit_temperature
from kldb.digits.data import IMAGE_SIZE, LABELS, augment, load_digits_split, split_indices
from kldb.digits.util import count_parameters, folder_size_bytes, setup_process
from kldb.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

SCRIPT_VERSION = "1.1.0"  # 1.1.0: adds the guidance_vae stage (1.0.0 worlds get it from kldb.digits.guidance_decoder)
DEFAULT_GUIDANCE_SCALE = 7.5
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCABULARY_WORDS: tuple[str, ...] = (
    *LABELS,
    "a", "an", "and", "or", "of", "the", "handwritten", "digit", "digits", "number", "image", "picture",
    "drawing", "written",
)  # fmt: skip
SINGLE_TEMPLATES: tuple[str, ...] = (
    "{0}",
    "a {0}",
    "the {0}",
    "a handwritten {0}",
    "the digit {0}",
    "a handwritten digit {0}",
    "the number {0}",
    "a picture of a {0}",
    "a drawing of the digit {0}",
    "an image of a handwritten {0}",
)
PAIR_TEMPLATES: tuple[str, ...] = (
    "{0} and {1}",
    "a {0} and a {1}",
    "the digits {0} and {1}",
    "a handwritten {0} and {1}",
    "{0} or {1}",
)


@dataclasses.dataclass
class WorldConfig:
    """Sizes and training lengths of every component of the world."""

    classifier_hidden_sizes: tuple[int, ...] = (32, 64, 128)
    classifier_iterations: int = 1500
    classifier_batch_size: int = 128
    classifier_lr: float = 2e-3
    vae_block_out_channels: tuple[int, ...] = (16, 32, 64)
    vae_norm_num_groups: int = 8
    vae_iterations: int = 700
    vae_batch_size: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    latent_copies: int = 16
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    model_max_length: int = 16
    unet_block_out_channels: tuple[int, ...] = (64, 128)
    unet_layers_per_block: int = 1
    unet_attention_head_dim: int = 8
    unet_norm_num_groups: int = 32
    unet_iterations: int = 1300
    unet_batch_size: int = 128
    unet_lr: float = 1e-3
    unet_warmup: int = 100
    ema_decay: float = 0.995
    caption_dropout: float = 0.12
    pair_caption_fraction: float = 0.15
    min_snr_gamma: float = 5.0
    unet_fp16: bool = True
    log_every: int = 100

    @classmethod
    def tiny(cls) -> WorldConfig:
        """Settings for a smoke run of a few seconds: tiny models, a few iterations."""
        return cls(
            classifier_hidden_sizes=(8, 16),
            classifier_iterations=3,
            classifier_batch_size=16,
            vae_block_out_channels=(8, 8, 8),
            vae_norm_num_groups=4,
            vae_iterations=3,
            vae_batch_size=8,
            latent_copies=1,
            text_hidden_size=16,
            text_layers=1,
            text_heads=2,
            unet_block_out_channels=(16, 32),
            unet_attention_head_dim=4,
            unet_norm_num_groups=8,
            unet_iterations=3,
            unet_batch_size=8,
            unet_warmup=1,
            log_every=1,
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def batches(num_items: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of indices into ``range(num_items)``."""
    while True:
        permutation = torch.randperm(num_items, generator=generator)
        for start in range(0, num_items - batch_size + 1, batch_size):
            yield permutation[start : start + batch_size]
        if num_items < batch_size:
            yield permutation


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def byte_symbols() -> list[str]:
    """The 256 printable symbols that byte-level BPE (GPT-2, CLIP) uses for the bytes 0..255, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def build_tokenizer(directory: Path, model_max_length: int) -> CLIPTokenizer:
    """Write a CLIP vocabulary and merges in which every word of `VOCABULARY_WORDS` is a single token.

    The base vocabulary holds every byte symbol with and without the end-of-word marker ``</w>``, so any text
    tokenizes without unknown tokens; the merges build each vocabulary word from left to right.
    """
    directory.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    tokens: list[str] = symbols + [symbol + "</w>" for symbol in symbols]
    merges: list[tuple[str, str]] = []
    for word in sorted(VOCABULARY_WORDS, key=len, reverse=True):  # longer words' merges rank first
        pieces = [*list(word[:-1]), word[-1] + "</w>"]
        prefix = pieces[0]
        for piece in pieces[1:]:
            if (prefix, piece) not in merges:
                merges.append((prefix, piece))
            prefix = prefix + piece
    for left, right in merges:
        if left + right not in tokens:
            tokens.append(left + right)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    atomic_write_text(directory / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    merges_text = "#version: 0.2\n" + "\n".join(f"{left} {right}" for left, right in merges) + "\n"
    atomic_write_text(directory / "merges.txt", merges_text)
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )
    for word in VOCABULARY_WORDS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if ids != [vocab[word + "</w>"]]:
            raise RuntimeError(f"The tokenizer splits `{word}` into {tokenizer.convert_ids_to_tokens(ids)}.")
    return tokenizer


def tokenize(tokenizer: CLIPTokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids ``[B, model_max_length]`` padded as the pipeline pads them."""
    return tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip


def make_caption(label: int, rng: random.Random, caption_dropout: float, pair_fraction: float) -> str:
    """A caption for an image of digit `label`: empty (dropout), one digit, or a pair that includes it."""
    draw = rng.random()
    if draw < caption_dropout:
        return ""
    if draw < caption_dropout + pair_fraction:
        other = rng.choice([digit for digit in range(len(LABELS)) if digit != label])
        pair = [LABELS[label], LABELS[other]]
        rng.shuffle(pair)
        return rng.choice(PAIR_TEMPLATES).format(*pair)
    return rng.choice(SINGLE_TEMPLATES).format(LABELS[label])


# ---------------------------------------------------------------------------------------------------------------------
# Classifier


def build_processor() -> ViTImageProcessor:
    return ViTImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def classifier_logits(
    classifier: ResNetForImageClassification, images: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Logits ``[N, 10]`` for images ``[N, 3, 32, 32]`` in [0, 1], normalised as the image processor does."""
    classifier.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            outputs.append(classifier(pixel_values=(images[start : start + batch_size] - 0.5) / 0.5).logits)
    return torch.cat(outputs)


def train_classifier(
    config: WorldConfig, train: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator
) -> ResNetForImageClassification:
    resnet_config = ResNetConfig(
        num_channels=3,
        embedding_size=config.classifier_hidden_sizes[0],
        hidden_sizes=list(config.classifier_hidden_sizes),
        depths=[1] * len(config.classifier_hidden_sizes),
        layer_type="basic",
        hidden_act="relu",
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: index for index, label in enumerate(LABELS)},
    )
    classifier = ResNetForImageClassification(resnet_config)
    images, labels = train
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=config.classifier_lr, weight_decay=1e-4)
    total = config.classifier_iterations
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr(step, total, total // 20 + 1))
    classifier.train()
    index_stream = batches(len(images), config.classifier_batch_size, generator)
    progress = tqdm(range(total), desc="classifier", mininterval=10)
    for step in progress:
        index = next(index_stream)
        batch = augment(images[index], generator)
        loss = F.cross_entropy(classifier(pixel_values=(batch - 0.5) / 0.5).logits, labels[index], label_smoothing=0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % config.log_every == 0 or step == total - 1:
            progress.set_postfix(loss=f"{loss.item():.4f}")
            logger.info("classifier step %d/%d loss %.4f", step + 1, total, loss.item())
    classifier.eval()
    return classifier


def bake_temperature(classifier: ResNetForImageClassification, temperature: float) -> None:
    """Divide the final linear layer by `temperature`, so the model's logits are the calibrated ones."""
    linear = classifier.classifier[-1]
    with torch.no_grad():
        linear.weight.div_(temperature)
        linear.bias.div_(temperature)


# ---------------------------------------------------------------------------------------------------------------------
# VAE


def train_vae(config: WorldConfig, images: torch.Tensor, generator: torch.Generator) -> AutoencoderKL:
    """An AutoencoderKL from 32x32x3 images in [-1, 1] to a 4-channel latent at 1/4 resolution."""
    levels = len(config.vae_block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.vae_block_out_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=config.vae_norm_num_groups,
        sample_size=IMAGE_SIZE,
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    total = config.vae_iterations
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr(step, total, total // 20 + 1))
    vae.train()
    index_stream = batches(len(images), config.vae_batch_size, generator)
    progress = tqdm(range(total), desc="vae", mininterval=10)
    for step in progress:
        batch = augment(images[next(index_stream)], generator) * 2.0 - 1.0  # (B, 3, 32, 32) in [-1, 1]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        reconstruction_loss = F.mse_loss(reconstruction, batch)
        kl_loss = posterior.kl().mean()
        loss = reconstruction_loss + config.vae_kl_weight * kl_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % config.log_every == 0 or step == total - 1:
            progress.set_postfix(mse=f"{reconstruction_loss.item():.5f}")
            logger.info("vae step %d/%d mse %.5f kl %.1f", step + 1, total, reconstruction_loss.item(), kl_loss.item())
    vae.eval()
    return vae


def encode_latent_bank(
    vae: AutoencoderKL, images: torch.Tensor, copies: int, generator: torch.Generator, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std ``[copies * N, 4, 8, 8]`` of the images and `copies - 1` augmented copies."""
    means, stds = [], []
    with torch.no_grad():
        for copy_index in range(copies):
            source = images if copy_index == 0 else augment(images, generator)
            for start in range(0, len(source), batch_size):
                posterior = vae.encode(source[start : start + batch_size] * 2.0 - 1.0).latent_dist
                means.append(posterior.mean)
                stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------------------------------------------------------------
# Text encoder and UNet


def build_text_encoder(config: WorldConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden_size,
        intermediate_size=4 * config.text_hidden_size,
        projection_dim=config.text_hidden_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.model_max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModel(text_config)


def build_unet(config: WorldConfig, latent_size: int) -> UNet2DConditionModel:
    levels = len(config.unet_block_out_channels)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        block_out_channels=config.unet_block_out_channels,
        layers_per_block=config.unet_layers_per_block,
        attention_head_dim=config.unet_attention_head_dim,
        cross_attention_dim=config.text_hidden_size,
        norm_num_groups=config.unet_norm_num_groups,
    )


def noise_schedule() -> DDPMScheduler:
    """The Stable Diffusion v1.4 training schedule."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False,
    )  # fmt: skip


def sampling_scheduler() -> LMSDiscreteScheduler:
    """The k-LMS sampler on the Stable Diffusion v1.4 schedule (with its ``steps_offset`` of 1)."""
    return LMSDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1,
    )  # fmt: skip


class ExponentialMovingAverage:
    """An exponential moving average of a set of modules' parameters, with the usual warmup of the decay."""

    def __init__(self, modules: Sequence[torch.nn.Module], decay: float) -> None:
        self.modules = [copy.deepcopy(module).eval().requires_grad_(False) for module in modules]
        self.decay = decay
        self.steps = 0

    @torch.no_grad()
    def update(self, modules: Sequence[torch.nn.Module]) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for average, module in zip(self.modules, modules):
            for average_parameter, parameter in zip(average.parameters(), module.parameters()):
                average_parameter.lerp_(parameter, 1.0 - decay)


def train_unet(
    config: WorldConfig,
    tokenizer: CLIPTokenizer,
    latent_bank: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scaling_factor: float,
    generator: torch.Generator,
    rng: random.Random,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Train UNet and text encoder jointly (DDPM, epsilon prediction, min-SNR weighting, caption dropout)."""
    means, stds, labels = latent_bank
    text_encoder = build_text_encoder(config, tokenizer)
    unet = build_unet(config, latent_size=means.shape[-1])
    logger.info(
        "unet %d parameters, text encoder %d parameters", count_parameters(unet), count_parameters(text_encoder)
    )
    schedule = noise_schedule()
    alphas_cumprod = schedule.alphas_cumprod
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    loss_weights = torch.clamp(snr, max=config.min_snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.unet_lr, weight_decay=1e-2)
    total = config.unet_iterations
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_lr(step, total, config.unet_warmup)
    )
    ema = ExponentialMovingAverage([unet, text_encoder], config.ema_decay)
    token_cache: dict[str, torch.Tensor] = {}
    unet.train()
    text_encoder.train()
    index_stream = batches(len(means), config.unet_batch_size, generator)
    progress = tqdm(range(total), desc="unet", mininterval=10)
    started = time.perf_counter()
    for step in progress:
        index = next(index_stream)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scaling_factor
        captions = [
            make_caption(int(label), rng, config.caption_dropout, config.pair_caption_fraction)
            for label in labels[index]
        ]
        for caption in captions:
            if caption not in token_cache:
                token_cache[caption] = tokenize(tokenizer, [caption])[0]
        input_ids = torch.stack([token_cache[caption] for caption in captions])
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, schedule.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy_latents = schedule.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids=input_ids).last_hidden_state  # (B, T, D)
        prediction = unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weights[timesteps]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_scheduler.step()
        ema.update([unet, text_encoder])
        if step % config.log_every == 0 or step == total - 1:
            elapsed = time.perf_counter() - started
            progress.set_postfix(loss=f"{loss.item():.4f}")
            logger.info(
                "unet step %d/%d loss %.4f (%.2f s/it, %.1f min elapsed)",
                step + 1, total, loss.item(), elapsed / (step + 1), elapsed / 60,
            )  # fmt: skip
    ema_unet, ema_text_encoder = ema.modules
    return ema_unet, ema_text_encoder


# ---------------------------------------------------------------------------------------------------------------------
# Saving


def save_world(
    out: Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    scheduler: LMSDiscreteScheduler,
    classifier: ResNetForImageClassification,
    processor: ViTImageProcessor,
) -> None:
    """Save every component in its subfolder, then the whole pipeline (which writes ``model_index.json``)."""
    components = {
        "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet, "scheduler": scheduler,
        "classifier": classifier, "classifier_processor": processor,
    }  # fmt: skip
    for name, component in components.items():
        if isinstance(component, torch.nn.Module):
            component.save_pretrained(out / name, safe_serialization=True)
        else:
            component.save_pretrained(out / name)
    from pipeline_kldb_boundary import KLDBBoundaryPipeline  # installed with the package: always importable

    pipeline = KLDBBoundaryPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        classifier=classifier, classifier_processor=processor,
    )  # fmt: skip
    pipeline.save_pretrained(out, safe_serialization=True)


def build_world(out: Path, seed: int, config: WorldConfig, guidance_decoder: Any = None) -> dict:
    """Train every component from `seed` and write the world folder and its ``world_info.json``.

    ``guidance_decoder``: a :class:`~kldb.digits.guidance_decoder.GuidanceDecoderConfig` for the last stage (``None``:
    its defaults)."""
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    train_images, train_labels = load_digits_split("train", seed)
    val_images, val_labels = load_digits_split("val", seed)
    test_images, test_labels = load_digits_split("test", seed)
    logger.info("split sizes: train %d, val %d, test %d", len(train_images), len(val_images), len(test_images))

    started = time.perf_counter()
    tokenizer = build_tokenizer(out / "tokenizer", config.model_max_length)
    timings["tokenizer"] = time.perf_counter() - started

    started = time.perf_counter()
    classifier = train_classifier(config, (train_images, train_labels), generator)
    val_logits = classifier_logits(classifier, val_images)
    test_logits = classifier_logits(classifier, test_images)
    temperature = fit_temperature(val_logits, val_labels)
    calibration = {
        "temperature": temperature,
        "val_ece_before": expected_calibration_error(val_logits, val_labels),
        "val_ece_after": expected_calibration_error(val_logits / temperature, val_labels),
        "test_ece_before": expected_calibration_error(test_logits, test_labels),
        "test_ece_after": expected_calibration_error(test_logits / temperature, test_labels),
        "test_accuracy": float((test_logits.argmax(-1) == test_labels).float().mean()),
    }
    bake_temperature(classifier, temperature)
    timings["classifier"] = time.perf_counter() - started
    logger.info("classifier calibration: %s", calibration)

    started = time.perf_counter()
    vae = train_vae(config, train_images, generator)
    with torch.no_grad():
        reconstructed = torch.cat(
            [
                vae(test_images[start : start + 256] * 2.0 - 1.0, sample_posterior=False).sample.add(1.0).div(2.0)
                for start in range(0, len(test_images), 256)
            ]
        ).clamp(0.0, 1.0)
    reconstruction_accuracy = float(
        (classifier_logits(classifier, reconstructed).argmax(-1) == test_labels).float().mean()
    )
    reconstruction_mse = float(F.mse_loss(reconstructed, test_images))
    means, stds = encode_latent_bank(vae, train_images, config.latent_copies, generator)
    latent_samples = means + stds * torch.randn(means.shape, generator=generator)
    scaling_factor = float(1.0 / latent_samples.flatten().std())
    vae.register_to_config(scaling_factor=scaling_factor)
    timings["vae"] = time.perf_counter() - started
    logger.info(
        "vae: test mse %.5f, classifier accuracy on reconstructions %.4f, scaling_factor %.4f",
        reconstruction_mse, reconstruction_accuracy, scaling_factor,
    )  # fmt: skip

    started = time.perf_counter()
    latent_labels = train_labels.repeat(config.latent_copies)
    unet, text_encoder = train_unet(config, tokenizer, (means, stds, latent_labels), scaling_factor, generator, rng)
    timings["unet_and_text_encoder"] = time.perf_counter() - started

    parameters = {
        "vae": count_parameters(vae), "text_encoder": count_parameters(text_encoder), "unet": count_parameters(unet),
        "classifier": count_parameters(classifier),
    }  # fmt: skip
    if config.unet_fp16:
        unet = unet.to(torch.float16)
    save_world(out, vae, text_encoder, tokenizer, unet, sampling_scheduler(), classifier, build_processor())
    info = {
        "seed": seed,
        "script_version": SCRIPT_VERSION,
        "default_guidance_scale": DEFAULT_GUIDANCE_SCALE,
        "split_sizes": {name: len(indices) for name, indices in split_indices(seed).items()},
        "training_seconds": {**{name: round(value, 1) for name, value in timings.items()}},
        "parameters": parameters,
        "unet_dtype": "float16" if config.unet_fp16 else "float32",
        "config": dataclasses.asdict(config),
        "classifier": calibration,
        "vae": {
            "scaling_factor": scaling_factor,
            "test_reconstruction_mse": reconstruction_mse,
            "classifier_accuracy_on_test_reconstructions": reconstruction_accuracy,
        },
        "folder_bytes": 0,
    }
    info["training_seconds"]["total"] = round(sum(timings.values()), 1)
    info_path = out / "world_info.json"
    info["folder_bytes"] = folder_size_bytes(out)
    atomic_write_json(info_path, info)

    # the small decoder for the guidance gradient, distilled from the saved world (it records itself in the info)
    from kldb.digits.guidance_decoder import GuidanceDecoderConfig, add_guidance_vae

    started = time.perf_counter()
    add_guidance_vae(out, seed, guidance_decoder or GuidanceDecoderConfig())
    info = json.loads(info_path.read_text(encoding="utf-8"))
    info["training_seconds"]["guidance_vae"] = round(time.perf_counter() - started, 1)
    info["training_seconds"]["total"] = round(
        info["training_seconds"]["total"] + info["training_seconds"]["guidance_vae"], 1
    )
    atomic_write_json(info_path, info)
    return info


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the world into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny models and a few iterations (smoke test)")
    parser.add_argument("--unet-iterations", type=int, default=None, help="override the UNet iteration count")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    setup_process(args.threads)
    config = WorldConfig.tiny() if args.tiny else WorldConfig()
    if args.unet_iterations is not None:
        config.unet_iterations = args.unet_iterations
    from kldb.digits.guidance_decoder import GuidanceDecoderConfig

    info = build_world(args.out, args.seed, config, GuidanceDecoderConfig.tiny() if args.tiny else None)
    print(json.dumps({key: info[key] for key in ("training_seconds", "parameters", "classifier", "vae")}, indent=2))


if __name__ == "__main__":
    main()
