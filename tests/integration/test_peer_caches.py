"""ComfyUI's own EasyCache and LazyCache as the bench runs them, on the trained Flux reference.

EasyCache gave pure noise on both reference models. The cause (peer_caches.hand_over_a_copy):
on a reused step it adds its cached difference to its input in place and returns that tensor;
on a CPU in float32 that input *is* the sampler's latent for flow models, so ComfyUI computes
``denoised = x - x * sigma``. These tests keep the diagnosis honest: they check that the
aliasing is what happens on this host and that handing EasyCache a copy (what the bf16/fp16
cast does on a GPU) gives a picture close to the uncached one.
"""
import pytest
import torch

from comfyui_accel import metrics
from lab import sampling
from lab.peer_caches import comfy_cache, hand_over_a_copy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def subject(comfy):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    s = sampling.reference_subject("ref_flux", steps=20)
    yield s, s.picture(s.sample(s.model))
    torch.set_num_threads(threads)


def _easycache(model, copy: bool):
    """ComfyUI's EasyCache node on ``model`` (optionally given a copy of its input) and a spy,
    outside it, that counts the calls whose output is the input tensor itself."""
    import comfy.patcher_extension
    from comfy_extras.nodes_easycache import EasyCacheNode
    m = hand_over_a_copy(model) if copy else model.clone()
    seen = {"calls": 0, "returned_input": 0}

    def spy(executor, x, *args, **kwargs):
        out = executor(x, *args, **kwargs)
        seen["calls"] += 1
        seen["returned_input"] += int(out.data_ptr() == x.data_ptr())
        return out

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.spy", spy)
    out = EasyCacheNode.execute(m, 0.2, 0.15, 0.95, False)
    return (out.args[0] if hasattr(out, "args") else out[0]), seen


def test_easycache_returns_the_sampler_latent_in_fp32_and_a_copy_fixes_it(subject):
    s, reference = subject
    plain, seen = _easycache(s.model, copy=False)
    psnr_plain = metrics.psnr(reference, s.picture(s.sample(plain)), data_range=1.0)
    if not seen["returned_input"]:
        pytest.skip("this host's EasyCache no longer returns its input tensor on reused steps")
    assert 0 < seen["returned_input"] < seen["calls"]
    assert psnr_plain < 15            # the reused steps destroy the picture
    copied, seen_copy = _easycache(s.model, copy=True)
    psnr_copy = metrics.psnr(reference, s.picture(s.sample(copied)), data_range=1.0)
    assert seen_copy["returned_input"] > 0   # it still skips (and returns its own copy) ...
    assert psnr_copy > 20                     # ... and the picture stays


def test_bench_peers_skip_and_keep_the_picture(subject):
    s, reference = subject
    for kind in ("EasyCache", "LazyCache"):
        m, counter = comfy_cache(s.model, kind, reuse_threshold=0.2, start_percent=0.15, end_percent=0.95)
        out = s.sample(m)
        assert 0 < counter["calls"] < s.steps, kind
        assert metrics.psnr(reference, s.picture(out), data_range=1.0) > 20, kind
