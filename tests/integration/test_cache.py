"""Step caching on real ComfyUI models and samplers (tiny random fixtures, CPU).

What is checked: every family with a block hook caches and, at threshold 0, gives the
uncached output bit for bit; the signal is the modulated input the first block really
consumes; decisions follow the pure rule; per-run state; cond/uncond separation; Heun;
Wan 2.2's two experts; short schedules; composition with LoRA and torch.compile; the nodes.
"""
from __future__ import annotations

import functools

import pytest
import torch

from comfyui_accel.cache import adapters, engine, rules
from lab import sampling

pytestmark = pytest.mark.integration

# Hooked families that lab.fixtures has (DiTs consult patches_replace["dit"]; the UNets
# get DeepCache through object patches) ...
FIXTURE_FAMILIES = ["flux", "wan21", "wan22_5b", "hunyuan_video", "ltxv", "sd3", "sd15", "sdxl"]
# ... and the other hooked families, from the family registry (lab.families).
BUILT = ["chroma", "qwen_image", "mochi", "auraflow", "hunyuan3d", "hunyuan_dit"]
HOOKED = FIXTURE_FAMILIES + list(BUILT)


@functools.lru_cache(maxsize=None)
def fixture_model(family: str, seed: int = 0):
    from lab import families, fixtures
    if family in BUILT:
        return families.build(family, seed)
    return fixtures.load_model(family, "tiny", seed=seed)


def sample(m, family, steps=10, seed=0, cfg=3.0, sampler="euler", **kw):
    if family in BUILT:
        from lab import families
        return families.sample(m, family, steps=steps, seed=seed, cfg=cfg, sampler=sampler)
    return sampling.sample(m, family, steps=steps, seed=seed, cfg=cfg, sampler=sampler, **kw)


def install(m, method: str, **kw):
    dm = m.get_model_object("diffusion_model")
    adapter = adapters.find_adapter(dm)
    settings = engine.Settings(node=f"test-{method}", method=method, **kw)
    use = adapter if settings.target == "blocks" else None
    return engine.install(m, settings, use, adapter.family if adapter else type(dm).__name__)


def teacache(m, threshold: float, signal: str | None = None, coefficients=(1.0, 0.0), **kw):
    """TeaCache with an identity rescale unless told otherwise, on the adapter's first signal."""
    signal = signal or adapters.find_adapter(m.get_model_object("diffusion_model")).signals()[0]
    return install(m, "teacache", threshold=threshold, signal=signal, coefficients=tuple(coefficients), **kw)


def report_of(m) -> dict:
    return engine.setup_of(m).reports[-1]


def computed(report) -> list[bool]:
    return [r["decision"] == "compute" for r in report["rows"]]


def spy_block(m, key, record: list):
    """Wrap the block replacement at ``key`` (ours) with a recorder of its input and output."""
    ours = m.model_options["transformer_options"]["patches_replace"]["dit"][key]

    def spy(args, extra):
        out = ours(args, extra)
        record.append({"in": args["img"].detach().clone(), "out": out["img"].detach().clone(),
                       "cond_or_uncond": list(args["transformer_options"]["cond_or_uncond"])})
        return out

    m.set_model_patch_replace(spy, "dit", key[0], key[1])


@pytest.fixture(scope="module")
def fx(comfy):
    # One thread: these models are tiny, and with other processes on the two cores torch's
    # thread pool oversubscribes (10-20x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from lab import fixtures
    yield fixtures
    torch.set_num_threads(threads)
    fixture_model.cache_clear()


# --- every hooked family -----------------------------------------------------------------

@pytest.mark.parametrize("family", HOOKED)
def test_threshold_zero_is_bit_identical_and_reuse_changes_output(fx, family):
    m = fixture_model(family)
    ref = sample(m, family)
    zero = teacache(m, 0.0)
    assert torch.equal(sample(zero, family), ref)
    assert report_of(zero)["summary"]["computed"] == 10
    reuse = teacache(m, 1e9)   # reuse whenever allowed: first and last step computed
    out = sample(reuse, family)
    assert computed(report_of(reuse)) == [True] + [False] * 8 + [True]
    assert not torch.equal(out, ref) and torch.isfinite(out).all()


# What the first block feeds its attention: the modulated image input TeaCache is defined on.
MODULATED_CONSUMER = {
    "flux": "double_blocks.0.img_attn.qkv", "hunyuan_video": "double_blocks.0.img_attn.qkv",
    "chroma": "double_blocks.0.img_attn.qkv", "wan21": "blocks.0.self_attn.q", "wan22_5b": "blocks.0.self_attn.q",
    "ltxv": "transformer_blocks.0.attn1.to_q", "sd3": "joint_blocks.0.x_block.attn.qkv",
    "qwen_image": "transformer_blocks.0.attn.to_q", "mochi": "blocks.0.attn.qkv_x",
}


