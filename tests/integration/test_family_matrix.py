"""Every diffusion family this ComfyUI ships through the four nodes: the family x node matrix.

Each family of ``lab.families`` (a tiny build from the host's own classes, seeded weights,
the conditioning its forward takes) goes through Quantize Model (int8), TeaCache, TaylorSeer and
Sparse Attention as ``lab.family_matrix`` describes; a node that cannot patch a family must
refuse it by name with what works instead. The run is written as Markdown and JSON under
``out/`` (``family_matrix_<ComfyUI version>``), and the README's matrix must agree with it.
Families this host lacks are skipped, by a check for their config class.
"""
from __future__ import annotations

import math

import pytest
import torch

from comfyui_accel import families as family_names
from lab import families, family_matrix, host

pytestmark = pytest.mark.integration

NAMES = [f.name for f in families.FAMILIES]
# W8A8 with per-channel weight and per-token activation scales keeps each layer near 40-50 dB
# SQNR; through a few blocks and 6 sampler steps of random (untrained) weights, which amplify
# any perturbation more than trained ones (Krea 2's build moves 100 dB from float rounding
# alone, the others 140-160 dB), the final latent stays above 31 dB in every family on both
# hosts. 28 dB leaves room for kernel changes and still fails a layer quantized wrongly.
INT8_FLOOR_DB = 28.0
# Lossy by design (their PSNR is the measurement), but a cache or a sparse plan that puts the
# wrong tokens back gives noise (10 dB or less against the reference).
CACHE_FLOOR_DB = 12.0
SPARSE_FLOOR_DB = 15.0


class Matrix:
    def __init__(self):
        self.families: dict[str, dict] = {}

    def complete(self) -> bool:
        return set(self.families) == set(NAMES)

    def run(self) -> dict:
        from comfyui_accel.compat import host_version
        return {"host": host_version(), "steps": families.STEPS, "families": self.families}


@pytest.fixture(scope="module")
def matrix(comfy):
    collected = Matrix()
    with host.in_process():   # tiny models: one thread, or two cores shared by others thrash
        yield collected
    families.build.cache_clear()
    if collected.complete():   # a partial run (-k) never overwrites the full one
        family_matrix.write(collected.run())


def test_every_supported_model_is_a_family_or_not_a_diffusion_model(comfy):
    assert families.uncovered() == []
    covered = families.covered_configs()
    assert not set(covered) & set(family_names.NOT_DIFFUSION)


@pytest.mark.parametrize("name", NAMES)
def test_family_through_every_node(matrix, name):
    fam = families.family(name)
    why = families.missing(fam)
    if why:
        matrix.families[name] = {"absent": why}
        pytest.skip(why)
    cells = family_matrix.measure(name)
    matrix.families[name] = {"cells": {k: c.to_json() for k, c in cells.items()}}
    model = families.build(name)
    dm = model.get_model_object("diffusion_model")
    described = family_names.describe(model)
    named = f"'model' is {family_names.a_model(model)}"
    from comfyui_accel.attention.layout import unsupported
    from comfyui_accel.cache.adapters import find_adapter
    hooked = find_adapter(dm) is not None

    if fam.full_size:   # built on the meta device: only the refusals can be checked
        assert cells["teacache"].status == "refused" and cells["sparse"].status == "refused"
        assert described in cells["teacache"].detail and described in cells["sparse"].detail
        return

    q = cells["quantize"]
    assert q.status == "measured" and q.checks["layers"] >= 5
    assert q.psnr > INT8_FLOOR_DB, f"int8 is {q.psnr:.1f} dB from the float model"

    t = cells["teacache"]
    if hooked:
        assert t.status == "measured"
        assert t.checks["identical_at_zero"] and t.checks["calibration_run_equals_uncached"]
        assert 0 < t.checks["computed"] < t.checks["evaluations"]   # it reused steps
        assert CACHE_FLOOR_DB < t.psnr < math.inf
    else:
        assert t.status == "refused" and t.checks["refused"]
        assert named in t.detail and "TaylorSeer" in t.detail

    s = cells["taylorseer"]
    assert s.status == "measured" and s.checks["identical_at_interval_1"]
    assert s.checks["target"] == ("blocks" if hooked else "output")
    assert 0 < s.checks["computed"] < s.checks["evaluations"]
    assert CACHE_FLOOR_DB < s.psnr < math.inf

    a = cells["sparse"]
    if unsupported(dm) is None:
        assert a.status == "measured" and a.checks["sparse_calls"] > 0
        assert a.checks["density_one_psnr"] > 100   # density 1 is dense attention up to float rounding
        assert SPARSE_FLOOR_DB < a.psnr
        placement = a.checks["placement"]
        if "skipped" not in placement:   # the layout put the moved pixel where the model has it
            for which in ("first", "last"):
                assert placement[which]["observed"] == placement[which]["expected"], which
    else:
        assert a.status == "refused" and a.checks["refused"]
        assert named in a.detail and "Quantize Model" in a.detail


# The module that takes the last joint block's image tokens, per family whose cache hook returns
# a text + image stream (AuraFlow modulates them with a plain function first: no module sees them).
FINAL_LAYERS = {"flux": "final_layer", "chroma": "final_layer", "hunyuan_video": "final_layer",
                "hunyuan_video15": "final_layer", "hunyuan_image21": "final_layer", "longcat": "final_layer",
                "flux2": "final_layer", "hunyuan3d": "final_layer"}


