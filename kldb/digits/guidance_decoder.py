"""Distil a small, fast decoder for the guidance gradient of the digits world (its ``guidance_vae``).

KLDB guidance backpropagates through the VAE decoder at every guided step. Only the gradient's direction matters
(Equation 2 normalises it), so a much smaller decoder that agrees with the real one on the images *the guidance
decodes* (predicted clean latents ``x0 = z - sigma * eps`` along sampling trajectories) gives nearly the same update
at a fraction of the cost. This is the digits world's counterpart of TAESD (diffusers' ``AutoencoderTiny``) for
Stable Diffusion latents; it is an ``AutoencoderTiny`` too, so the pipeline treats both alike.

The decoder is trained to reproduce the world's VAE decoder (outputs, and the vector-Jacobian products of the
classifier's KLDB gradients, which is what the guidance uses) on

- clean latents: posterior samples of the training images and augmented copies, and
- predicted clean latents of the world's UNet at the k-LMS sampler's noise levels, for digit and pair captions.

Its encoder is distilled from the VAE's posterior mean, so the component is a complete autoencoder. Run
``python -m kldb.digits.guidance_decoder --world kldb/digits/world --seed 0`` (a few minutes on 2 CPU cores); it writes
``guidance_vae/`` into the world folder, registers it in ``model_index.json`` and records its fidelity figures in
``world_info.json``. Fidelity is measured on held-out test-split latents against the full decoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny, LMSDiscreteScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from kldb.digits.data import LABELS, augment, load_digits_split
from kldb.digits.util import count_parameters, folder_size_bytes, setup_process
from kldb.io import atomic_write_json
from pipeline_kldb_boundary import as_image_classifier, class_prompt, kldb_score

logger = logging.getLogger(__name__)

SCRIPT_VERSION = "1.0.0"
#: The class pair the fidelity figures are measured for (the digits world's "three and eight" study).
FIDELITY_CLASSES = (3, 8)


@dataclasses.dataclass
class GuidanceDecoderConfig:
    """Architecture and training of the distilled guidance decoder."""

    channels: int = 16  # AutoencoderTiny blocks keep one width per model
    decoder_blocks: tuple[int, ...] = (1, 1, 1)  # one per resolution: 8 -> 16 -> 32 pixels
    encoder_blocks: tuple[int, ...] = (1, 1, 1)
    iterations: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    vjp_weight: float = 0.1  # weight of the vector-Jacobian-product term (the guidance's own use of the decoder)
    clean_copies: int = 4  # training images plus augmented copies, encoded
    predicted_latents: int = 8192  # UNet x0 predictions at sampler noise levels
    sampler_steps: int = 40
    log_every: int = 250

    @classmethod
    def tiny(cls) -> GuidanceDecoderConfig:
        """A smoke-test configuration: a few iterations on a few latents."""
        return cls(channels=8, iterations=4, batch_size=8, clean_copies=1, predicted_latents=16, log_every=1)


def build_guidance_vae(config: GuidanceDecoderConfig, latent_channels: int, levels: int) -> AutoencoderTiny:
    """An ``AutoencoderTiny`` with ``levels`` resolutions (the VAE's downsampling is ``2 ** (levels - 1)``).

    ``scaling_factor=1``: it takes the *scaled* latents the UNet works in, as TAESD does for Stable Diffusion.
    """
    if len(config.decoder_blocks) != levels or len(config.encoder_blocks) != levels:
        raise ValueError(
            f"Expected `decoder_blocks` and `encoder_blocks` to have {levels} entries (one per VAE resolution) but "
            f"got {config.decoder_blocks} and {config.encoder_blocks}."
        )
    return AutoencoderTiny(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(config.channels,) * levels,
        decoder_block_out_channels=(config.channels,) * levels,
        num_encoder_blocks=tuple(config.encoder_blocks),
        num_decoder_blocks=tuple(config.decoder_blocks),
        latent_channels=latent_channels,
        scaling_factor=1.0,
    )


def _captions(labels: torch.Tensor, rng: random.Random) -> list[str]:
    """One digit or a pair containing it (the paper's prompt, as the pipeline builds it), per label."""
    captions = []
    for label in labels.tolist():
        if rng.random() < 0.5:
            captions.append(LABELS[label])
        else:
            other = rng.choice([d for d in range(len(LABELS)) if d != label])
            pair = [label, other]
            rng.shuffle(pair)
            captions.append(class_prompt(LABELS, pair))
    return captions


@torch.no_grad()
def latent_bank(
    pipeline: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: GuidanceDecoderConfig,
    generator: torch.Generator,
    rng: random.Random,
    copies: int,
    predicted: int,
    batch_size: int = 256,
) -> torch.Tensor:
    """Scaled latents ``[M, c, h, w]``: posterior samples of ``images`` (and augmented copies) and UNet predictions
    ``x0 = z - sigma * eps(z)`` from them at noise levels of the k-LMS sampler."""
    vae: AutoencoderKL = pipeline.vae
    unet: UNet2DConditionModel = pipeline.unet
    scaling = vae.config.scaling_factor
    clean, clean_labels = [], []
    for copy_index in range(copies):
        source = images if copy_index == 0 else augment(images, generator)
        for start in range(0, len(source), batch_size):
            posterior = vae.encode(source[start : start + batch_size] * 2.0 - 1.0).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=generator)
            clean.append((posterior.mean + posterior.std * noise) * scaling)
            clean_labels.append(labels[start : start + batch_size])
    clean_latents, clean_labels_all = torch.cat(clean), torch.cat(clean_labels)

    scheduler = LMSDiscreteScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(config.sampler_steps)
    sigmas, timesteps = scheduler.sigmas[:-1], scheduler.timesteps
    predictions = []
    for start in range(0, predicted, batch_size):
        count = min(batch_size, predicted - start)
        pick = torch.randint(len(clean_latents), (count,), generator=generator)
        level = torch.randint(len(timesteps), (count,), generator=generator)
        x, sigma = clean_latents[pick], sigmas[level].view(-1, 1, 1, 1)
        z = x + sigma * torch.randn(x.shape, generator=generator)
        embeds = pipeline.encode_prompt(_captions(clean_labels_all[pick], rng), x.device, 1, False)[0]
        model_input = (z / (sigma**2 + 1) ** 0.5).to(unet.dtype)
        eps = unet(model_input, timesteps[level], encoder_hidden_states=embeds.to(unet.dtype), return_dict=False)[0]
        predictions.append(z - sigma * eps.float())
    return torch.cat([clean_latents, *predictions])


def _classifier_fn(pipeline: Any):
    return as_image_classifier(pipeline.classifier, pipeline.classifier_processor)


def _kldb_cotangents(classify, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Unit-norm gradients ``[B, 3, H, W]`` of KLDB for a random class pair per image, at ``images`` in [-1, 1]:
    the vectors the guidance pulls back through the decoder."""
    pairs = torch.stack([torch.randperm(len(LABELS), generator=generator)[:2] for _ in range(len(images))])
    with torch.enable_grad():
        x = images.detach().requires_grad_(True)
        logits = classify((x / 2 + 0.5).clamp(0, 1))
        scores = torch.stack([kldb_score(logits[i : i + 1], pairs[i].tolist())[0] for i in range(len(images))])
        (grad,) = torch.autograd.grad(scores.sum(), x)
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def train_guidance_vae(
    pipeline: Any,
    config: GuidanceDecoderConfig,
    generator: torch.Generator,
    rng: random.Random,
    split_seed: int = 0,
) -> tuple[AutoencoderTiny, dict[str, Any]]:
    """Distil the guidance decoder from ``pipeline`` (a loaded digits world whose data split was drawn with
    ``split_seed``); returns it and its training record."""
    vae, classify = pipeline.vae, _classifier_fn(pipeline)
    for module in (vae, pipeline.unet, pipeline.text_encoder, pipeline.classifier):
        module.requires_grad_(False).eval()
    images, labels = load_digits_split("train", split_seed)
    started = time.perf_counter()
    bank = latent_bank(pipeline, images, labels, config, generator, rng, config.clean_copies, config.predicted_latents)
    # targets: the VAE decoder's output, and its vector-Jacobian product with a KLDB gradient (a random class pair
    # per latent), i.e. what the guidance pulls back through the decoder
    targets, cotangents, vjps, vjp_norms = [], [], [], []
    for chunk in bank.split(256):
        with torch.enable_grad():
            x = chunk.clone().requires_grad_(True)
            decoded = vae.decode(x / vae.config.scaling_factor).sample
            cotangent = _kldb_cotangents(classify, decoded.detach(), generator)
            (vjp,) = torch.autograd.grad(decoded, x, grad_outputs=cotangent)
        targets.append(decoded.detach())
        cotangents.append(cotangent)
        norm = vjp.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        vjps.append(vjp / norm)
        vjp_norms.append(norm)
    targets, cotangents = torch.cat(targets), torch.cat(cotangents)
    vjps, vjp_norms = torch.cat(vjps), torch.cat(vjp_norms)
    with torch.no_grad():
        encoder_targets = torch.cat(
            [vae.encode(b * 2.0 - 1.0).latent_dist.mean * vae.config.scaling_factor for b in images.split(256)]
        )
    bank_seconds = time.perf_counter() - started

    levels = len(vae.config.block_out_channels)
    tiny = build_guidance_vae(config, vae.config.latent_channels, levels)
    optimizer = torch.optim.AdamW(tiny.parameters(), lr=config.lr, weight_decay=0.0)
    total = config.iterations
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total, pct_start=0.05)
    tiny.train()
    started = time.perf_counter()
    progress = tqdm(range(total), desc="guidance decoder", mininterval=10)
    for step in progress:
        pick = torch.randint(len(bank), (config.batch_size,), generator=generator)
        latents, target = bank[pick], targets[pick]
        x = latents.clone().requires_grad_(config.vjp_weight > 0)
        output = tiny.decode(x).sample
        output_loss = F.mse_loss(output, target)
        loss = output_loss
        vjp_loss = torch.zeros(())
        if config.vjp_weight > 0:
            # the guidance pulls the classifier's gradient back through the decoder: match those products (both
            # divided by the reference product's norm, so that every latent counts alike; squared distance per latent)
            (ours,) = torch.autograd.grad(output, x, grad_outputs=cotangents[pick], create_graph=True)
            vjp_loss = (ours / vjp_norms[pick] - vjps[pick]).pow(2).flatten(1).sum(dim=1).mean()
            loss = loss + config.vjp_weight * vjp_loss
        encoder_pick = torch.randint(len(images), (config.batch_size,), generator=generator)
        encoded = tiny.encode(images[encoder_pick] * 2.0 - 1.0).latents
        loss = loss + F.mse_loss(encoded, encoder_targets[encoder_pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % config.log_every == 0 or step == total - 1:
            progress.set_postfix(mse=f"{output_loss.item():.5f}", vjp=f"{vjp_loss.item():.4f}")
            logger.info(
                "guidance decoder step %d/%d output mse %.5f vjp %.4f", step + 1, total, output_loss.item(),
                vjp_loss.item(),
            )  # fmt: skip
    tiny.eval().requires_grad_(False)
    record = {
        "bank_latents": len(bank),
        "bank_seconds": round(bank_seconds, 1),
        "training_seconds": round(time.perf_counter() - started, 1),
    }
    return tiny, record


def fidelity(
    pipeline: Any,
    guidance_vae: AutoencoderTiny,
    config: GuidanceDecoderConfig,
    seed: int = 1,
    count: int = 512,
    classes: Sequence[int] = FIDELITY_CLASSES,
    split_seed: int = 0,
) -> dict[str, Any]:
    """How well ``guidance_vae`` stands in for the VAE decoder, on held-out (test split) latents.

    ``gradient_cosine_*``: cosine similarity between the KLDB gradients for ``classes`` with respect to the latent,
    through the guidance decoder and through the VAE decoder (what decides the guidance update's direction).
    """
    generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    images, labels = load_digits_split("test", split_seed)
    half = count // 2
    bank = latent_bank(pipeline, images, labels, config, generator, rng, copies=1, predicted=half)
    bank = torch.cat([bank[: count - half], bank[-half:]])  # clean test latents, then predictions
    vae, classify = pipeline.vae, _classifier_fn(pipeline)

    def kldb_gradient(decode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            x = bank.clone().requires_grad_(True)
            image = (decode(x) / 2 + 0.5).clamp(0, 1)
            logits = classify(image)
            (grad,) = torch.autograd.grad(kldb_score(logits, list(classes)).sum(), x)
        return grad, image.detach(), logits.detach()

    grad_full, image_full, logits_full = kldb_gradient(lambda x: vae.decode(x / vae.config.scaling_factor).sample)
    grad_tiny, image_tiny, logits_tiny = kldb_gradient(lambda x: guidance_vae.decode(x).sample)
    cosine = F.cosine_similarity(grad_full.flatten(1), grad_tiny.flatten(1), dim=1)
    clean, predicted = cosine[: count - half], cosine[count - half :]
    with torch.no_grad():
        encoded = guidance_vae.encode(images * 2.0 - 1.0).latents
        reference = vae.encode(images * 2.0 - 1.0).latent_dist.mean * vae.config.scaling_factor
    return {
        "measured_on": f"{count} held-out latents (test split): {count - half} clean, {half} UNet x0 predictions",
        "classes": list(classes),
        "image_mse": float(F.mse_loss(image_tiny, image_full)),
        "classifier_agreement": float((logits_tiny.argmax(-1) == logits_full.argmax(-1)).float().mean()),
        "gradient_cosine_median": float(cosine.median()),
        "gradient_cosine_median_clean": float(clean.median()),
        "gradient_cosine_median_predicted": float(predicted.median()),
        "gradient_cosine_q10": float(cosine.quantile(0.1)),
        "encoder_latent_mse": float(F.mse_loss(encoded, reference)),
    }


def add_guidance_vae(world: Path, seed: int, config: GuidanceDecoderConfig) -> dict[str, Any]:
    """Train the guidance decoder for the world in ``world`` and write it there (see the module docstring)."""
    from kldb.digits import load_pipeline

    torch.manual_seed(seed)
    pipeline = load_pipeline(world)
    info_path = world / "world_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    split_seed = int(info.get("seed", 0))  # the world's own train / test split
    generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    guidance_vae, record = train_guidance_vae(pipeline, config, generator, rng, split_seed)
    figures = fidelity(pipeline, guidance_vae, config, split_seed=split_seed)
    guidance_vae.save_pretrained(world / "guidance_vae", safe_serialization=True)
    index_path = world / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["guidance_vae"] = ["diffusers", "AutoencoderTiny"]
    atomic_write_json(index_path, dict(sorted(index.items())))
    info["guidance_vae"] = {
        "script": "python -m kldb.digits.guidance_decoder",
        "script_version": SCRIPT_VERSION,
        "seed": seed,
        "config": dataclasses.asdict(config),
        "decoder_parameters": count_parameters(guidance_vae.decoder),
        "vae_decoder_parameters": count_parameters(pipeline.vae.decoder)
        + count_parameters(pipeline.vae.post_quant_conv),
        **record,
        "fidelity": figures,
    }
    if "folder_bytes" in info:
        info["folder_bytes"] = folder_size_bytes(world)
    atomic_write_json(info_path, info)
    return info["guidance_vae"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, required=True, help="the world folder to add `guidance_vae/` to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a few iterations on a few latents (smoke test)")
    parser.add_argument("--iterations", type=int, default=None, help="override the iteration count")
    parser.add_argument("--vjp-weight", type=float, default=None, help="override the VJP-matching weight")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    setup_process(args.threads)
    config = GuidanceDecoderConfig.tiny() if args.tiny else GuidanceDecoderConfig()
    if args.iterations is not None:
        config.iterations = args.iterations
    if args.vjp_weight is not None:
        config.vjp_weight = args.vjp_weight
    record = add_guidance_vae(args.world, args.seed, config)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