def test_every_adapter_is_covered_by_a_tested_model(fx):
    covered = {adapters.find_adapter(fixture_model(f).get_model_object("diffusion_model")).family: f for f in HOOKED}
    assert set(covered) == {a.family for a in adapters.ADAPTERS} | {adapters.UNetAdapter.family}
    with_modulated = {a.family for a in adapters.ADAPTERS if a.modulated}
    assert {covered[f] for f in with_modulated} <= set(MODULATED_CONSUMER)


@pytest.mark.parametrize("family", MODULATED_CONSUMER)
def test_signal_is_the_modulated_input_the_first_block_consumes(fx, family):
    m = fixture_model(family)
    rec = install(m, "record", signal="modulated", min_steps=0)
    layer = adapters.get_path(m.get_model_object("diffusion_model"), MODULATED_CONSUMER[family])
    seen = []
    handle = layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        sample(rec, family, steps=6)
    finally:
        handle.remove()
    report = report_of(rec)
    assert len(seen) == 6   # cond and uncond batched: one call per step
    # ComfyUI batches [uncond, cond]; the deciding stream is cond, the second half.
    assert {r["decider"] for r in report["rows"]} == {"cond"}
    lead = [s[s.shape[0] // 2:] for s in seen]
    expected = [None] + [rules.rel_l1(a, b) for a, b in zip(lead[1:], lead)]
    got = [r["signal"] for r in report["rows"]]
    assert got[0] is None
    assert got[1:] == pytest.approx(expected[1:], rel=1e-4)


def test_qwen_edit_signal_with_a_zero_timestep_reference(fx):
    # Qwen-Image edit models can give their reference image timestep zero (0.33+): the block then
    # gets a timestep batch twice the image's and modulates the reference tokens with the second
    # half. The signal must still be what the block feeds its attention, cond and uncond batched.
    import inspect
    from lab import families
    m = fixture_model("qwen_image")
    block = m.get_model_object("diffusion_model").transformer_blocks[0]
    if "timestep_zero_index" not in inspect.signature(block._modulate).parameters:
        pytest.skip("this ComfyUI's Qwen-Image has no zero-timestep reference (ref_latents_method "
                    "'index_timestep_zero' came after 0.3.75)")
    rec = install(m, "record", signal="modulated", min_steps=0)
    seen = []
    handle = block.attn.to_q.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    pos, neg = families.conditioning("qwen_image", 1), families.conditioning("qwen_image", 2)
    for cond in (pos, neg):
        cond[0][1]["reference_latents_method"] = "index_timestep_zero"
    x = families.latent("qwen_image")
    try:
        sampling.ksampler(rec, pos, neg, x, 6, 3.0)
    finally:
        handle.remove()
    assert len(seen) == 6 and seen[0].shape[0] == 2
    lead = [s[1:] for s in seen]   # [uncond, cond]: the cond stream decides
    expected = [rules.rel_l1(a, b) for a, b in zip(lead[1:], lead)]
    got = [r["signal"] for r in report_of(rec)["rows"]]
    assert got[0] is None and got[1:] == pytest.approx(expected, rel=1e-4)


def test_decisions_follow_the_rule_on_the_vec_signal(fx):
    # Wan's published signal is the modulation vector e0; recompute it from what block 0 gets.
    m = teacache(fixture_model("wan21"), threshold=2.5, signal="vec", coefficients=(1.0, 0.0),
                 warmup_steps=2, start=0.1, end=0.9)
    seen = []
    key = ("double_block", 0)
    ours = m.model_options["transformer_options"]["patches_replace"]["dit"][key]

    def spy(args, extra):
        seen.append(args["vec"].detach().clone())
        return ours(args, extra)

    m.set_model_patch_replace(spy, "dit", *key)
    sample(m, "wan21", steps=12)
    report = report_of(m)
    lead = [v[v.shape[0] // 2:].reshape(v.shape[0] // 2, -1) for v in seen]   # cond: second half
    signals = [None] + [rules.rel_l1(a, b) for a, b in zip(lead[1:], lead)]
    forced = [rules.is_forced(k, 12, 0.1, 0.9, 2, True) for k in range(12)]
    expected = rules.simulate(signals, forced, rules.Rescale([1.0, 0.0]), 2.5)
    assert computed(report) == expected
    assert 3 <= sum(expected) < 12   # the test exercises both branches
    assert report["summary"]["computed"] == sum(expected)


def test_input_model_is_unchanged(fx):
    m = fixture_model("flux")
    before = sample(m, "flux", seed=3)
    options_before = repr(m.model_options)
    cached = teacache(m, 1e9)
    sample(cached, "flux", seed=3)
    assert repr(m.model_options) == options_before
    assert engine.setup_of(m) is None and not m.get_wrappers("outer_sample", engine.KEY)
    assert torch.equal(sample(m, "flux", seed=3), before)


def test_applying_twice_replaces_instead_of_stacking(fx):
    m = teacache(teacache(fixture_model("wan21"), 0.3), 0.0)
    dit = m.model_options["transformer_options"]["patches_replace"]["dit"]
    assert all(isinstance(h, engine.BlockHook) and h.inner is None for h in dit.values())
    for kind in ("outer_sample", "calc_cond_batch", "apply_model"):
        assert len(m.get_wrappers(kind, engine.KEY)) == 1
    assert engine.setup_of(m).settings.threshold == 0.0
    assert torch.equal(sample(m, "wan21"), sample(fixture_model("wan21"), "wan21"))


def test_reinstalling_on_a_unet_drops_the_block_containers(fx):
    from comfyui_accel.cache.adapters import is_cached_block
    deep = teacache(fixture_model("sdxl"), 1e9)
    assert sum(map(is_cached_block, deep.object_patches.values())) >= 3
    output = install(deep, "taylorseer", target="output", interval=1, order=1)
    assert not any(map(is_cached_block, output.object_patches.values()))
    assert torch.equal(sample(output, "sdxl"), sample(fixture_model("sdxl"), "sdxl"))


def test_existing_block_replacement_is_chained(fx):
    base = fixture_model("wan21").clone()
    calls = []

    def other(args, extra):   # another node's replacement on block 1 (e.g. a layer skip)
        calls.append(1)
        return extra["original_block"](args)

    base.set_model_patch_replace(other, "dit", "double_block", 1)
    cached = teacache(base, 0.3)
    sample(cached, "wan21")
    assert len(calls) == report_of(cached)["summary"]["computed"]   # runs on computed calls only


# --- per-run state, streams, samplers --------------------------------------------------------

def test_runs_do_not_share_cache(fx):
    m = fixture_model("wan21")
    cached = teacache(m, 0.6)
    first = sample(cached, "wan21", seed=1)
    second = sample(cached, "wan21", seed=2)
    fresh = sample(teacache(m, 0.6), "wan21", seed=2)
    assert torch.equal(second, fresh) and not torch.equal(first, second)
    assert [r["summary"]["evaluations"] for r in engine.setup_of(cached).reports] == [10, 10]


def test_interrupted_run_leaves_no_state(fx):
    import comfy.model_management
    m = fixture_model("wan21")
    cached = teacache(m, 0.6)

    def stop(step, *_):
        if step == 4:
            raise comfy.model_management.InterruptProcessingException()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(cached, "wan21", seed=5, callback=stop)
    assert report_of(cached)["summary"]["status"] == "interrupted"
    assert torch.equal(sample(cached, "wan21", seed=6), sample(teacache(m, 0.6), "wan21", seed=6))


def test_cond_and_uncond_keep_separate_residuals(fx):
    # Spies on the first and last block: on a reused call each chunk must get back exactly the
    # residual its own stream computed last time, and the two streams' residuals differ.
    m = teacache(fixture_model("wan21"), 0.5, coefficients=(2.0, 0.0))
    n_blocks = len(engine.setup_of(m).keys)
    first, last = [], []
    spy_block(m, ("double_block", 0), first)
    spy_block(m, ("double_block", n_blocks - 1), last)
    sample(m, "wan21")
    report = report_of(m)
    residual, checked = {}, 0
    for call, end, decision in zip(first, last, computed(report), strict=True):
        half = call["in"].shape[0] // 2
        chunks = {c: slice(i * half, (i + 1) * half) for i, c in enumerate(call["cond_or_uncond"])}
        if decision:
            residual = {c: end["out"][s] - call["in"][s] for c, s in chunks.items()}
        else:
            for c, s in chunks.items():
                assert torch.allclose(call["out"][s] - call["in"][s], residual[c], atol=1e-5)
            assert not torch.allclose(residual[0], residual[1], atol=1e-3)
            checked += 1
    assert checked >= 2
    assert set(report["streams"]) == {"cond", "uncond"}


def test_split_cond_uncond_calls_share_one_decision(fx):
    # Context lengths that do not batch make ComfyUI call the model once per cond.
    m = fixture_model("wan21")
    ref = sample(m, "wan21", tokens=(7, 9))
    zero = teacache(m, 0.0)
    assert torch.equal(sample(zero, "wan21", tokens=(7, 9)), ref)
    cached = teacache(m, 0.5, coefficients=(2.0, 0.0))
    sample(cached, "wan21", tokens=(7, 9))
    report = report_of(cached)
    assert report["summary"]["evaluations"] == 10
    streams = report["streams"]
    assert streams["cond"] == streams["uncond"] and 0 < streams["cond"]["skipped"] < 10


def test_batched_and_split_calls_decide_the_same(fx):
    m = fixture_model("wan21")
    batched = teacache(m, 0.0)   # threshold 0: same trajectory as uncached, both ways
    split = teacache(m, 0.0)
    sample(batched, "wan21", tokens=(9, 9))
    sample(split, "wan21", tokens=(7, 9))
    a, b = report_of(batched), report_of(split)
    assert [r["decider"] for r in a["rows"]] == [r["decider"] for r in b["rows"]] == ["cond"] * 10


@pytest.mark.parametrize("sampler,evals", [("heun", 2 * 9 + 1), ("dpmpp_2s_ancestral", 2 * 9 + 1)])
def test_multi_evaluation_samplers(fx, sampler, evals):
    m = fixture_model("wan21")
    ref = sample(m, "wan21", sampler=sampler)
    zero = teacache(m, 0.0)
    assert torch.equal(sample(zero, "wan21", sampler=sampler), ref)
    rows = report_of(zero)["rows"]
    assert len(rows) == evals
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 9
    cached = teacache(m, 0.5, coefficients=(2.0, 0.0))
    out = sample(cached, "wan21", sampler=sampler)
    assert torch.isfinite(out).all() and 0 < report_of(cached)["summary"]["reused"]


def test_wan22_two_experts_keep_their_own_caches(fx):
    # High-noise expert for steps 0-6, low-noise expert for 6-12 (KSamplerAdvanced style).
    high, low = fixture_model("wan21", 0), fixture_model("wan21", 1)

    def two_stage(h, lo):
        x = sample(h, "wan21", steps=12, start_step=0, last_step=6, seed=4)
        return sample(lo, "wan21", steps=12, start_step=6, last_step=12, latent=x, disable_noise=True,
                      seed=4)

    ref = two_stage(high, low)
    h0, l0 = teacache(high, 0.0, force_short=True), teacache(low, 0.0, force_short=True)
    assert torch.equal(two_stage(h0, l0), ref)
    hc, lc = teacache(high, 0.4, force_short=True), teacache(low, 0.4, force_short=True)
    two_stage(hc, lc)
    rh, rl = report_of(hc), report_of(lc)
    assert rh["summary"]["steps"] == rl["summary"]["steps"] == 6
    assert computed(rh)[0] and computed(rl)[0]   # each expert starts from an empty cache
    assert rh["rows"][0]["sigma"] > rl["rows"][0]["sigma"]


def test_batch_of_two_with_offloaded_cache(fx):
    # Two latents per cond: each stream's chunk holds both; the cache lives on the CPU device.
    m = fixture_model("wan21")
    ref = sample(m, "wan21", batch=2)
    assert torch.equal(sample(teacache(m, 0.0, cache_device="cpu"), "wan21", batch=2), ref)
    cached = teacache(m, 1e9, cache_device="cpu")
    out = sample(cached, "wan21", batch=2)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert report_of(cached)["streams"] == {"cond": {"computed": 2, "skipped": 8},
                                            "uncond": {"computed": 2, "skipped": 8}}


def test_short_schedule_is_left_alone_by_default(fx, caplog):
    from comfyui_accel.nodes.cache import AccelCacheReport
    m = fixture_model("wan21")
    ref = sample(m, "wan21", steps=6)
    cached = teacache(m, 1e9)
    with caplog.at_level("WARNING"):
        out = sample(cached, "wan21", steps=6)
    assert torch.equal(out, ref)
    assert report_of(cached)["summary"]["status"] == "off"
    assert "6-step schedule" in caplog.text
    text, plot = AccelCacheReport.execute(cached, {"samples": out}).args
    assert "status: off" in text and "6-step schedule" in text and plot.shape[-1] == 3
    forced = teacache(m, 1e9, force_short=True)
    sample(forced, "wan21", steps=6)
    assert report_of(forced)["summary"]["reused"] == 4


# --- TaylorSeer --------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["blocks", "output"])
def test_taylor_schedule_and_interval_one_identity(fx, target):
    m = fixture_model("flux")
    ref = sample(m, "flux", steps=12)
    every = install(m, "taylorseer", target=target, interval=1, order=2, warmup_steps=1)
    assert torch.equal(sample(every, "flux", steps=12), ref)
    cached = install(m, "taylorseer", target=target, interval=3, order=1, warmup_steps=2)
    out = sample(cached, "flux", steps=12)
    # steps 0, 1 warm-up; then 2, 5, 8 full; 11 last
    assert computed(report_of(cached)) == [k in (0, 1, 2, 5, 8, 11) for k in range(12)]
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_taylor_memory_grows_with_order(fx):
    m = fixture_model("flux")
    peaks = []
    for order in (0, 1, 2):
        cached = install(m, "taylorseer", target="blocks", interval=3, order=order, warmup_steps=2)
        sample(cached, "flux", steps=12)
        peaks.append(report_of(cached)["summary"]["cache_peak_mb"])
    assert peaks[1] == pytest.approx(2 * peaks[0], rel=0.01) and peaks[2] == pytest.approx(3 * peaks[0], rel=0.01)


def test_unet_deep_blocks_share_weights_with_the_model(fx):
    # The DeepCache containers hold the model's own layers: a LoRA on a deep layer still acts,
    # whichever order the nodes come in, and the input model keeps no object patch.
    import comfy.lora
    import comfy.sd
    m = fixture_model("sdxl")
    keys = comfy.lora.model_lora_keys_unet(m.model, {})
    # a linear layer inside the deepest (cached) part: the middle block
    target = next(v for v in keys.values() if v.startswith("diffusion_model.middle_block.")
                  and m.get_model_object(v).ndim == 2)
    name = next(k for k, v in keys.items() if v == target)
    w = m.get_model_object(target)
    g = torch.Generator().manual_seed(0)
    lora = {f"{name}.lora_up.weight": torch.randn(w.shape[0], 4, generator=g) * 0.3,
            f"{name}.lora_down.weight": torch.randn(4, w.shape[1], generator=g) * 0.3}
    with_lora = comfy.sd.load_lora_for_models(m, None, lora, 1.0, 0)[0]
    ref = sample(with_lora, "sdxl")
    assert not torch.equal(ref, sample(m, "sdxl"))
    assert torch.equal(sample(teacache(with_lora, 0.0), "sdxl"), ref)
    assert torch.equal(sample(comfy.sd.load_lora_for_models(teacache(m, 0.0), None, lora, 1.0, 0)[0], "sdxl"), ref)
    assert not m.object_patches


@pytest.mark.parametrize("family", ["lumina2", "sd15"])
def test_taylor_model_output_works_without_block_hooks(fx, family):
    m = fixture_model(family)
    ref = sample(m, family)
    every = install(m, "taylorseer", target="output", interval=1, order=1)
    assert torch.equal(sample(every, family), ref)
    cached = install(m, "taylorseer", target="output", interval=4, order=1, warmup_steps=1)
    assert torch.isfinite(sample(cached, family)).all()
    assert report_of(cached)["summary"]["reused"] > 0


# --- Forecast Cache ------------------------------------------------------------------------------

def forecast(m, speedup: float, target: str = "blocks", verify: bool = True, **kw):
    return install(m, "forecast", target=target, order=1, speedup=speedup, verify=verify, **kw)


@pytest.mark.parametrize("family", HOOKED + ["lumina2"])
def test_forecast_cache_follows_its_plan_on_every_family(fx, family):
    m = fixture_model(family)
    target = "output" if family == "lumina2" else "blocks"   # Lumina 2 has no block hook
    ref = sample(m, family, steps=12)
    every = forecast(m, 1.0, target)
    assert torch.equal(sample(every, family, steps=12), ref)
    cached = forecast(m, 3.0, target)
    out = sample(cached, family, steps=12)
    report = report_of(cached)
    plan = rules.forecast_schedule(12, 4)
    assert report["summary"]["planned_steps"] == plan and report["summary"]["bound_speedup"] == 3.0
    assert computed(report) == [k in plan for k in range(12)]
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    for stream in report["streams"].values():
        assert stream["computed"] == 4 and len(stream["verified"]) == 2   # verified at the 3rd and 4th compute


def test_forecast_cache_forecasts_each_stream_linearly_along_the_noise_position(fx):
    # Model output, no verification: on a forecast step each cond's prediction must be the line
    # through its own last two computed velocities, at this step's noise position.
    import comfy.patcher_extension
    spied = fixture_model("wan21").clone()
    seen = []

    def spy(executor, x, t, *args, **kwargs):
        out = executor(x, t, *args, **kwargs)
        seen.append((float(t.flatten()[0]), x.detach().clone(), out.detach().clone()))
        return out

    # registered first: it runs outside the cache's wrapper
    spied.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.spy", spy)
    m = forecast(spied, 2.5, target="output", verify=False)
    sample(m, "wan21", steps=10)
    assert len(seen) == 10
    report = report_of(m)
    plan, positions = report["summary"]["planned_steps"], [r["position"] for r in report["rows"]]
    velocity = [(x - out) / sigma for sigma, x, out in seen]
    assert plan == [0, 3, 6, 9]
    checked = 0
    for k in range(10):
        if k in plan or k < 4:
            continue
        a, b = [j for j in plan if j < k][-2:]
        line = velocity[b] + (positions[k] - positions[b]) / (positions[b] - positions[a]) * (velocity[b] - velocity[a])
        assert torch.allclose(velocity[k], line, atol=1e-4)
        assert not torch.allclose(line[0], line[1], atol=1e-3)   # uncond and cond differ
        checked += 1
    assert checked == 4


def test_forecast_cache_batched_and_split_conds_agree(fx):
    m = fixture_model("wan21")
    batched, split = forecast(m, 3.0), forecast(m, 3.0)
    a = sample(batched, "wan21", tokens=(9, 9), steps=12)
    b = sample(split, "wan21", tokens=(7, 9), steps=12)
    ra, rb = report_of(batched), report_of(split)
    assert computed(ra) == computed(rb) and set(ra["streams"]) == set(rb["streams"]) == {"cond", "uncond"}
    # the same tokens padded differently give slightly different model outputs, never a different plan
    assert torch.isfinite(b).all() and a.shape == b.shape


def test_forecast_cache_stands_down_when_the_speedup_leaves_too_few_steps(fx, caplog):
    from comfyui_accel.nodes.cache import AccelCacheReport
    m = fixture_model("wan21")
    ref = sample(m, "wan21", steps=12)
    cached = forecast(m, 5.0)   # 12 / 5: 2 computed steps
    with caplog.at_level("WARNING"):
        out = sample(cached, "wan21", steps=12)
    assert torch.equal(out, ref)
    report = report_of(cached)
    assert report["summary"]["status"] == "off" and "leaves 2 computed step(s)" in report["warnings"][0]
    assert "at most 4x" in caplog.text
    text = AccelCacheReport.execute(cached, {"samples": out}).args[0]
    assert "status: off" in text and "leaves 2 computed" in text


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m"])
def test_forecast_cache_with_other_samplers(fx, sampler):
    m = fixture_model("flux")
    cached = forecast(m, 3.0)
    out = sample(cached, "flux", steps=12, sampler=sampler)
    report = report_of(cached)
    assert torch.isfinite(out).all() and report["summary"]["reused"] > 0
    done = {r["step"] for r in report["rows"] if r["decision"] == "compute"}
    plan = set(rules.forecast_schedule(12, 4))
    # Heun's corrector is its own stream, which computes until it has a value to forecast from
    assert done == plan if sampler == "dpmpp_2m" else plan <= done


def test_forecast_cache_node_and_its_report(fx):
    from comfyui_accel.nodes.cache import AccelCacheReport, AccelForecastCache
    from comfyui_accel.nodes.common import AccelInputError
    m = fixture_model("wan21")
    cached = AccelForecastCache.execute(m, 3.0, "auto", True, "model device", "skip caching").args[0]
    out = sample(cached, "wan21", steps=20)
    setup = engine.setup_of(cached)
    assert setup.settings.target == "output" and setup.settings.verify
    text, plot = AccelCacheReport.execute(cached, {"samples": out}).args
    assert "planned_steps" in text and "slope" in text and "bound_speedup: 3.333" in text and plot.shape[-1] == 3
    blocks = AccelForecastCache.execute(m, 2.0, "block residual", False, "cpu", "skip caching").args[0]
    sample(blocks, "wan21", steps=20)
    assert report_of(blocks)["summary"]["computed"] == 10
    with pytest.raises(AccelInputError, match="speedup"):
        AccelForecastCache.execute(m, 0.5, "auto", True, "model device", "skip caching")
    with pytest.raises(AccelInputError, match="block hook"):
        AccelForecastCache.execute(fixture_model("lumina2"), 2.0, "block residual", True, "model device", "skip caching")


# --- composition ---------------------------------------------------------------------------------

def _lora(m, strength=1.0):
    import comfy.lora
    import comfy.sd
    keys = comfy.lora.model_lora_keys_unet(m.model, {})
    target = "diffusion_model.blocks.0.self_attn.q"
    name = next(k for k, v in keys.items() if v == target + ".weight")
    w = m.get_model_object(target + ".weight")
    g = torch.Generator().manual_seed(0)
    lora = {f"{name}.lora_up.weight": torch.randn(w.shape[0], 4, generator=g) * 0.3,
            f"{name}.lora_down.weight": torch.randn(4, w.shape[1], generator=g) * 0.3}
    return comfy.sd.load_lora_for_models(m, None, lora, strength, 0)[0]


def test_lora_before_or_after_the_cache_gives_the_same_result(fx):
    m = fixture_model("wan21")
    a = sample(teacache(_lora(m), 0.4), "wan21")
    b_model = _lora(teacache(m, 0.4))
    b = sample(b_model, "wan21")
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(teacache(m, 0.4), "wan21"))   # the LoRA acts
    assert engine.setup_of(b_model).reports   # the report reaches the model the cache node made


@pytest.mark.slow
def test_torch_compile_in_either_order(fx):
    # ComfyUI's TorchCompileModel mechanism (an APPLY_MODEL wrapper swapping in the compiled
    # diffusion model), with the "eager" backend so no C compiler is needed.
    import comfy.patcher_extension
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY
    torch._dynamo.reset()
    m = fixture_model("wan21")
    plain = teacache(m, 0.4)
    ref = sample(plain, "wan21")
    compiled = m.clone()
    set_torch_compile_wrapper(compiled, backend="eager")
    cache_after = teacache(compiled, 0.4)              # compile node, then the cache node
    cache_first = teacache(m, 0.4)                     # the cache node, then compile (same compiled module)
    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    cache_first.add_wrapper_with_key(apply_model, COMPILE_KEY, compiled.get_wrappers(apply_model, COMPILE_KEY)[0])
    want = computed(report_of(plain))
    for cached in (cache_after, cache_first):
        out = sample(cached, "wan21")
        assert computed(report_of(cached)) == want
        assert torch.allclose(out, ref, atol=1e-4)


# --- the nodes -----------------------------------------------------------------------------------

@pytest.fixture
def output_dir(tmp_path, comfy):
    import folder_paths
    before = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    yield tmp_path
    folder_paths.set_output_directory(before)


def test_teacache_node_picks_published_coefficients_or_explains(fx):
    from comfyui_accel.nodes.cache import AccelTeaCache
    from comfyui_accel.nodes.common import AccelInputError
    args = dict(threshold=-1.0, start=0.0, end=1.0, coefficients="auto", cache_device="model device",
                short_schedule="skip caching")
    flux = AccelTeaCache.execute(fixture_model("flux"), **args).args[0]
    settings = engine.setup_of(flux).settings
    assert settings.preset == "flux" and settings.threshold == 0.4 and settings.signal == "modulated"
    with pytest.raises(AccelInputError, match="no published TeaCache coefficients.*Cache Calibrate"):
        AccelTeaCache.execute(fixture_model("wan22_5b"), **args)
    with pytest.raises(AccelInputError, match="'flux' is for flux models; this model is wan"):
        AccelTeaCache.execute(fixture_model("wan21"), **{**args, "coefficients": "flux"})
    with pytest.raises(AccelInputError, match="no block-replacement hook.*TaylorSeer"):
        AccelTeaCache.execute(fixture_model("lumina2"), **args)
    with pytest.raises(AccelInputError, match="start < end"):
        AccelTeaCache.execute(fixture_model("flux"), **{**args, "start": 0.5, "end": 0.5})


def test_calibrate_then_teacache_reaches_the_target(fx, output_dir):
    from lab.fixtures import empty_latent, make_conditioning
    from comfyui_accel.nodes.cache import AccelCacheCalibrate, AccelCacheReport, AccelTeaCache
    from comfyui_accel.cache.profile import CacheProfile
    m = fixture_model("wan22_5b")
    pos, neg = make_conditioning("wan22_5b", "tiny", seed=1), make_conditioning("wan22_5b", "tiny", seed=2)
    latent = empty_latent("wan22_5b", "tiny")
    run = dict(positive=pos, negative=neg, latent_image=latent, seed=0, steps=16, cfg=3.0, sampler_name="euler",
               scheduler="simple", denoise=1.0, start=0.0, end=1.0, signal="auto")
    profile, ref, text, plot = AccelCacheCalibrate.execute(m, target_speedup=2.0, **run).args
    assert len(profile.coefficients) == 5 and profile.predicted_speedup >= 2.0
    assert plot.shape[0] == 1 and plot.shape[-1] == 3 and "threshold" in text
    saved = sorted((output_dir / "accel_cache").glob("profile_wan_*.json"))
    assert len(saved) == 1 and CacheProfile.from_json(saved[0].read_text()).threshold == profile.threshold
    AccelCacheCalibrate.execute(m, target_speedup=2.5, **run)   # a second profile never overwrites the first
    assert len(list((output_dir / "accel_cache").glob("*.json"))) == 2

    cached = AccelTeaCache.execute(m, -1.0, 0.0, 1.0, "auto", "model device", "skip caching", profile=profile).args[0]
    out = sample(cached, "wan22_5b", steps=16, cfg=3.0)
    report = report_of(cached)
    # The replay predicts the live run: same schedule on the same seed, within one step.
    assert abs(report["summary"]["computed"] - sum(profile.replay)) <= 1
    text, image = AccelCacheReport.execute(cached, {"samples": out}).args
    assert f"computed: {report['summary']['computed']}" in text and image.shape[-1] == 3


def test_a_30_step_profile_holds_its_speedup_at_20_and_50_steps(fx, output_dir):
    # On the trained Wan reference (real trajectories): Cache Calibrate at 30 steps for 2x, then
    # TeaCache with the threshold on auto sets it for each run's own schedule.
    from lab.bench import bench_stack
    from comfyui_accel.nodes.cache import AccelTeaCache
    s30 = sampling.reference_subject("ref_wan21", 30)
    profile = bench_stack.calibrate(s30, s30.model, 2.0)
    assert profile.steps == 30 and profile.signal_rates

    def bound(steps, threshold):
        s = sampling.reference_subject("ref_wan21", steps)
        cached = AccelTeaCache.execute(s30.model, threshold, 0.0, 1.0, "auto", "model device", "skip caching",
                                       profile=profile).args[0]
        s.sample(cached)
        summary = report_of(cached)["summary"]
        assert summary["steps"] == steps
        return summary["bound_speedup"]

    per_run = {steps: bound(steps, -1.0) for steps in (20, 50)}
    for steps, speedup in per_run.items():
        assert abs(speedup - 2.0) <= 0.15 * 2.0, (steps, per_run)
    # The calibrated threshold as a fixed number lands further from 2x at 20 steps.
    assert abs(bound(20, profile.threshold) - 2.0) > abs(per_run[20] - 2.0)


def test_report_node_finds_the_run_of_its_latent(fx):
    from comfyui_accel.nodes.cache import AccelCacheReport
    from comfyui_accel.nodes.common import AccelInputError
    m = teacache(fixture_model("wan21"), 0.3)
    a = sample(m, "wan21", steps=10)
    b = sample(m, "wan21", steps=12)
    assert "steps: 10" in AccelCacheReport.execute(m, {"samples": a}).args[0]
    assert "steps: 12" in AccelCacheReport.execute(m, {"samples": b}).args[0]
    with pytest.raises(AccelInputError, match="no TeaCache, TaylorSeer or Forecast Cache"):
        AccelCacheReport.execute(fixture_model("wan21"), {"samples": a})


def test_forecast_cache_on_two_experts(fx):
    # KSamplerAdvanced pair (Wan 2.2's experts): an 8-step schedule leaves each expert 4 steps and
    # the node stands down, saying why; a 20-step one caches each expert on its own plan.
    high, low = fixture_model("wan21", 0), fixture_model("wan21", 1)

    def two_stage(h, lo, steps):
        x = sample(h, "wan21", steps=steps, start_step=0, last_step=steps // 2, seed=4)
        return sample(lo, "wan21", steps=steps, start_step=steps // 2, last_step=steps, latent=x,
                      disable_noise=True, seed=4)

    ref = two_stage(high, low, 8)
    hc, lc = forecast(high, 2.0), forecast(low, 2.0)
    assert torch.equal(two_stage(hc, lc, 8), ref)
    for cached in (hc, lc):
        report = report_of(cached)
        assert report["summary"]["status"] == "off"
        assert "4-step schedule (part of a longer one" in report["warnings"][0] and "dB" in report["warnings"][0]
    two_stage(hc, lc, 20)
    for cached in (hc, lc):
        summary = report_of(cached)["summary"]
        assert summary["status"] == "ok" and summary["steps"] == 10
        assert summary["planned_steps"] == rules.forecast_schedule(10, 5) and summary["computed"] == 5
