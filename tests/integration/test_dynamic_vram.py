"""Our layers under ComfyUI's dynamic-VRAM loader (``ModelPatcherDynamic``, the default on GPUs
from 0.33), run on the CPU with ComfyUI's own loader code (lab.dynamic_vram): quantized and
branched models compute what the plain loader computes, LoRAs loaded before and after take
effect, clones sharing one model keep their own outputs, Save Quantized Model and the UNet cache
work. Only what a GPU runs (VRAM arena, pinned buffers, prefetch) is left to the README's notes.

LoRAs go on our layers only: on the CPU, ComfyUI's own float layers ignore a LoRA the dynamic
loader hangs on them (they apply it only on their GPU streaming path)."""
from __future__ import annotations

import pytest
import torch

from comfyui_accel import compat
from comfyui_accel.cache import adapters, engine
from lab import dynamic_vram, fixtures
from lab.quant_checks import lora_for, quantize, sample, with_lora
from comfyui_accel.quant import checkpoint
from comfyui_accel.quant.svdquant import branch_model, select_layers
from comfyui_accel.quant.linear import QuantLinear

pytestmark = pytest.mark.integration


def small_layer_wan():
    """A Wan 2.1 of width 128 in bf16 whose FFN layers (32 wide) are 16 KB or less, the size the
    dynamic loader patches at load time instead of streaming."""
    config = fixtures.model_config("WAN21_T2V", {**fixtures.size_spec("wan21", "tiny").unet_config,
                                                 "dim": 128, "num_heads": 1, "ffn_dim": 32, "num_layers": 2})
    config.set_inference_dtype(torch.bfloat16, None)
    shapes = {k: tuple(v.shape) for k, v in config.get_model({}).diffusion_model.state_dict().items()}
    sd = {k: fixtures._init_tensor(k, shape, 0) for k, shape in shapes.items()}
    return fixtures.build_model(config, sd, torch.bfloat16)


@pytest.fixture(scope="module")
def both(comfy):
    """``both(family)``: the fixture under the plain loader and, in its own BaseModel, under
    the dynamic one (family "small-layer wan": :func:`small_layer_wan`, sampled as wan21)."""
    reason = dynamic_vram.unavailable()
    if reason:
        pytest.skip(reason)

    def load(family, **kw):
        if family == "small-layer wan":
            return small_layer_wan(), dynamic_vram.as_dynamic(small_layer_wan())
        return fixtures.load_model(family, "tiny", **kw), dynamic_vram.dynamic_patcher(family, **kw)
    return load


def family_of(name):
    return "wan21" if name == "small-layer wan" else name


def quantizer(name, fmt):
    """Quantize Model for ``fmt``; the small-layer Wan computes in bf16 so its packed FFN layers
    stay at 16 KB or less; "svdquant w4a4": :func:`svdquant`."""
    if fmt.startswith("svdquant"):
        return svdquant
    return lambda m: quantize(m, fmt, 32, dtype=torch.bfloat16 if name == "small-layer wan" else None)


def quantized_paths(result, fmt):
    return [r.layer for r in result.rows if r.format == fmt]


def svdquant(model):
    """SVD Low-Rank Branch (rank 16, no calibration), then Quantize Model w4a4."""
    layers = [name for name, _ in select_layers(model, [])]
    return quantize(branch_model(model, layers, 16, 0.0).model, "w4a4", 64)


def layer(model, path):
    return model.get_model_object("diffusion_model." + path)


CASES = [("wan21", "int8"), ("sdxl", "int4"), ("small-layer wan", "int4"), ("wan21", "svdquant w4a4")]


def quantized_pair(both, name, fmt):
    """(family, plain fixture, plain quantized, dynamic quantized, quantized layer paths)."""
    plain, dynamic = both(name)
    q_plain, q_dyn = quantizer(name, fmt)(plain), quantizer(name, fmt)(dynamic)
    assert q_dyn.model.is_dynamic() and not q_plain.model.is_dynamic()
    return family_of(name), plain, q_plain.model, q_dyn.model, quantized_paths(q_plain, fmt.split()[-1])


@pytest.mark.parametrize("name,fmt", CASES)
def test_quantized_model_matches_the_plain_loader(both, name, fmt):
    family, _, q_plain, q_dyn, paths = quantized_pair(both, name, fmt)
    assert torch.equal(sample(q_dyn, family), sample(q_plain, family))
    # the dynamic loader placed every quantized layer: streamed (weight left on the offload
    # device, patches hung on it) or, for layers of 16 KB and less, patched at load time (backed up)
    placed = [p for p in paths if getattr(layer(q_dyn, p), "seed_key", None) == "diffusion_model." + p]
    assert placed == paths
    force_loaded = [p for p in paths if f"diffusion_model.{p}.weight" in q_dyn.backup]
    if name == "small-layer wan":  # the at-load path, which must not repack what it does not patch
        assert force_loaded and len(force_loaded) < len(paths)
    else:
        assert not force_loaded


