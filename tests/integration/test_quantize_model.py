"""Quantize Model on real ComfyUI models (tiny fixtures of every family), real ModelPatcher,
real samplers: the clone is close to the original, the original is untouched, and LoRAs
loaded with ComfyUI's own loader take effect before and after quantization."""
import pytest
import torch

from lab import fixtures
from comfyui_accel.quant import model as qmodel
from comfyui_accel.quant.linear import QuantLinear
from lab.quant_checks import (assert_unchanged, full_and_lowvram_outputs, lora_for, quantize, sample,
                                                 snapshot, with_lora, with_weights)
from comfyui_accel.metrics import psnr

FAMILIES = list(fixtures.FAMILIES)


@pytest.fixture(scope="module")
def wan(comfy):
    """The tiny Wan 2.1 and its unquantized output, shared by the tests below."""
    model = fixtures.load_model("wan21", "tiny")
    return model, sample(model, "wan21")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_int8_close_and_input_untouched(comfy, family):
    model = fixtures.load_model(family, "tiny")
    before = snapshot(model)
    reference = sample(model, family)
    result = quantize(model, "int8")
    assert psnr(reference, sample(result.model, family)) > 35
    n_quant = sum(1 for r in result.rows if r.format == "int8")
    assert n_quant >= 10 and len(result.model.object_patches) == n_quant
    assert all(isinstance(m, QuantLinear) for m in result.model.object_patches.values())
    # the original is untouched in its own view, even while the clone's layers are installed
    assert_unchanged(model, before)


def test_input_still_gives_its_own_output_after_the_clone_ran(wan):
    model, reference = wan
    sample(quantize(model, "int8").model, "wan21")
    assert torch.equal(sample(model, "wan21"), reference)


@pytest.mark.parametrize("fmt,floor_db", [("fp8_e4m3", 30), ("int4", 20), ("w4a8", 20), ("nvfp4", 20),
                                          ("mxfp4", 18)])
def test_each_format_on_wan(wan, fmt, floor_db):
    model, reference = wan
    result = quantize(model, fmt)
    rows = [r for r in result.rows if r.format == fmt]
    assert rows and all(r.weight_sqnr_db > floor_db - 6 for r in rows)
    assert psnr(reference, sample(result.model, "wan21")) > floor_db


def test_keep_roles_and_overrides(comfy):
    model = fixtures.load_model("flux", "tiny")
    result = quantize(model, "int8", overrides="double_blocks\\.0\\. = keep\nsingle_blocks.*linear2 = int4 weight_only")
    by_layer = {r.layer: r for r in result.rows}
    assert by_layer["img_in"].format == "keep" and by_layer["final_layer.linear"].format == "keep"
    assert by_layer["time_in.in_layer"].format == "keep"
    assert by_layer["double_blocks.1.img_mod.lin"].activations == "float"  # modulation: weight-only
    assert by_layer["double_blocks.1.img_attn.qkv"].activations == "int8"
    assert by_layer["double_blocks.0.img_attn.qkv"].format == "keep"
    assert by_layer["single_blocks.0.linear2"].format == "int4"


def test_already_quantized_is_refused(wan):
    model, _ = wan
    result = quantize(model, "int8")
    with pytest.raises(qmodel.AlreadyQuantized, match="already has"):
        quantize(result.model, "int4")


def _quantized_paths(result):
    return [r.layer for r in result.rows if r.format != "keep"]


def test_lora_before_quantization_is_merged(wan):
    # int4 is weight-only, so the quantized model equals its dequantized weights exactly
    model, _ = wan
    paths = _quantized_paths(quantize(model, "int4"))
    lora = lora_for(model, paths, scale=0.5)
    lora_model = with_lora(model, lora)
    before = snapshot(lora_model)
    result = quantize(lora_model, "int4")
    assert not any(k.endswith(".weight") and k[len("diffusion_model."):-len(".weight")] in paths
                   for k in result.model.patches), "merged LoRA patches must leave the clone"
    out = sample(result.model, "wan21")
    deq = {p: result.model.object_patches["diffusion_model." + p].weight.dequantize(torch.float32) for p in paths}
    expected = sample(with_weights(model, deq), "wan21")
    assert psnr(expected, out) > 60
    # the LoRA took effect: the result is far from quantizing the model without it
    plain = sample(quantize(model, "int4").model, "wan21")
    assert psnr(plain, out) < psnr(expected, out) - 20
    assert_unchanged(lora_model, before)


