"""What KLDB guidance costs: guided against prompt-only sampling, in one process, same components, seeds and batch.

Measured, each as the median of repeated timed runs after warm-up runs:

- wall time per image of prompt-only sampling (alpha = 0) and of guided sampling, and their ratio;
- one guidance step timed alone on tensors captured from a real run, split into its pieces (UNet, VAE decoder and
  classifier forward/backward, each timed alone on the same tensors); the "ideal" guided time = prompt-only time +
  number of guided steps x one guidance step; measured / ideal is the implementation's own overhead. Where the
  guided step shares its UNet forward with the guidance ("unet" mode without autocast), one guidance step is what a
  guided step costs beyond an unguided one: (the step's UNet call with the shared forward + the correction) minus
  the plain no-grad UNet call of a sampling step, each timed alone;
- peak memory of both: process RSS sampled by a background thread on CPU (absolute, and above the baseline taken
  right before the run), ``torch.cuda.max_memory_allocated`` on GPU;
- images per second at several batch sizes;
- options side by side (``kldb_gradient`` "unet" / "detached", guidance checkpointing, VAE slicing, autocast of the
  guidance pass, frozen weights), each with its boundary effect: median KLDB over the same seeds, and skipped updates.

Run from the repository root: ``python -m benchmarks.bench_guidance --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.models import MODELS, BenchSetting, build_setting
from kldb.io import atomic_write_json
from kldb.loading import DTYPES, parse_dtype, resolve_dtype
from kldb.metrics import summary_statistics
from kldb.noise import initial_noise
from kldb.presets import PRESETS
from pipeline_kldb_boundary import (
    GRADIENT_MODES,
    KLDBGuidanceCallback,
    as_image_classifier,
    class_prompt,
    kldb_score,
    lms_scale_model_input,
    resolve_classes,
)

SCHEMA_VERSION = 1
MODIFIERS = {
    "ckpt": "pipe.enable_guidance_checkpointing() (VAE decoder and UNet checkpointed in the guidance pass)",
    "slicing": "pipe.vae.enable_slicing() (the decoder runs one image at a time)",
    "fp16": "kldb_autocast_dtype=torch.float16 (guidance pass under autocast, loss-scaled)",
    "bf16": "kldb_autocast_dtype=torch.bfloat16 (guidance pass under autocast)",
    "frozen": "requires_grad_(False) on every module (not a pipeline option: tests a proposed patch)",
    "gvae": "kldb_guidance_decoder='guidance_vae' (the gradient goes through the pipeline's small guidance_vae); "
    "options without it pass kldb_guidance_decoder='vae'",
}
AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuidanceOption:
    """One way to run the guidance: a gradient mode plus modifiers, named like ``"unet+ckpt+fp16"``."""

    name: str
    kldb_gradient: str
    checkpointing: bool = False
    vae_slicing: bool = False
    autocast: str | None = None
    frozen_weights: bool = False
    guidance_vae: bool = False

    @classmethod
    def parse(cls, name: str) -> GuidanceOption:
        parts = name.strip().split("+")
        if parts[0] not in GRADIENT_MODES:
            raise ValueError(f"Expected an option to start with one of {GRADIENT_MODES} but got {name!r}.")
        unknown = [m for m in parts[1:] if m not in MODIFIERS]
        if unknown or len(set(parts[1:])) != len(parts[1:]):
            raise ValueError(f"Expected option modifiers among {sorted(MODIFIERS)}, each once, but got {name!r}.")
        autocasts = [m for m in parts[1:] if m in AUTOCAST]
        if len(autocasts) > 1:
            raise ValueError(f"Expected at most one of 'fp16' and 'bf16' in an option but got {name!r}.")
        return cls(
            name=name.strip(),
            kldb_gradient=parts[0],
            checkpointing="ckpt" in parts,
            vae_slicing="slicing" in parts,
            autocast=autocasts[0] if autocasts else None,
            frozen_weights="frozen" in parts,
            guidance_vae="gvae" in parts,
        )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST[self.autocast] if self.autocast else None

    @property
    def guidance_decoder(self) -> str:
        """The pipeline's ``kldb_guidance_decoder`` for this option (explicit: never ``"auto"``)."""
        return "guidance_vae" if self.guidance_vae else "vae"


@dataclass
class Config:
    """Everything one benchmark run is set to (written to the JSON as ``settings``)."""

    model: str
    device: str
    dtype: str
    height: int | None
    steps: int
    interval: int
    batch: int
    batches: list[int]
    options: list[str]
    default_option: str
    repeats: int
    warmup: int
    kldb_batches: int
    seed: int
    threads: int
    time_budget: float
    memory_interval_ms: float