@pytest.mark.parametrize("name", list(FINAL_LAYERS))
def test_cache_takes_the_image_tokens_the_model_keeps(comfy, name):
    # The block cache stores the residual of the image tokens of the last block's joint stream;
    # they must be exactly what the model hands its final layer (the token order differs by
    # family and by host: HunyuanVideo put its text last up to ComfyUI 0.3.75).
    from comfyui_accel.cache import adapters, engine
    fam = families.family(name)
    if families.missing(fam):
        pytest.skip(families.missing(fam))
    model = families.build(name)
    dm = model.get_model_object("diffusion_model")
    adapter = adapters.find_adapter(dm)
    settings = engine.Settings(node="test", method="teacache", threshold=0.0, signal=adapter.signals()[0],
                               coefficients=(1.0, 0.0), force_short=True)
    cached = engine.install(model, settings, adapter, adapter.family)
    last = engine.setup_of(cached).keys[-1]
    hook = cached.model_options["transformer_options"]["patches_replace"]["dit"][last]
    taken, kept = [], []

    def spy(args, extra):
        out = hook(args, extra)
        taken.append((out["img"].detach().clone(), adapter.image_start(last, args)))
        return out

    cached.set_model_patch_replace(spy, "dit", *last)
    final = adapters.get_path(dm, FINAL_LAYERS[name])
    handle = final.register_forward_pre_hook(lambda mod, args: kept.append(args[0].detach().clone()))
    try:
        families.sample(cached, name, steps=2)
    finally:
        handle.remove()
    assert len(taken) == len(kept) == 2
    for (stream, start), image in zip(taken, kept):
        assert torch.equal(adapter.image_part(last, stream, image.shape[1], start), image)


NON_DIFFUSION_BUILDS = {"SAM3": {"image_model": "SAM3"}, "SAM31": {"image_model": "SAM31"},
                        "DepthAnything3": {"image_model": "DepthAnything3", "backbone_name": "vits"}}


@pytest.mark.parametrize("config", list(NON_DIFFUSION_BUILDS))
def test_nodes_refuse_models_that_are_not_diffusion_models(comfy, config):
    from comfyui_accel.nodes.attention import AccelSparseAttention
    from comfyui_accel.nodes.cache import AccelTaylorSeer, AccelTeaCache
    from comfyui_accel.nodes.common import AccelInputError, node_name
    from comfyui_accel.nodes.quant import AccelQuantizeModel
    model = families.build_not_diffusion(config, NON_DIFFUSION_BUILDS[config])
    if model is None:
        pytest.skip(f"ComfyUI {families._version()} has no {config}")
    calls = {
        AccelQuantizeModel: lambda: AccelQuantizeModel.execute(model, "int8", 64, "auto", 0.5, 8, 0, 5.0, "int8", 0.35,
                                                               0.0, ""),
        AccelTeaCache: lambda: AccelTeaCache.execute(model, -1.0, 0.0, 1.0, "auto", "model device", "skip caching"),
        AccelTaylorSeer: lambda: AccelTaylorSeer.execute(model, 3, 1, 1, 1.0, "auto", "model device", "skip caching"),
        AccelSparseAttention: lambda: AccelSparseAttention.execute(model, **family_matrix.SPARSE),
    }
    for cls, call in calls.items():
        with pytest.raises(AccelInputError) as e:
            call()
        message = str(e.value)
        assert message.startswith(f"{node_name(cls)}: input 'model' is {family_names.a_model(model)}")
        assert family_names.NOT_DIFFUSION[config] in message and "not a diffusion model" in message


def test_readme_matrix_matches_the_run(matrix):
    # Runs after the families (file order): the README's matrix lists every family, and each cell
    # this host measured has the status the README gives (the numbers may differ slightly).
    from comfyui_accel.compat import host_version
    readme = (family_matrix.ROOT / "README.md").read_text()
    block = family_matrix.readme_block(readme)
    rows = family_matrix.readme_rows(block)
    assert set(rows) == {f.title for f in families.FAMILIES}
    ran = {n: r for n, r in matrix.families.items()}
    if not ran:
        pytest.skip("no family ran in this session (select test_family_through_every_node too)")
    header = next(line for line in block.splitlines() if line.startswith("| Family"))
    columns = [c.strip() for c in header.strip().strip("|").split("|")][1:]
    version = host_version()
    main = f"Measured on ComfyUI {version} " in block
    old_column = f"ComfyUI {version}"
    assert main or old_column in columns, f"the README's matrix does not cover ComfyUI {version}"

    def kind(text):
        return "measured" if text.endswith(" dB") or text == "identical" else text

    for name, result in ran.items():
        fam = families.family(name)
        cells = rows[fam.title]
        if main:
            if "absent" in result:
                continue
            for i, key in enumerate(family_matrix.NODES):
                got, expected = cells[1 + i], family_matrix.cell_text(result["cells"][key])
                assert kind(got) == kind(expected), f"{fam.title}, {family_matrix.NODES[key]}: README {got!r}"
        else:   # an older host: its column says absent, as above, or which nodes differ
            got = cells[columns.index(old_column)]
            statuses = {} if "absent" in result else {key: c["status"] for key, c in result["cells"].items()}
            main_statuses = {key: kind(text) for key, text in zip(family_matrix.NODES, cells[1:])}
            expected = "absent" if "absent" in result else family_matrix.old_host_cell(
                {"cells": {k: {"status": v} for k, v in main_statuses.items()}}, {"cells": {
                    k: {"status": v} for k, v in statuses.items()}})
            assert got == expected, f"{fam.title} on ComfyUI {version}: README {got!r}, run {expected!r}"
