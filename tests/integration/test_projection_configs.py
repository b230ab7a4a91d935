"""The projection's model formulas against ComfyUI's own model classes: parameter counts of the
full-size configurations (built on the meta device) and FLOPs of small forwards (PyTorch's
FLOP counter), both exact."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lab.bench import projection
from lab import fixtures


def _meta_params(comfy, model_config_name: str, config: dict) -> int:
    model_config = fixtures.model_config(model_config_name, config)
    model_config.set_inference_dtype(torch.bfloat16, None)
    model = model_config.get_model({}, device=torch.device("meta"))
    return sum(v.numel() for v in model.diffusion_model.state_dict().values())


@pytest.mark.parametrize("name, config, spec", [
    ("Flux", fixtures._flux(3072, 19, 38), projection.flux_spec()),                                # FLUX.1-dev
    ("WAN21_T2V", fixtures._wan(5120, 40, 13824), projection.wan21_spec()),                        # Wan 2.1 T2V 14B
    ("HunyuanVideo", fixtures._hunyuan_video(3072, 20, 40), projection.hunyuan_video_spec()),      # HunyuanVideo 13B
])
def test_parameter_count_equals_comfyuis_model(comfy, name, config, spec):
    assert spec.params == _meta_params(comfy, name, config)


def _random(module):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prm in module.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
    return module


def test_flops_equal_a_flux_forward(comfy):
    import comfy.ops
    from comfy.ldm.flux.model import Flux
    from comfyui_accel.compat import complete_unet_config
    config = complete_unet_config(fixtures._flux(128, 1, 2))
    config.pop("image_model")
    model = _random(Flux(operations=comfy.ops.disable_weight_init, **config))
    x, context, y = torch.randn(1, 16, 8, 8), torch.randn(1, 4, 4096), torch.randn(1, 768)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, torch.tensor([0.5]), context, y, guidance=torch.tensor([3.5]))
    spec = projection.flux_spec(hidden=128, heads=1, depth=1, depth_single=2, width=64, height=64, txt_tokens=4)
    assert sum(projection.flops_per_evaluation(spec)) == counter.get_total_flops()


def test_flops_equal_a_wan_forward(comfy):
    import comfy.ops
    from comfy.ldm.wan.model import WanModel
    config = fixtures._wan(128, 2, 256)
    config.pop("image_model")
    model = _random(WanModel(operations=comfy.ops.disable_weight_init, **config))
    x, context = torch.randn(1, 16, 3, 8, 8), torch.randn(1, 5, 4096)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, torch.tensor([500.0]), context)
    spec = projection.wan21_spec(dim=128, ffn=256, heads=1, layers=2, width=64, height=64, frames=9, txt_tokens=5)
    assert sum(projection.flops_per_evaluation(spec)) == counter.get_total_flops()