# Per model and device: what a run measures when the command line does not say. The paper's steps and interval come
# from the presets; on a CPU the SD-shaped and tiny runs are cut to 10 steps.
STEPS = PRESETS["paper"].num_inference_steps
INTERVAL = PRESETS["paper"].kldb_guidance_interval
DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    # default_option: what the pipeline does by default there ("auto" takes the digits world's guidance_vae; the
    # paper's Stable Diffusion v1.4 has none unless one is loaded)
    ("digits", "cpu"): {
        "steps": STEPS, "interval": INTERVAL, "batch": 16, "batches": [1, 4, 16], "repeats": 3, "warmup": 1, "kldb_batches": 4,
        "options": ["unet+gvae", "unet", "detached+gvae", "detached", "unet+ckpt", "unet+slicing"],
        "default_option": "unet+gvae",
    },
    ("sd", "cpu"): {
        "height": 256, "steps": 10, "interval": INTERVAL, "batch": 1, "batches": [1, 2, 4], "repeats": 3, "warmup": 1,
        "kldb_batches": 1, "options": ["unet", "unet+gvae", "detached"], "default_option": "unet",
    },
    ("tiny", "cpu"): {
        "steps": 10, "interval": INTERVAL, "batch": 2, "batches": [1, 2], "repeats": 3, "warmup": 1, "kldb_batches": 1,
        "options": ["unet+gvae", "unet", "detached", "unet+ckpt", "unet+slicing"], "default_option": "unet+gvae",
    },
    ("digits", "cuda"): {
        "steps": STEPS, "interval": INTERVAL, "batch": 16, "batches": [1, 4, 16], "repeats": 3, "warmup": 1, "kldb_batches": 4,
        "options": ["unet+gvae", "unet", "detached", "unet+ckpt", "unet+fp16", "unet+bf16", "detached+bf16"],
        "default_option": "unet+gvae",
    },
    ("sd", "cuda"): {
        "height": 512, "steps": STEPS, "interval": INTERVAL, "batch": 8, "batches": [1, 4, 8, 16], "repeats": 2, "warmup": 1,
        "kldb_batches": 1,
        "options": ["unet", "unet+gvae", "detached", "unet+ckpt", "unet+bf16", "unet+gvae+bf16", "detached+bf16",
                    "unet+frozen"],
        "default_option": "unet",
    },
    ("tiny", "cuda"): {
        "steps": 10, "interval": INTERVAL, "batch": 2, "batches": [1, 2], "repeats": 3, "warmup": 1, "kldb_batches": 1,
        "options": ["unet+gvae", "unet", "detached", "unet+fp16", "unet+bf16"], "default_option": "unet+gvae",
    },
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------------


