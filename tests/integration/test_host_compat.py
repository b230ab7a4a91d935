"""The host the suite runs on meets the pack's minimum, by the same check the pack logs at load."""
import pytest

from comfyui_accel import compat

pytestmark = pytest.mark.integration


def test_this_host_meets_the_minimum(comfy):
    assert compat.host_problem() is None


def test_comfyui_quantized_layouts_found_by_feature(comfy):
    import comfy.quant_ops
    found = compat.core_quant_formats()
    if hasattr(comfy.quant_ops, "get_layout_class"):  # kitchen's quant_ops (0.33 on)
        assert {"int8_tensorwise", "float8_e4m3fn", "nvfp4", "mxfp8", "asym_w4a8_int8", "convrot_w4a4"} <= found
    else:  # 0.3.75's own fp8-only QuantizedTensor: Quantize Model keeps its own layers there
        assert found == frozenset()