@pytest.mark.parametrize("name,fmt", CASES)
def test_lora_after_quantization_matches_the_plain_loader(both, name, fmt):
    family, plain, q_plain, q_dyn, paths = quantized_pair(both, name, fmt)
    lora = lora_for(plain, paths, scale=0.5)
    expected = sample(with_lora(q_plain, lora), family)
    assert not torch.allclose(expected, sample(q_plain, family), atol=1e-2)  # the LoRA shows
    out = sample(with_lora(q_dyn, lora), family)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_lora_before_quantization_matches_the_plain_loader(both):
    plain, dynamic = both("wan21")
    lora = lora_for(plain, ["blocks.0.self_attn.q", "blocks.1.ffn.0"], scale=0.5)
    expected = sample(quantize(with_lora(plain, lora), "int8").model, "wan21")
    assert not torch.allclose(expected, sample(quantize(plain, "int8").model, "wan21"), atol=1e-2)
    assert torch.equal(sample(quantize(with_lora(dynamic, lora), "int8").model, "wan21"), expected)


def test_clones_sharing_a_model_keep_their_own_outputs(both):
    """A quantized model and its LoRA clone share their QuantLinear objects; run in turns under
    the dynamic loader, then the LoRA clone under a plain loader on the same model (what
    ComfyUI's sampler does for hooked conditioning), each gives its plain-loader output."""
    plain, dynamic = both("wan21")
    q_plain, q_dyn = quantize(plain, "int8"), quantize(dynamic, "int8")
    lora = lora_for(plain, quantized_paths(q_plain, "int8")[:6], scale=0.5)
    expected = {"q": sample(q_plain.model, "wan21"), "lora": sample(with_lora(q_plain.model, lora), "wan21")}
    models = {"q": q_dyn.model, "lora": with_lora(q_dyn.model, lora)}
    probe = layer(models["lora"], quantized_paths(q_plain, "int8")[0])
    for name in ("lora", "q", "lora", "q"):
        assert torch.equal(sample(models[name], "wan21"), expected[name]), name
        # a streamed LoRA is packed once per load and kept on the offload device; dropped after
        assert (probe._streamed is not None) == (name == "lora")
    sample(models["lora"], "wan21")
    delegate = models["lora"].clone(disable_dynamic=True, model_override=models["lora"].get_clone_model_override())
    assert not delegate.is_dynamic()
    assert torch.equal(sample(delegate, "wan21"), expected["lora"])


def test_save_quantized_with_a_lora_under_the_dynamic_loader(both, tmp_path):
    # Save Quantized Model once loaded with force_patch_weights, which the dynamic loader refuses
    plain, dynamic = both("wan21")
    q_plain, q_dyn = quantize(plain, "int8"), quantize(dynamic, "int8")
    lora = lora_for(plain, quantized_paths(q_plain, "int8")[:6], scale=0.5)
    expected = sample(with_lora(q_plain.model, lora), "wan21")
    lora_dyn = with_lora(q_dyn.model, lora)
    sample(lora_dyn, "wan21")  # loaded: the file must not depend on what the loader did
    path = str(tmp_path / "dyn.safetensors")
    checkpoint.save_model(lora_dyn, path)
    assert torch.equal(sample(checkpoint.load_model(path), "wan21"), expected)


def test_branch_copies_start_without_the_loaders_state(both):
    """SVD Low-Rank Branch copies each layer; after a dynamic load the original carries that
    load's state (the LoRA patch, seed key, pin state; on GPUs its VRAM slot and pinned copy),
    which the copy must not share."""
    plain, dynamic = both("wan21", outliers=True)
    path = "blocks.1.self_attn.q"
    sample(with_lora(dynamic, lora_for(plain, [path])), "wan21")
    original = layer(dynamic, path)
    carried = [a for a in compat.LOADER_MODULE_STATE if a in original.__dict__]
    assert "weight_lowvram_function" in carried and "seed_key" in carried
    branched = branch_model(dynamic, [path], 16, 0.0).model
    copy = layer(branched, path)
    assert copy is not original and copy.accel_branch is not None
    assert not [a for a in carried if a in copy.__dict__]
    expected = sample(branch_model(plain, [path], 16, 0.0).model, "wan21")
    assert torch.equal(sample(branched, "wan21"), expected)


def test_unet_cache_containers_under_the_dynamic_loader(both):
    """DeepCache's block containers (object patches holding the model's own blocks) on a
    quantized SDXL: at threshold 0 the uncached output bit for bit, and a real cache run gives
    the plain loader's output."""
    plain, dynamic = both("sdxl")

    def cached(model, threshold):
        adapter = adapters.find_adapter(model.get_model_object("diffusion_model"))
        settings = engine.Settings(node="test", method="teacache", threshold=threshold,
                                   signal=adapter.signals()[0], coefficients=(1.0, 0.0))
        return engine.install(model, settings, adapter, adapter.family)

    q_plain, q_dyn = quantize(plain, "int8").model, quantize(dynamic, "int8").model
    assert torch.equal(sample(cached(q_dyn, 0.0), "sdxl"), sample(q_dyn, "sdxl"))
    assert torch.equal(sample(cached(q_dyn, 0.3), "sdxl"), sample(cached(q_plain, 0.3), "sdxl"))
    assert isinstance(layer(q_dyn, quantized_paths(quantize(plain, "int8"), "int8")[0]), QuantLinear)