def _libc_malloc_trim() -> Callable[[], None] | None:
    """glibc's ``malloc_trim(0)``: returns freed heap memory to the OS so that RSS baselines mean something."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0) and None


MALLOC_TRIM = _libc_malloc_trim()


class PeakMemory:
    """Peak memory of the code inside ``with``: process RSS sampled by a thread (CPU), or CUDA's peak allocation.

    ``baseline`` is taken right before the block (after garbage collection and, on Linux, ``malloc_trim``), ``peak``
    is the highest value seen inside it; both in bytes.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device = device
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            if MALLOC_TRIM is not None:
                MALLOC_TRIM()
            self.baseline = self.peak = self._process.memory_info().rss
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak = max(self.peak, self._process.memory_info().rss)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def quantiles(values: Sequence[float]) -> dict[str, float | None]:
    """Median and quartiles of the finite ``values`` (the paper's summary of per-image KLDB, by
    :func:`kldb.metrics.summary_statistics`), under this benchmark's JSON keys."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"median": None, "q1": None, "q3": None, "n": 0}
    stats = summary_statistics(finite)
    return {"median": stats["median"], "q1": stats["q25"], "q3": stats["q75"], "n": stats["n"]}


class OutOfTime(Exception):
    """The time budget given by ``--time-budget`` is spent."""


@dataclass
class RunRecord:
    """One timed pipeline call."""

    seconds: float
    batch: int
    memory_baseline_bytes: int
    memory_peak_bytes: int
    kldb: list[float]
    guided_updates: int
    skipped_updates: int


@dataclass
class Captured:
    """What the first guided step of a real run starts from and uses, for timing the guidance step alone."""

    step_index: int
    timestep: Any
    sigma: float
    z: torch.Tensor  # (B, c, h, w) latent the guided step starts from
    cond_embeds: torch.Tensor  # (B, L, d) conditional prompt embedding
    uncond_embeds: torch.Tensor | None  # (B, L, d) unconditional (negative) prompt embedding; None without CFG
    cond_eps: torch.Tensor  # (B, c, h, w) the step's conditional noise prediction


class Bench:
    """Runs the pipeline of ``setting`` under ``config`` and keeps the time budget."""

    def __init__(self, setting: BenchSetting, config: Config):
        self.setting = setting
        self.config = config
        self.pipe = setting.pipeline
        self.device = self.pipe._execution_device
        self.adapter = as_image_classifier(self.pipe.classifier, self.pipe.classifier_processor)
        self.started = time.perf_counter()
        self.log_lines: list[str] = []

    # --- budget and logging --------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def check_budget(self) -> None:
        if self.config.time_budget and self.elapsed() > self.config.time_budget:
            raise OutOfTime(f"time budget of {self.config.time_budget:.0f} s spent after {self.elapsed():.0f} s")

    def log(self, message: str) -> None:
        line = f"[{self.elapsed():7.1f}s] {message}"
        self.log_lines.append(line)
        print(line, file=sys.stderr, flush=True)

    # --- options ---------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def applied(self, option: GuidanceOption | None) -> Iterator[None]:
        """Turn the pipeline-side switches of ``option`` on for the block, and back off after it."""
        pipe = self.pipe
        modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
        saved_grad = [[p.requires_grad for p in m.parameters()] for m in modules]
        try:
            if option is not None and option.checkpointing:
                pipe.enable_guidance_checkpointing()
            if option is not None and option.vae_slicing:
                pipe.vae.enable_slicing()
            if option is not None and option.frozen_weights:
                for module in modules:
                    module.requires_grad_(False)
            yield
        finally:
            if option is not None and option.checkpointing:
                pipe.disable_guidance_checkpointing()
            if option is not None and option.vae_slicing:
                pipe.vae.disable_slicing()
            for module, flags in zip(modules, saved_grad):
                for p, flag in zip(module.parameters(), flags):
                    p.requires_grad_(flag)

    def call_kwargs(self, option: GuidanceOption | None, batch: int, seed: int, steps: int) -> dict[str, Any]:
        setting = self.setting
        return {
            "classes": setting.classes,
            "height": setting.height,
            "width": setting.width,
            "num_inference_steps": steps,
            "guidance_scale": setting.guidance_scale,
            "kldb_guidance_scale": setting.kldb_guidance_scale if option is not None else 0.0,
            "kldb_guidance_interval": self.config.interval,
            "kldb_gradient": option.kldb_gradient if option is not None else "unet",
            "kldb_autocast_dtype": option.autocast_dtype if option is not None else None,
            "kldb_guidance_decoder": option.guidance_decoder if option is not None else "vae",
            "num_images_per_prompt": batch,
            "generator": torch.Generator(device=self.device).manual_seed(seed),
            "output_type": "pt",
        }

    def sample(self, option: GuidanceOption | None, batch: int, seed: int, steps: int | None = None) -> Any:
        with self.applied(option):
            return self.pipe(**self.call_kwargs(option, batch, seed, steps or self.config.steps))

    def warm_up(self, option: GuidanceOption | None, batch: int) -> None:
        """Short calls (one guidance interval of steps) that run every code path of the timed call once."""
        for _ in range(self.config.warmup):
            self.check_budget()
            self.sample(option, batch, self.config.seed, steps=self.config.interval)

    def timed(self, option: GuidanceOption | None, batch: int, seed: int) -> RunRecord:
        self.check_budget()
        with self.applied(option):
            kwargs = self.call_kwargs(option, batch, seed, self.config.steps)
            memory = PeakMemory(self.device, self.config.memory_interval_ms / 1000)
            with memory:
                synchronize(self.device)
                start = time.perf_counter()
                out = self.pipe(**kwargs)
                synchronize(self.device)
                seconds = time.perf_counter() - start
        record = RunRecord(
            seconds=seconds,
            batch=batch,
            memory_baseline_bytes=memory.baseline,
            memory_peak_bytes=memory.peak,
            kldb=[float(v) for v in out.kldb.cpu()],
            guided_updates=int(out.guided_updates),
            skipped_updates=int(out.skipped_updates),
        )
        name = option.name if option is not None else "prompt-only"
        self.log(f"{name:<18} batch {batch:>2}: {seconds:8.3f} s ({seconds / batch:.4f} s/image)")
        return record

    def untimed_kldb(self, option: GuidanceOption | None, batch: int, seed: int) -> dict[str, Any]:
        self.check_budget()
        out = self.sample(option, batch, seed)
        return {
            "kldb": [float(v) for v in out.kldb.cpu()],
            "guided_updates": int(out.guided_updates),
            "skipped_updates": int(out.skipped_updates),
        }

    # --- the guidance step alone -------------------------------------------------------------------------------------

    def capture(self, batch: int) -> Captured:
        """Run prompt-only sampling up to the first guided step and keep what that step starts from and uses."""
        interval = self.config.interval
        store: dict[str, Any] = {}

        def callback(pipe: Any, step_index: int, timestep: Any, kwargs: dict) -> dict:
            if step_index == interval - 2:
                store["z"] = kwargs["latents"].detach().clone()
            if step_index == interval - 1:
                store["timestep"] = timestep
                pipe._interrupt = True  # diffusers' documented way to skip the remaining steps
            return {}

        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        noise = initial_noise(self.pipe, batch, generator, self.setting.height, self.setting.width)
        kwargs = self.call_kwargs(None, batch, self.config.seed, self.config.steps)
        kwargs.update(latents=noise, output_type="latent", callback_on_step_end=callback)
        self.pipe(**kwargs)
        if interval == 1:  # step 1 starts from the initial noise
            store["z"] = noise * self.pipe.scheduler.init_noise_sigma
        step_index = interval - 1
        sigma = float(self.pipe.scheduler.sigmas[step_index])
        cfg = self.setting.guidance_scale > 1
        prompt = class_prompt(self.adapter.labels, self.class_indices())
        with torch.no_grad():
            cond, uncond = self.pipe.encode_prompt(prompt, self.device, batch, cfg)
            scaled = lms_scale_model_input(store["z"], sigma).to(self.pipe.unet.dtype)
            cond_eps = self.pipe.unet(scaled, store["timestep"], encoder_hidden_states=cond, return_dict=False)[0]
        return Captured(
            step_index=step_index,
            timestep=store["timestep"],
            sigma=sigma,
            z=store["z"],
            cond_embeds=cond,
            uncond_embeds=uncond if cfg else None,
            cond_eps=cond_eps,
        )

    def class_indices(self) -> list[int]:
        num_classes = self.adapter.num_classes
        assert num_classes is not None
        return resolve_classes(self.setting.classes, self.adapter.labels, num_classes)

    def _median_time(self, fn: Callable[[], Any], repeats: int) -> float:
        """Median wall time of ``fn``. No warm-up call: the guided runs before have run the same code on the same
        shapes."""
        times = []
        for _ in range(repeats):
            self.check_budget()
            synchronize(self.device)
            start = time.perf_counter()
            fn()
            synchronize(self.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def guidance_step(self, option: GuidanceOption, captured: Captured) -> dict[str, Any]:
        """One guidance step (:meth:`KLDBGuidanceCallback.correction`) timed alone, and each of its pieces alone.

        Where the guided step shares its conditional UNet forward with the guidance, the step and its UNet piece are
        measured as what they add to the sampling step's own UNet call (see the module docstring)."""
        pipe, config = self.pipe, self.config
        classes = self.class_indices()
        guidance = KLDBGuidanceCallback(
            self.adapter,
            classes,
            guidance_scale=self.setting.kldb_guidance_scale,
            interval=config.interval,
            gradient=option.kldb_gradient,
            autocast_dtype=option.autocast_dtype,
            decoder=pipe.guidance_decoder(option.guidance_decoder),
        )
        z, sigma, t, k = captured.z, captured.sigma, captured.timestep, captured.step_index
        vae = pipe.guidance_decoder(option.guidance_decoder)
        autocast = (
            (lambda: torch.autocast(self.device.type, dtype=option.autocast_dtype))
            if option.autocast_dtype is not None
            else contextlib.nullcontext
        )
        cotangent = torch.Generator(device=self.device).manual_seed(config.seed + 1)

        def decode(x0: torch.Tensor) -> torch.Tensor:
            return vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]

        with torch.no_grad(), self.applied(option):
            x0 = z - sigma * captured.cond_eps  # (B, c, h, w)
            image = (decode(x0) / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W)
        eps_cotangent = torch.randn(z.shape, generator=cotangent, device=self.device, dtype=z.dtype)
        image_cotangent = torch.randn(image.shape, generator=cotangent, device=self.device, dtype=image.dtype)

        shares = guidance.shares_unet_forward
        cfg = captured.uncond_embeds is not None
        # the scheduler at step k, as the sampling loop has it: scale_model_input sets its step index from t
        pipe.scheduler.set_timesteps(config.steps, device=self.device)
        step_ends = {"negative_prompt_embeds": captured.uncond_embeds}

        @torch.no_grad()
        def sampling_unet_call() -> None:
            """The UNet call of a sampling step at this latent: (unconditional, conditional) batched, no gradients."""
            scaled = pipe.scheduler.scale_model_input(torch.cat([z] * 2) if cfg else z, t).to(pipe.unet.dtype)
            embeds = torch.cat([captured.uncond_embeds, captured.cond_embeds]) if cfg else captured.cond_embeds
            pipe.unet(scaled, t, encoder_hidden_states=embeds, return_dict=False)

        @torch.no_grad()
        def step() -> None:
            """One guided step's guidance through the callback's public interface: the step before ends (which tells
            the callback the batch and the negative embedding), the guided step's UNet call, its end."""
            with guidance.attached(pipe):
                if k > 0:
                    guidance.callback_fn(pipe, k - 1, pipe.scheduler.timesteps[k - 1], {"latents": z, **step_ends})
                sampling_unet_call()
                guidance.callback_fn(pipe, k, t, {"latents": z.clone(), **step_ends})
            if guidance.guided_updates + guidance.skipped_updates != z.shape[0]:
                raise RuntimeError("The timed guidance step did not run its correction.")

        @torch.enable_grad()
        def unet_piece() -> None:
            """The UNet's part of the guidance: its forward with gradients and backward for the conditional rows
            (beyond the sampling call's own forward where the step shares it)."""
            scaled = pipe.scheduler.scale_model_input(z, t).to(pipe.unet.dtype)
            if shares and cfg:
                with torch.no_grad():
                    pipe.unet(scaled, t, encoder_hidden_states=captured.uncond_embeds, return_dict=False)
            scaled = scaled.detach().requires_grad_(True)
            with contextlib.nullcontext() if shares else autocast():
                eps = pipe.unet(scaled, t, encoder_hidden_states=captured.cond_embeds, return_dict=False)[0]
                torch.autograd.grad(eps, scaled, grad_outputs=eps_cotangent.to(eps.dtype))

        @torch.enable_grad()
        def decoder_piece() -> None:
            x0_ = x0.detach().requires_grad_(True)
            with autocast():
                out = (decode(x0_) / 2 + 0.5).clamp(0, 1)
                torch.autograd.grad(out, x0_, grad_outputs=image_cotangent.to(out.dtype))

        @torch.enable_grad()
        def classifier_piece() -> None:
            image_ = image.detach().requires_grad_(True)
            with autocast():
                loss = kldb_score(self.adapter(image_), classes).sum()
                torch.autograd.grad(loss, image_)

        repeats = config.repeats
        result: dict[str, Any] = {}
        with self.applied(option):
            # what the sampling step's own UNet call costs; a shared step is counted beyond it
            base = self._median_time(sampling_unet_call, repeats) if shares else 0.0
            result["shares_unet_forward"] = shares
            result["sampling_unet_call_seconds"] = base if shares else None
            result["step_seconds"] = self._median_time(step, repeats) - base
            pieces: dict[str, float] = {}
            if option.kldb_gradient == "unet":
                pieces["unet"] = self._median_time(unet_piece, repeats) - base
            pieces["vae_decoder"] = self._median_time(decoder_piece, repeats)
            pieces["classifier"] = self._median_time(classifier_piece, repeats)
            memory = PeakMemory(self.device, config.memory_interval_ms / 1000)
            with memory:
                step()
        result["pieces_seconds"] = pieces
        result["other_seconds"] = result["step_seconds"] - sum(pieces.values())
        result["memory_baseline_bytes"] = memory.baseline
        result["memory_peak_bytes"] = memory.peak
        self.log(
            f"{option.name:<18} guidance step alone: {result['step_seconds']:.4f} s ("
            + ", ".join(f"{k} {v:.4f}" for k, v in pieces.items())
            + ")"
        )
        return result


