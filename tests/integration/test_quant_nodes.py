"""The Quantize Model node in-process: report and plot outputs, notices, and clear errors."""
import pytest

from lab import fixtures
from lab.prompts import QUANTIZE_DEFAULTS


@pytest.fixture(scope="module")
def node(comfy):
    from comfyui_accel.nodes.common import AccelInputError
    from comfyui_accel.nodes.quant import AccelQuantizeModel
    model = fixtures.load_model("wan21", "tiny")

    def run(**inputs):
        return AccelQuantizeModel.execute(model, **{**QUANTIZE_DEFAULTS, **inputs}).result

    return run, AccelInputError, model


def test_outputs_report_plot_and_notice(node):
    run, _, model = node
    quantized, report, plot = run(format="fp8_e4m3")
    assert quantized is not model and len(quantized.object_patches) > 10
    assert report.startswith("Quantize Model") and "blocks.0.ffn.0" in report and '"rows"' in report
    # fp8 on a CPU: a documented fallback with a notice, not an error
    assert "no fp8 matmul" in report and "weight-only" in report
    assert "smoothing skipped" in report  # smooth_alpha 0.5 without calibration inputs
    assert plot.dim() == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3
    assert 0.0 <= plot.min() and plot.max() <= 1.0


@pytest.mark.parametrize("inputs,name,text", [
    (dict(format="int4", group_size=96), "group_size", "does not divide"),
    (dict(format="int4", group_size=63), "group_size", "must be even"),
    (dict(layer_overrides="ffn = int3"), "layer_overrides", "the action must be"),
    (dict(layer_overrides="ffn[ = keep"), "layer_overrides", "not a valid regular expression"),
    (dict(format="auto", auto_formats="int8, fp2"), "auto_formats", "fp2"),
    (dict(format="auto", auto_budget=0.0, auto_min_sqnr_db=0.0), "auto_budget", "both 0"),
    (dict(format="auto", auto_budget=0.05), "auto_budget", "cannot be met"),
])
def test_bad_inputs_name_node_and_input(node, inputs, name, text):
    run, AccelInputError, _ = node
    with pytest.raises(AccelInputError, match=rf"Quantize Model [(]AccelQuantizeModel[)]: input '{name}'.*{text}"):
        run(**inputs)


def test_calibration_needs_a_latent(node):
    run, AccelInputError, _ = node
    with pytest.raises(AccelInputError, match="input 'latent'"):
        run(positive=fixtures.make_conditioning("wan21", "tiny"))


def test_already_quantized_input_is_refused(node):
    from comfyui_accel.nodes.quant import AccelQuantizeModel
    run, AccelInputError, _ = node
    quantized = run()[0]
    with pytest.raises(AccelInputError, match="input 'model' is already quantized"):
        AccelQuantizeModel.execute(quantized, **QUANTIZE_DEFAULTS)


def test_save_node_refuses_unquantized_models_and_bad_names(node, tmp_path):
    from comfyui_accel.nodes.quant import AccelSaveQuantized
    run, AccelInputError, model = node
    with pytest.raises(AccelInputError, match="has no quantized layers"):
        AccelSaveQuantized.execute(model, "x", False, "keep")
    with pytest.raises(AccelInputError, match="input 'filename' is '../../etc/evil'; it must be a relative file name"):
        AccelSaveQuantized.execute(run()[0], "../../etc/evil", False, "keep")