@pytest.mark.parametrize("fmt,min_cos,min_gain_db", [("int8", 0.99, 20), ("int4", 0.9, 5)])
def test_lora_after_quantization_takes_effect(wan, fmt, min_cos, min_gain_db):
    # The LoRA is baked into the quantized weight (stochastic rounding): int8 keeps it almost
    # exactly; 4-bit requantization adds noise on top of it.
    model, _ = wan
    result = quantize(model, fmt)
    paths = _quantized_paths(result)
    # read before any LoRA run: a loaded LoRA clone patches the shared QuantLinear in place
    deq = {p: result.model.object_patches["diffusion_model." + p].weight.dequantize(torch.float32) for p in paths}
    lora = lora_for(model, paths, scale=0.5)
    out = sample(with_lora(result.model, lora), "wan21")
    # reference: the dequantized weights with the LoRA added in float (int8's activation
    # quantization stays in both sides of the comparison through ``without``)
    expected = sample(with_lora(with_weights(model, deq), lora), "wan21")
    without = sample(result.model, "wan21")
    effect = (out - without).flatten()
    expected_effect = (expected - without).flatten()
    assert torch.nn.functional.cosine_similarity(effect, expected_effect, dim=0) > min_cos
    assert psnr(expected, out) > psnr(expected, without) + min_gain_db
    # after the LoRA run, the quantized model without LoRA is back to its own output
    assert torch.equal(sample(result.model, "wan21"), without)


def test_lowvram_weight_function_path_matches_full_load(wan):
    model, _ = wan
    result = quantize(model, "int8")
    paths = _quantized_paths(result)
    lora_model = with_lora(result.model, lora_for(model, paths, scale=0.5))
    full, partial, used_lowvram_full, used_lowvram = full_and_lowvram_outputs(lora_model, "blocks.0.self_attn.q")
    assert not used_lowvram_full and used_lowvram
    assert torch.allclose(full, partial, atol=1e-5)


def test_compute_dtype_bf16_runs_in_bf16(wan):
    model, reference = wan
    result = quantize(model, "int8", dtype=torch.bfloat16)
    layer = result.model.object_patches["diffusion_model.blocks.0.ffn.0"]
    assert layer.weight.dtype == torch.bfloat16
    assert result.model.object_patches["manual_cast_dtype"] == torch.bfloat16 and result.model.force_cast_weights
    assert not model.force_cast_weights and "manual_cast_dtype" not in model.object_patches
    assert psnr(reference, sample(result.model, "wan21")) > 30


def test_a_layer_another_node_replaced_is_chained_not_replaced(wan):
    model, _ = wan
    other = model.clone()
    original = other.get_model_object("diffusion_model.blocks.0.ffn.0")
    theirs = torch.nn.Linear(original.in_features, original.out_features)  # another node's object patch
    other.add_object_patch("diffusion_model.blocks.0.ffn.0", theirs)
    result = quantize(other, "int8")
    row = next(r for r in result.rows if r.layer == "blocks.0.ffn.0")
    assert row.format == "keep" and "another node" in row.reason
    assert result.model.object_patches["diffusion_model.blocks.0.ffn.0"] is theirs
    assert isinstance(result.model.object_patches["diffusion_model.blocks.0.ffn.2"], QuantLinear)


def test_weight_bytes_follow_each_clone_while_another_clone_runs(wan):
    """Clones share one module and the last one run has its layers installed in it: each
    clone's weight bytes must still be its own (the bench's int4 model once counted as int8)."""
    from lab.measure import model_weight_bytes
    model, _ = wan
    base = sum(t.numel() * t.element_size() for t in fixtures.state_dict("wan21", "tiny").values())
    int8, int4 = quantize(model, "int8"), quantize(model, "int4", 64)

    def expected(result, packed_bytes_per_weight):
        layers = [r for r in result.rows if r.format != "keep"]
        swapped = sum(r.params for r in layers)
        scales = sum(r.params * packed_bytes_per_weight[1] for r in layers)
        out_rows = sum(result.model.object_patches["diffusion_model." + r.layer].out_features for r in layers)
        return base - 4 * swapped + packed_bytes_per_weight[0] * swapped + scales + packed_bytes_per_weight[2] * out_rows

    # int8: 1 byte a weight + an fp32 scale per output row; int4 g64: 0.5 byte + (fp16 scale + uint8 zero) / 64
    want_int8, want_int4 = expected(int8, (1, 0, 4)), expected(int4, (0.5, 3 / 64, 0))
    for ran in (int8.model, int4.model, model):
        sample(ran, "wan21")
        assert model_weight_bytes(model) == base
        assert model_weight_bytes(int8.model) == want_int8
        assert model_weight_bytes(int4.model) == want_int4