# ----------------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------------


def summarize_runs(runs: list[RunRecord]) -> dict[str, Any]:
    if not runs:
        return {"n": 0}
    seconds = [r.seconds for r in runs]
    peak = max(runs, key=lambda r: r.memory_peak_bytes)
    increase = max(r.memory_peak_bytes - r.memory_baseline_bytes for r in runs)
    batch = runs[0].batch
    return {
        "n": len(runs),
        "batch": batch,
        "seconds_per_run": seconds,
        "median_seconds": statistics.median(seconds),
        "min_seconds": min(seconds),
        "median_seconds_per_image": statistics.median(seconds) / batch,
        "images_per_second": batch / statistics.median(seconds),
        "peak_memory_bytes": peak.memory_peak_bytes,
        "baseline_memory_bytes": peak.memory_baseline_bytes,
        "peak_memory_increase_bytes": increase,
        "guided_updates": runs[0].guided_updates,
        "skipped_updates": runs[0].skipped_updates,
        "kldb_first_batch": runs[0].kldb,
    }


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers
    import torchvision
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torchvision": torchvision.__version__,
        "psutil": psutil.__version__,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "total_memory_bytes": psutil.virtual_memory().total,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "malloc_trim": MALLOC_TRIM is not None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def run_benchmark(config: Config, write: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure everything :mod:`benchmarks.bench_guidance` measures; ``write`` gets the partial results after each
    section (so that a run cut short keeps what it measured)."""
    torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    options = [GuidanceOption.parse(name) for name in config.options]
    default = GuidanceOption.parse(config.default_option)
    if default.name not in [o.name for o in options]:
        options.insert(0, default)
    build_start = time.perf_counter()
    setting = build_setting(config.model, config.device, parse_dtype(config.dtype), config.height, seed=config.seed)
    bench = Bench(setting, config)
    bench.log(f"built {config.model} in {time.perf_counter() - build_start:.1f} s: {setting.description}")
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "benchmarks/bench_guidance.py",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
        "model": config.model,
        "description": setting.description,
        "kldb_meaningful": setting.kldb_meaningful,
        "settings": {
            **asdict(config),
            "height": setting.height,
            "width": setting.width,
            "classes": setting.classes,
            "prompt": class_prompt(bench.adapter.labels, bench.class_indices()),
            "guidance_scale": setting.guidance_scale,
            "kldb_guidance_scale": setting.kldb_guidance_scale,
            "timed_seed": config.seed,
            "kldb_seeds": [config.seed + i for i in range(config.kldb_batches)],
            "parameters": setting.parameters,
            "option_modifiers": MODIFIERS,
        },
        "environment": environment(device),
        "guided_over_prompt_only": None,
        "measured_over_ideal": None,
        "peak_memory_ratio": None,
        "peak_memory_increase_ratio": None,
        "batch16_over_batch1_throughput": None,
        "largest_over_batch1_throughput": None,
        "sections_not_run": [],
    }

    def save() -> None:
        result["elapsed_seconds"] = bench.elapsed()
        result["log"] = bench.log_lines
        if write is not None:
            write(result)

    try:
        # 1. Prompt-only and every option at the main batch, interleaved in each repeat so drift hits all alike
        batch = config.batch
        bench.warm_up(None, batch)
        for option in options:
            bench.warm_up(option, batch)
        runs: dict[str, list[RunRecord]] = {"prompt-only": [], **{o.name: [] for o in options}}
        for _ in range(config.repeats):
            runs["prompt-only"].append(bench.timed(None, batch, config.seed))
            for option in options:
                runs[option.name].append(bench.timed(option, batch, config.seed))
        main = {name: summarize_runs(records) for name, records in runs.items()}
        result["main"] = {"batch": batch, "runs": main}
        save()

        # 2. One guidance step alone, and its pieces, on tensors captured from a real run at the main batch
        captured = bench.capture(batch)
        steps_alone = {option.name: bench.guidance_step(option, captured) for option in options}
        result["guidance_step"] = steps_alone
        prompt_only = main["prompt-only"]
        table = []
        for option in options:
            guided, alone = main[option.name], steps_alone[option.name]
            guided_steps = (guided["guided_updates"] + guided["skipped_updates"]) / batch
            ideal = prompt_only["median_seconds"] + guided_steps * alone["step_seconds"]
            extra = guided["median_seconds"] - prompt_only["median_seconds"]
            table.append(
                {
                    "option": option.name,
                    **asdict(option),
                    "seconds_per_image": guided["median_seconds_per_image"],
                    "guided_over_prompt_only": ratio(guided["median_seconds"], prompt_only["median_seconds"]),
                    "guided_steps": guided_steps,
                    "step_alone_seconds": alone["step_seconds"],
                    "ideal_seconds": ideal,
                    "measured_over_ideal": ratio(guided["median_seconds"], ideal),
                    "extra_seconds_measured": extra,
                    "extra_seconds_split": {
                        **{k: guided_steps * v for k, v in alone["pieces_seconds"].items()},
                        "other_guidance": guided_steps * alone["other_seconds"],
                        "outside_guidance_steps": guided["median_seconds"] - ideal,
                    },
                    "peak_memory_bytes": guided["peak_memory_bytes"],
                    "peak_memory_increase_bytes": guided["peak_memory_increase_bytes"],
                    "peak_memory_ratio": ratio(guided["peak_memory_bytes"], prompt_only["peak_memory_bytes"]),
                    "peak_memory_increase_ratio": ratio(
                        guided["peak_memory_increase_bytes"], prompt_only["peak_memory_increase_bytes"]
                    ),
                    "guidance_step_peak_memory_increase_bytes": alone["memory_peak_bytes"]
                    - alone["memory_baseline_bytes"],
                    "guided_updates": guided["guided_updates"],
                    "skipped_updates": guided["skipped_updates"],
                }
            )
        result["options"] = table
        head = next(row for row in table if row["option"] == default.name)
        result["default_option"] = default.name
        for key in (
            "guided_over_prompt_only",
            "measured_over_ideal",
            "peak_memory_ratio",
            "peak_memory_increase_ratio",
        ):
            result[key] = head[key]
        save()

        # 3. Images per second at each batch size (prompt-only and the default option), main batch reused
        throughput: dict[int, dict[str, Any]] = {
            batch: {"prompt-only": main["prompt-only"], "guided": main[default.name]}
        }
        others = sorted((b for b in config.batches if b != batch), key=lambda b: (b not in (1, 16), -b))
        result["throughput"] = []
        for size in others:
            try:
                bench.warm_up(None, size)
                bench.warm_up(default, size)
                pairs: dict[str, list[RunRecord]] = {"prompt-only": [], "guided": []}
                for _ in range(config.repeats):
                    pairs["prompt-only"].append(bench.timed(None, size, config.seed))
                    pairs["guided"].append(bench.timed(default, size, config.seed))
                throughput[size] = {name: summarize_runs(records) for name, records in pairs.items()}
            except OutOfTime as error:
                result["sections_not_run"].append(f"throughput at batch {size}: {error}")
                bench.log(f"throughput at batch {size} not measured: {error}")
            except torch.OutOfMemoryError as error:
                result["sections_not_run"].append(f"throughput at batch {size}: out of memory ({error})")
                bench.log(f"throughput at batch {size}: out of memory")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows = []
            for size_done in sorted(throughput):
                entry = throughput[size_done]
                rows.append(
                    {
                        "batch": size_done,
                        "prompt_only_images_per_second": entry["prompt-only"]["images_per_second"],
                        "guided_images_per_second": entry["guided"]["images_per_second"],
                        "guided_over_prompt_only": ratio(
                            entry["guided"]["median_seconds"], entry["prompt-only"]["median_seconds"]
                        ),
                        "prompt_only_peak_memory_bytes": entry["prompt-only"]["peak_memory_bytes"],
                        "guided_peak_memory_bytes": entry["guided"]["peak_memory_bytes"],
                        "guided_peak_memory_increase_bytes": entry["guided"]["peak_memory_increase_bytes"],
                        "repeats": entry["guided"]["n"],
                    }
                )
            result["throughput"] = rows
            by_batch = {row["batch"]: row for row in rows}
            if 1 in by_batch and 16 in by_batch:
                result["batch16_over_batch1_throughput"] = ratio(
                    by_batch[16]["guided_images_per_second"], by_batch[1]["guided_images_per_second"]
                )
            if 1 in by_batch and len(by_batch) > 1:
                largest = max(by_batch)
                result["largest_over_batch1_throughput"] = {
                    "batch": largest,
                    "guided": ratio(
                        by_batch[largest]["guided_images_per_second"], by_batch[1]["guided_images_per_second"]
                    ),
                    "prompt_only": ratio(
                        by_batch[largest]["prompt_only_images_per_second"],
                        by_batch[1]["prompt_only_images_per_second"],
                    ),
                }
            save()

        # 4. The boundary effect of each option: KLDB over the same seeds (the timed seed and further batches)
        kldb_values: dict[str, list[float]] = {"prompt-only": list(main["prompt-only"]["kldb_first_batch"])}
        for option in options:
            kldb_values[option.name] = list(main[option.name]["kldb_first_batch"])
        for extra_seed in range(config.seed + 1, config.seed + config.kldb_batches):
            for option in [None, *options]:
                name = option.name if option is not None else "prompt-only"
                try:
                    kldb_values[name].extend(bench.untimed_kldb(option, batch, extra_seed)["kldb"])
                except OutOfTime as error:
                    result["sections_not_run"].append(f"KLDB batch seed {extra_seed} for {name}: {error}")
                    break
            bench.log(f"KLDB batch with seed {extra_seed} done")
        baseline_kldb = quantiles(kldb_values["prompt-only"])
        result["kldb"] = {
            name: {
                **quantiles(values),
                "median_change_vs_prompt_only": ratio(quantiles(values)["median"], baseline_kldb["median"]),
            }
            for name, values in kldb_values.items()
        }
        result["kldb_values"] = kldb_values
        for row in result["options"]:
            row["kldb_median"] = result["kldb"][row["option"]]["median"]
            row["kldb_iqr"] = [result["kldb"][row["option"]]["q1"], result["kldb"][row["option"]]["q3"]]
        result["complete"] = True
    except OutOfTime as error:
        result["sections_not_run"].append(f"stopped: {error}")
        bench.log(f"stopped: {error}")
    except KeyboardInterrupt:
        result["sections_not_run"].append("stopped: interrupted (SIGINT)")
        bench.log("stopped: interrupted")
    save()
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def format_report(result: dict[str, Any]) -> str:
    """The readable tables of a result (Markdown, so that they paste into docs)."""
    s = result["settings"]
    env = result["environment"]
    lines = [
        f"## KLDB guidance cost: {result['model']} ({result['description']})",
        "",
        f"{env['device']} ({env.get('gpu') or env.get('cpu')}), {env['torch_threads']} torch threads, torch "
        f"{env['torch']}, diffusers {env['diffusers']}, {s['dtype']}; {s['height']}x{s['width']}, {s['steps']} "
        f"k-LMS steps, guidance every {s['interval']} (alpha {s['kldb_guidance_scale']}, beta {s['guidance_scale']}), "
        f"classes {' / '.join(s['classes'])}; timed seed {s['timed_seed']}, main batch {s['batch']}, batches "
        f"{s['batches']}, median of {s['repeats']} timed runs after {s['warmup']} warm-up run(s); {result['created']}.",
        "",
        f"guided / prompt-only ({result.get('default_option', '-')}): {_fmt(result['guided_over_prompt_only'])}; "
        f"measured / ideal: {_fmt(result['measured_over_ideal'])}; peak memory ratio: "
        f"{_fmt(result['peak_memory_ratio'])} (increase over baseline: {_fmt(result['peak_memory_increase_ratio'])}); "
        f"batch-16 / batch-1 guided throughput: {_fmt(result['batch16_over_batch1_throughput'], '.2f')}",
    ]
    if result.get("options"):
        prompt_only = result["main"]["runs"]["prompt-only"]
        kldb = result.get("kldb", {})
        memory = "peak GPU MiB" if env["device"].startswith("cuda") else "peak RSS MiB (+over baseline)"
        lines += [
            "",
            f"### Options at batch {result['main']['batch']}",
            "",
            f"| option | s/image | guided / prompt-only | measured / ideal | {memory} | median KLDB [IQR] | skipped |",
            "|---|---|---|---|---|---|---|",
            f"| prompt-only | {_fmt(prompt_only['median_seconds_per_image'], '.4f')} | 1 | - | "
            f"{_mib(prompt_only['peak_memory_bytes'])} (+{_mib(prompt_only['peak_memory_increase_bytes'])}) | "
            f"{_kldb_cell(kldb.get('prompt-only'))} | - |",
        ]
        for row in result["options"]:
            lines.append(
                f"| {row['option']} | {_fmt(row['seconds_per_image'], '.4f')} | {_fmt(row['guided_over_prompt_only'])} "
                f"| {_fmt(row['measured_over_ideal'])} | {_mib(row['peak_memory_bytes'])} "
                f"(+{_mib(row['peak_memory_increase_bytes'])}) | {_kldb_cell(kldb.get(row['option']))} | "
                f"{row['skipped_updates']} of {row['skipped_updates'] + row['guided_updates']} |"
            )
        lines += [
            "",
            "### Where the guided run's extra time goes (seconds per run at the main batch; pieces timed alone)",
            "",
            "| option | measured extra | guided steps | step alone | UNet | decoder fwd+bwd | classifier "
            "fwd+bwd | rest of step | outside the steps |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        notes = [
            "",
            "UNet: forward+backward of the conditional noise prediction; where the guided step shares its UNet forward "
            "(unet mode without autocast), what the shared forward and the backward add to the step's own UNet call.",
        ]
        for row in result["options"]:
            split = row["extra_seconds_split"]
            lines.append(
                f"| {row['option']} | {_fmt(row['extra_seconds_measured'])} | {_fmt(row['guided_steps'], '.0f')} | "
                f"{_fmt(row['step_alone_seconds'], '.4f')} | {_fmt(split.get('unet'))} | {_fmt(split['vae_decoder'])} | "
                f"{_fmt(split['classifier'])} | {_fmt(split['other_guidance'])} | "
                f"{_fmt(split['outside_guidance_steps'])} |"
            )
        lines += notes
    if result.get("throughput"):
        lines += [
            "",
            f"### Throughput ({result.get('default_option')} vs prompt-only)",
            "",
            "| batch | prompt-only images/s | guided images/s | guided / prompt-only | guided peak MiB (+over "
            "baseline) | runs |",
            "|---|---|---|---|---|---|",
        ]
        for row in result["throughput"]:
            lines.append(
                f"| {row['batch']} | {_fmt(row['prompt_only_images_per_second'])} | "
                f"{_fmt(row['guided_images_per_second'])} | {_fmt(row['guided_over_prompt_only'])} | "
                f"{_mib(row['guided_peak_memory_bytes'])} (+{_mib(row['guided_peak_memory_increase_bytes'])}) | "
                f"{row['repeats']} |"
            )
    if not result["kldb_meaningful"]:
        lines += ["", "KLDB values come from random weights here and mean nothing; only the costs are real."]
    if result["sections_not_run"]:
        lines += ["", "Not measured: " + "; ".join(result["sections_not_run"])]
    return "\n".join(lines)


def _kldb_cell(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("median") is None:
        return "-"
    return f"{entry['median']:.3f} [{entry['q1']:.3f}, {entry['q3']:.3f}] (n={entry['n']})"


def write_json(path: Path, result: dict[str, Any]) -> None:
    """The results as strict JSON (non-finite numbers as null), written atomically."""
    atomic_write_json(path, result, indent=1)


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers but got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers but got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    for name in names:
        try:
            GuidanceOption.parse(name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return names


class _HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` only where the default is a value, not ``None`` (per-model defaults are in brackets)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_guidance",
        description=(
            "Measure what KLDB guidance costs against prompt-only sampling in one process (same components, seeds "
            "and batch): time per image and their ratio, the split of the extra time into UNet / VAE decoder / "
            "classifier, measured vs ideal guided time, peak memory, throughput per batch size, and options side by "
            "side with their median KLDB. Unset options take per-model defaults (shown in brackets as model/device)."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="digits",
        help="digits: the shipped digits world (kldb.digits.load_pipeline()); sd: SD-v1.4-shaped pipeline with random "
        "weights (costs only); tiny: tiny random components (seconds, for CI)",
    )
    parser.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="dtype of every component; default: float16 on cuda, "
        "float32 on cpu"
    )  # fmt: skip
    parser.add_argument("--height", type=int, default=None, help="image size (square); default: sd 256 on cpu / 512 "
                        "on cuda, the model's own size otherwise")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="k-LMS steps per run [digits 40, sd 10 cpu / 40 cuda]")
    parser.add_argument("--interval", type=int, default=None, help="guidance every this many steps [5]")
    parser.add_argument(
        "--batch", type=int, default=None, help="main batch: options, time split and memory are measured at it "
        "[digits 16, sd 1 cpu / 8 cuda, tiny 2]"
    )  # fmt: skip
    parser.add_argument(
        "--batches", type=_int_list, default=None, help="comma-separated batch sizes for images/s of prompt-only and "
        "default-option guided runs [digits 1,4,16; sd 1,2,4 cpu / 1,4,8,16 cuda; tiny 1,2]"
    )  # fmt: skip
    parser.add_argument(
        "--options", type=_name_list, default=None, help="comma-separated guidance options to compare, each "
        f"'unet' or 'detached' plus '+'-joined modifiers from {sorted(MODIFIERS)}, e.g. unet+ckpt,detached+bf16 [digits "
        "cpu: unet+gvae,unet,detached+gvae,detached,unet+ckpt,unet+slicing; sd cpu: unet,unet+gvae,detached; cuda "
        "adds bf16 and frozen]"
    )  # fmt: skip
    parser.add_argument(
        "--default-option", default=None, type=lambda t: _name_list(t)[0], help="the option the top-level figures "
        "(guided_over_prompt_only, ...) and the throughput runs use: the pipeline's default there [digits, tiny: "
        "unet+gvae (their guidance_vae); sd: unet (SD v1.4 ships no guidance_vae)]"
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement; medians are reported "
                        "[3; sd on cuda 2]")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls (one guidance interval of "
                        "steps each) before each timed series [1]")  # fmt: skip
    parser.add_argument("--kldb-batches", type=int, default=None, help="batches (seeds seed, seed+1, ...) per option "
                        "for the median KLDB; the first is the timed batch [digits 4, others 1]")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the timed runs (and of random weights)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's own")
    parser.add_argument("--time-budget", type=float, default=0.0, help="stop measuring after this many seconds and "
                        "write what was measured (0: no limit)")  # fmt: skip
    parser.add_argument("--memory-interval-ms", type=float, default=2.0, help="RSS sampling period on CPU")
    parser.add_argument("--report", type=Path, default=None, help="measure nothing: print the tables of a JSON file "
                        "this benchmark wrote (e.g. benchmarks/results/*.json)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here (rewritten after each "
                        "section, so a run cut short keeps what it measured)")  # fmt: skip
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = torch.device(device).type
    if (args.model, kind) not in DEFAULTS:
        raise SystemExit(f"error: no defaults for --model {args.model} on device type {kind!r}")
    defaults = DEFAULTS[(args.model, kind)]

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return value if value is not None else defaults.get(name)

    config = Config(
        model=args.model,
        device=device,
        dtype=resolve_dtype(args.dtype or "auto", device),
        height=pick("height"),
        steps=pick("steps"),
        interval=pick("interval"),
        batch=pick("batch"),
        batches=pick("batches"),
        options=pick("options"),
        default_option=pick("default_option"),
        repeats=pick("repeats"),
        warmup=pick("warmup"),
        kldb_batches=pick("kldb_batches"),
        seed=args.seed,
        threads=args.threads or torch.get_num_threads(),
        time_budget=args.time_budget,
        memory_interval_ms=args.memory_interval_ms,
    )
    problems = []
    for name in ("steps", "interval", "batch", "repeats", "kldb_batches", "threads"):
        if getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} has to be >= 1 but is {getattr(config, name)}")
    if config.warmup < 0:
        problems.append(f"--warmup has to be >= 0 but is {config.warmup}")
    if config.interval > config.steps:
        problems.append(f"--interval ({config.interval}) has to be at most --steps ({config.steps})")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    return config


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.report is not None:
        result = json.loads(args.report.read_text(encoding="utf-8"))
        print(format_report(result))
        return result
    config = config_from_args(args)
    path: Path | None = args.json
    result = run_benchmark(config, write=(lambda r: write_json(path, r)) if path is not None else None)
    print(format_report(result))
    if path is not None:
        print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
