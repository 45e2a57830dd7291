"""A small decoder for the guidance gradient (`guidance_vae`, `kldb_guidance_decoder`)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import gen
from diffusers import AutoencoderTiny

from kldb import KLDBGuidanceCallback
from kldb.testing import tiny_components, tiny_guidance_vae
from pipeline_kldb_boundary import KLDBBoundaryPipeline

KWARGS = {"classes": [3, 2], "num_inference_steps": 6, "kldb_guidance_interval": 2, "output_type": "pt"}


def pipeline(guidance_vae=None) -> KLDBBoundaryPipeline:
    pipe = KLDBBoundaryPipeline(**tiny_components(seed=0), guidance_vae=guidance_vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class CallCounter:
    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1


@pytest.fixture(scope="module")
def plain():
    return pipeline()


@pytest.fixture(scope="module")
def with_tiny():
    return pipeline(tiny_guidance_vae(seed=1))


@pytest.mark.parametrize("mode", ["unet", "detached"])
def test_the_vae_itself_as_guidance_vae_changes_nothing(plain, mode):
    same = pipeline()
    same.register_modules(guidance_vae=same.vae)
    base = plain(generator=gen(0), num_images_per_prompt=2, kldb_gradient=mode, **KWARGS)
    out = same(generator=gen(0), num_images_per_prompt=2, kldb_gradient=mode, **KWARGS)
    assert torch.equal(out.images, base.images)


def test_auto_uses_the_guidance_vae_and_images_come_from_the_vae(plain, with_tiny):
    decoder_calls, vae_calls = CallCounter(with_tiny.guidance_vae.decoder), CallCounter(with_tiny.vae.decoder)
    try:
        auto = with_tiny(generator=gen(1), num_images_per_prompt=2, **KWARGS)
        assert (decoder_calls.calls, vae_calls.calls) == (3, 1)  # 3 guided steps; the returned images
        explicit = with_tiny(generator=gen(1), num_images_per_prompt=2, kldb_guidance_decoder="guidance_vae", **KWARGS)
        full = with_tiny(generator=gen(1), num_images_per_prompt=2, kldb_guidance_decoder="vae", **KWARGS)
        assert (decoder_calls.calls, vae_calls.calls) == (6, 1 + 1 + 1 + 3)
    finally:
        decoder_calls.handle.remove()
        vae_calls.handle.remove()
    assert torch.equal(auto.images, explicit.images)
    # "vae" ignores the registered guidance_vae: the images of a pipeline without one
    assert torch.equal(full.images, plain(generator=gen(1), num_images_per_prompt=2, **KWARGS).images)
    assert not torch.allclose(auto.images, full.images)  # a different (random) decoder: a different gradient
    assert auto.guided_updates == 6 and auto.skipped_updates == 0


def test_the_callback_takes_a_decoder(plain):
    from kldb import as_image_classifier

    classifier = as_image_classifier(plain.classifier, plain.classifier_processor)
    tiny = tiny_guidance_vae(seed=1)
    counter = CallCounter(tiny.decoder)
    try:
        callback = KLDBGuidanceCallback(classifier, [3, 2], guidance_scale=0.1, interval=2, decoder=tiny)
        plain("three and two", num_inference_steps=6, generator=gen(2), output_type="pt", classes=None,
              kldb_guidance_scale=0.0, callback_on_step_end=callback,
              callback_on_step_end_tensor_inputs=callback.tensor_inputs)  # fmt: skip
    finally:
        counter.handle.remove()
    assert counter.calls == 3 and callback.guided_updates == 3
    with pytest.raises(TypeError, match=r"`decoder` has to be an autoencoder with a `decode` method .* but is int"):
        KLDBGuidanceCallback(classifier, [3, 2], decoder=3)


def test_bad_guidance_decoder_arguments(plain):
    with pytest.raises(ValueError, match=r"`kldb_guidance_decoder` has to be one of \('auto', 'vae', 'guidance_vae'\) but is 'tiny'"):
        plain(generator=gen(0), kldb_guidance_decoder="tiny", **KWARGS)
    with pytest.raises(ValueError, match=r"`kldb_guidance_decoder='guidance_vae'` needs the pipeline's `guidance_vae` component, which is None"):
        plain(generator=gen(0), kldb_guidance_decoder="guidance_vae", **KWARGS)


def test_checkpointing_covers_the_guidance_vae(with_tiny):
    base = with_tiny(generator=gen(3), **KWARGS)
    with_tiny.enable_guidance_checkpointing()
    try:
        assert with_tiny.guidance_vae.decoder.gradient_checkpointing
        checkpointed = with_tiny(generator=gen(3), **KWARGS)
    finally:
        with_tiny.disable_guidance_checkpointing()
    assert not with_tiny.guidance_vae.decoder.gradient_checkpointing
    torch.testing.assert_close(checkpointed.images, base.images, rtol=1e-5, atol=1e-6)


def test_save_and_load_keep_the_guidance_vae(with_tiny, tmp_path):
    with_tiny.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["guidance_vae"] == ["diffusers", "AutoencoderTiny"]
    assert (tmp_path / "guidance_vae" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = KLDBBoundaryPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.guidance_vae, AutoencoderTiny)
    for (name, a), (_, b) in zip(with_tiny.guidance_vae.state_dict().items(), loaded.guidance_vae.state_dict().items()):
        assert torch.equal(a, b), name
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(loaded(generator=gen(4), **KWARGS).images, with_tiny(generator=gen(4), **KWARGS).images)


def test_a_guidance_vae_can_be_given_at_from_pretrained(plain, tmp_path):
    plain.save_pretrained(tmp_path)
    assert "guidance_vae" not in json.loads((tmp_path / "model_index.json").read_text()) or json.loads(
        (tmp_path / "model_index.json").read_text()
    )["guidance_vae"] == [None, None]
    loaded = KLDBBoundaryPipeline.from_pretrained(tmp_path, guidance_vae=tiny_guidance_vae(seed=1))
    assert isinstance(loaded.guidance_vae, AutoencoderTiny)
    assert KLDBBoundaryPipeline.from_pretrained(tmp_path).guidance_vae is None
