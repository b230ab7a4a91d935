"""The policies' block plans and the override's assembly of a sparse call (no ComfyUI)."""
import json

import pytest
import torch

from comfyui_accel.attention import geometry, policies
from comfyui_accel.attention.layout import ModelFacts, TokenGrid
from comfyui_accel import runs
from comfyui_accel.attention.sparse import ForwardInfo, SparseAttention, SparseConfig, SparseRun, row_logsumexp
from comfyui_accel.kernels.block_sparse_attention import block_mask

GEOMETRIC = ("radial", "sliding_tile", "svg", "draft")
ALL = GEOMETRIC + ("svg2",)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def problem(grid, density, bs=16, B=2, H=2, D=16, seed=0, probe=True):
    q, k, v = (rand(B, H, grid.tokens, D, seed=seed + i) for i in range(3))
    rows = torch.randperm(grid.tokens, generator=torch.Generator().manual_seed(seed))[:24] if probe else None
    return policies.Problem(q, k, v, grid, bs, density, D ** -0.5, probe=rows)


def token_mask_reference(plan, grid, n, bs, B, H):
    """The token-level mask a plan means, built one query/key at a time in the original order."""
    S = grid.tokens // bs
    o = grid.offset
    blocks = block_mask(plan.kv_indices, plan.kv_counts, S).expand(B, H, S, S)
    q_order, k_order = plan.q_order.expand(B, H, -1), plan.k_order.expand(B, H, -1)
    mask = torch.ones(B, H, n, n, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(S * bs):
                row = torch.ones(n, dtype=torch.bool)
                row[o:o + grid.tokens] = False
                for j in range(grid.tokens):
                    if j >= S * bs or blocks[b, h, i // bs, j // bs]:
                        row[o + k_order[b, h, j]] = True
                mask[b, h, o + q_order[b, h, i]] = row
    return mask


def masked_attention(q, k, v, mask):
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(torch.softmax(s.masked_fill(~mask, float("-inf")), -1), v)


@pytest.mark.parametrize("grid", [TokenGrid(4, 6, 7), TokenGrid(1, 9, 11), TokenGrid(5, 1, 30)])
def test_orders_are_permutations(grid):
    for order in (geometry.tile_order(grid, 16), geometry.spatial_major_order(grid), geometry.raster_order(grid)):
        assert torch.equal(order.sort().values, torch.arange(grid.tokens))
        assert torch.equal(order[geometry.inverse(order)], torch.arange(grid.tokens))


@pytest.mark.parametrize("policy", GEOMETRIC)
@pytest.mark.parametrize("density", [0.1, 0.3, 0.5])
def test_plan_has_the_requested_density(policy, density):
    p = problem(TokenGrid(6, 8, 10), density)   # 480 tokens, 30 blocks of 16
    plan = policies.plan(policy, p)
    S = 30
    keep = max(1, round(density * S))
    blocks = block_mask(plan.kv_indices, plan.kv_counts, S)
    assert torch.equal(blocks.sum(-1).to(torch.int32), plan.kv_counts)   # lists hold distinct blocks
    if policy == "draft":  # per-head budget, plus each row's best block
        assert (blocks.sum((-1, -2)) >= keep * S).all() and (blocks.sum((-1, -2)) <= keep * S + S).all()
    else:
        assert (plan.kv_counts == keep).all()
    d = policies.density_of(plan)
    assert (d >= keep / S - 1e-6).all() and (d <= keep / S + 1 / S + 1e-6).all()


def test_sliding_tile_keeps_the_nearest_tiles():
    grid = TokenGrid(6, 8, 8)
    p = problem(grid, 0.2)
    plan = policies.plan("sliding_tile", p)
    order = geometry.tile_order(grid, 16)
    centres = geometry.block_centres(grid, order, 16)
    tile = torch.tensor(geometry.tile_shape(grid, 16), dtype=torch.float)
    dist = ((centres[:, None] - centres[None]).abs() / tile).amax(-1)   # Chebyshev distance in tiles
    kept = block_mask(plan.kv_indices, plan.kv_counts, centres.shape[0])[0, 0]
    for i in range(centres.shape[0]):
        assert dist[i][kept[i]].max() <= dist[i][~kept[i]].min()
        assert kept[i, i]


def test_radial_reach_shrinks_with_frame_distance():
    grid = TokenGrid(16, 16, 16)   # tiles of 1 x 4 x 4 for blocks of 16: 16 frames of 4 x 4 tiles
    plan = policies.plan("radial", problem(grid, 0.5, B=1, H=1, probe=False))
    order = geometry.tile_order(grid, 16)
    centres = geometry.block_centres(grid, order, 16)
    kept = block_mask(plan.kv_indices, plan.kv_counts, centres.shape[0])[0, 0]
    dt = (centres[:, None, 0] - centres[None, :, 0]).abs()
    ds = (centres[:, None, 1:] - centres[None, :, 1:]).abs().amax(-1) / 4   # in tiles
    far_rows = 0
    for i in range(centres.shape[0]):
        reach = [ds[i][kept[i] & (dt[i] >= lo) & (dt[i] < hi)] for lo, hi in ((0, 2), (2, 4), (4, 8), (8, 16))]
        reach = [r.max().item() if r.numel() else -1 for r in reach]
        assert reach == sorted(reach, reverse=True)       # never reaches further at a larger frame distance
        far_rows += 0 <= reach[2] < reach[0]
    assert far_rows > centres.shape[0] // 2                # far frames are kept too, with a smaller reach


def test_svg_picks_the_pattern_each_head_follows():
    grid = TokenGrid(8, 4, 8)
    coords = geometry.grid_coords(grid).float()
    D = 16
    # Head 0: queries and keys agree on the frame (attention stays in the frame: spatial).
    # Head 1: they agree on the spatial position (attention follows it through time: temporal).
    frame = torch.nn.functional.one_hot(coords[:, 0].long(), D).float() * 8
    place = torch.nn.functional.one_hot((coords[:, 1] * 8 + coords[:, 2]).long() % D, D).float() * 8
    q = torch.stack([frame, place])[None] + 0.01 * rand(1, 2, grid.tokens, D)
    p = policies.Problem(q, q.clone(), rand(1, 2, grid.tokens, D, seed=3), grid, 16, 0.2, D ** -0.5,
                         probe=torch.arange(0, grid.tokens, 5))
    plan = policies.plan("svg", p)
    assert plan.pattern.tolist() == [[policies.SPATIAL, policies.TEMPORAL]]
    assert torch.equal(plan.q_order[0, 1], geometry.spatial_major_order(grid))


def test_draft_keeps_the_blocks_that_hold_the_mass():
    grid = TokenGrid(1, 8, 16)   # 8 blocks of 16
    order = geometry.tile_order(grid, 16)
    D = 16
    # Block b's queries and the keys of block (3 b + 1) % 8 share a strong direction.
    q = torch.zeros(grid.tokens, D)
    k = torch.zeros(grid.tokens, D)
    for b in range(8):
        q[order[b * 16:(b + 1) * 16], b] = 6.0
        k[order[((3 * b + 1) % 8) * 16:((3 * b + 1) % 8 + 1) * 16], b] = 6.0
    q, k = q[None, None] + 0.01 * rand(1, 1, grid.tokens, D), k[None, None]
    plan = policies.plan("draft", policies.Problem(q, k, k, grid, 16, 0.125, D ** -0.5))
    kept = block_mask(plan.kv_indices, plan.kv_counts, 8)[0, 0]
    for b in range(8):
        assert kept[b, (3 * b + 1) % 8]


@pytest.mark.parametrize("policy", ALL)
def test_sparse_call_matches_the_token_mask_and_keeps_text_dense(policy):
    """Grid tokens reordered, the kernel on the full grid blocks, text prefix/suffix and the grid
    tail dense: the result equals attention under the token mask the plan stands for."""
    grid = TokenGrid(3, 5, 7, offset=9)          # 105 grid tokens (6 full blocks + 9), 9 text in front
    n, B, H, D, bs = 9 + 105 + 4, 2, 2, 16, 16   # and 4 more after
    q, k, v = (rand(B, H, n, D, seed=10 + i) for i in range(3))
    grid_part = (t[:, :, 9:114] for t in (q, k, v))
    p = policies.Problem(*grid_part, grid, bs, 0.35, D ** -0.5, probe=torch.arange(0, 105, 4))
    plan = policies.plan(policy, p)
    patch = SparseAttention(SparseConfig(policy=policy, density=0.35, block_size=bs, min_tokens=0))
    got, _ = patch._attend(q, k, v, plan, grid, D ** -0.5)
    want = masked_attention(q, k, v, token_mask_reference(plan, grid, n, bs, B, H))
    assert torch.allclose(got, want, atol=1e-5)
    dense = masked_attention(q, k, v, torch.ones(n, n, dtype=torch.bool))
    text_rows = torch.cat([torch.arange(9), torch.arange(114, n)])
    assert torch.allclose(got[:, :, text_rows], dense[:, :, text_rows], atol=1e-5)


@pytest.mark.parametrize("policy", ALL)
def test_density_one_is_dense_attention(policy):
    grid = TokenGrid(2, 6, 8, offset=5)
    n, D = 5 + 96, 16
    q, k, v = (rand(1, 2, n, D, seed=20 + i) for i in range(3))
    plan = policies.plan(policy, policies.Problem(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], grid, 16, 1.0, D ** -0.5,
                                                  probe=torch.arange(10)))
    assert (policies.density_of(plan) == 1).all()
    got, _ = SparseAttention(SparseConfig(block_size=16))._attend(q, k, v, plan, grid, D ** -0.5)
    assert torch.allclose(got, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_svg2_clusters_tokens_and_keeps_the_budget_or_the_top_p_mass():
    grid = TokenGrid(2, 8, 8)                     # 8 blocks of 16
    D = 16
    # Four well separated groups of keys, scattered over the grid; each query looks for one group.
    group = torch.randperm(grid.tokens, generator=torch.Generator().manual_seed(0)) % 4
    centres = 10 * torch.eye(D)[:4]
    k = (centres[group] + 0.1 * rand(grid.tokens, D))[None, None]
    q = (centres[group.roll(7)] + 0.1 * rand(grid.tokens, D, seed=1))[None, None]
    p = policies.Problem(q, k, rand(1, 1, grid.tokens, D, seed=2), grid, 16, 0.5, 1.0, top_p=1.0)
    plan = policies.plan("svg2", p)
    # Orders are permutations that make each key cluster contiguous.
    for order in (plan.q_order[0, 0], plan.k_order[0, 0]):
        assert torch.equal(order.sort().values, torch.arange(grid.tokens))
    sorted_groups = group[plan.k_order[0, 0]]
    # 8 key clusters (one per block) over 4 groups: at most 8 runs of one group each.
    assert (sorted_groups[1:] != sorted_groups[:-1]).sum() <= 7
    assert (plan.kv_counts == 4).all()             # top_p = 1: the whole budget (half of 8 blocks)
    # With top_p, a query block whose group fills two key blocks keeps about those two.
    p.top_p = 0.9
    p.state.clear()
    tight = policies.plan("svg2", p)
    assert (tight.kv_counts <= 4).all() and tight.kv_counts.float().mean() < 3.5


def test_svg2_reuses_its_centroids_between_refreshes():
    grid = TokenGrid(2, 8, 8)
    p = problem(grid, 0.5, B=1, H=2, probe=False)
    policies.plan("svg2", p)
    first = {key: value["centroids"].clone() for key, value in p.state.items()}
    assert set(first) == {"svg2_q", "svg2_k"}
    p.step = policies.KMEANS_REFRESH_STEPS - 1
    p.q = p.q + 0.5 * rand(*p.q.shape, seed=42)
    policies.plan("svg2", p)
    assert all(torch.equal(p.state[key]["centroids"], first[key]) for key in first)   # only assigned
    p.step = policies.KMEANS_REFRESH_STEPS
    policies.plan("svg2", p)
    assert not torch.equal(p.state["svg2_q"]["centroids"], first["svg2_q"])           # refreshed


def test_take_and_put_round_trip_per_head_orders():
    from comfyui_accel.attention.sparse import _put, _take
    x = rand(2, 3, 20, 4)
    order = torch.stack([torch.stack([torch.randperm(20, generator=torch.Generator().manual_seed(b * 3 + h))
                                      for h in range(3)]) for b in range(2)])
    taken = _take(x, order)
    assert torch.equal(taken[1, 2], x[1, 2, order[1, 2]])
    assert torch.equal(_put(taken, order), x)
    shared = order[:1, :1]
    assert torch.equal(_put(_take(x, shared), shared), x)


# --- the override on its own (a stand-in dense function instead of ComfyUI's) -----------------

def dense_backend(calls):
    def func(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
             **kwargs):
        calls.append(kwargs.get("transformer_options"))
        if not skip_reshape:
            B, N, HD = q.shape
            q, k, v = (t.view(B, -1, heads, HD // heads).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if skip_output_reshape:
            return out
        return out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[3])
    return func


def call(patch, q, k, v, heads, fwd, **kw):
    options = {patch.key: fwd, patch.run_key: patch.run, "cond_or_uncond": [0]}
    return patch(kw.pop("func"), q, k, v, heads, transformer_options=options, **kw)


def setup_patch(**config):
    patch = SparseAttention(SparseConfig(**{"block_size": 16, "min_tokens": 0, "dense_first_layers": 0, **config}))
    patch.run = SparseRun()
    return patch


def test_override_both_layouts_and_the_report():
    grid = TokenGrid(4, 4, 8)
    fwd = ForwardInfo(ModelFacts("test", grid, 2), step=3, layers=2)
    patch = setup_patch(policy="sliding_tile", density=0.5, dense_steps=1)
    calls = []
    q, k, v = (rand(1, 2, 128, 32, seed=i) for i in range(3))
    out4 = call(patch, q, k, v, 2, fwd, func=dense_backend(calls), skip_reshape=True, skip_output_reshape=True)
    flat = [t.transpose(1, 2).reshape(1, 128, 64) for t in (q, k, v)]
    out3 = call(patch, *flat, 2, fwd, func=dense_backend(calls))
    assert not calls                                   # both calls went sparse
    assert out3.shape == (1, 128, 64) and out4.shape == (1, 2, 128, 32)
    assert torch.allclose(out3, out4.transpose(1, 2).reshape(1, 128, 64), atol=1e-6)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(out4, dense, atol=1e-3)   # really sparse
    report = patch.run.report.build({}, [])
    assert report["summary"]["sparse_calls"] == 2
    assert [r["layer"] for r in report["rows"]] == [0, 0, 1, 1]
    assert all(abs(r["density"] - 0.5) < 1e-6 and r["rel_error"] > 0 for r in report["rows"])


def test_override_dense_cases_go_to_the_chained_function(caplog):
    grid = TokenGrid(2, 4, 8)
    patch = setup_patch(dense_steps=2, dense_first_layers=1, dense_last_layers=1)
    calls = []
    func = dense_backend(calls)
    q = rand(1, 2, 64, 16)
    warm = ForwardInfo(ModelFacts("test", grid, 4), step=1, layers=4)
    call(patch, q, q, q, 2, warm, func=func, skip_reshape=True, skip_output_reshape=True)   # warm-up step
    fwd = ForwardInfo(ModelFacts("test", grid, 4), step=2, layers=4)
    call(patch, q, q, q, 2, fwd, func=func, skip_reshape=True, skip_output_reshape=True)    # first layer
    call(patch, q, rand(1, 2, 10, 16), rand(1, 2, 10, 16), 2, fwd, func=func, skip_reshape=True,
         skip_output_reshape=True)                                                           # cross-attention
    call(patch, q, q, q, 2, fwd, func=func, skip_reshape=True, skip_output_reshape=True,
         mask=torch.zeros(1, 1, 64, 64))                                                     # masked (layer 1)
    call(patch, q, q, q, 2, fwd, func=func, skip_reshape=True, skip_output_reshape=True)    # layer 2: sparse
    call(patch, q, q, q, 2, fwd, func=func, skip_reshape=True, skip_output_reshape=True)    # last layer
    call(patch, q, rand(1, 1, 64, 16), rand(1, 1, 64, 16), 2, fwd, func=func, skip_reshape=True,
         skip_output_reshape=True)                                                           # grouped-query
    assert len(calls) == 6
    reasons = patch.run.report.dense_reasons
    assert reasons == {"warmup": 1, "dense_layer": 2, "cross_attention": 1, "mask": 1, "gqa": 1}
    assert patch.run.report.sparse_calls == 1
    with caplog.at_level("INFO"):
        for _ in range(3):
            call(patch, q, rand(1, 2, 10, 16), rand(1, 2, 10, 16), 2, fwd, func=func, skip_reshape=True,
                 skip_output_reshape=True)
    assert not [r for r in caplog.records if "cross-attention" in r.getMessage()]   # logged once, before


def test_override_chains_an_existing_override():
    seen = []

    def previous(func, q, k, v, heads, **kw):
        seen.append(heads)
        return func(q, k, v, heads, **kw)

    patch = SparseAttention(SparseConfig(block_size=16), previous=previous)
    q = rand(1, 8, 64)
    out = patch(dense_backend([]), q, q, q, 2, transformer_options={})   # outside a run: dense via previous
    assert seen == [2] and out.shape == (1, 8, 64)


def test_retention_keeps_ratio_and_residual_of_the_dense_step():
    grid = TokenGrid(2, 4, 8)
    patch = setup_patch(policy="radial", density=0.5, dense_steps=1, retention=True, probe_rows=0)
    q, k, v = (rand(1, 2, 64, 16, seed=i) for i in range(3))
    q2 = q + 0.3 * rand(1, 2, 64, 16, seed=9)
    dense_step = ForwardInfo(ModelFacts("t", grid, 1), 0, 1)
    call(patch, q, k, v, 2, dense_step, func=dense_backend([]), skip_reshape=True, skip_output_reshape=True)
    plan = policies.plan("radial", policies.Problem(q, k, v, grid, 16, 0.5, 0.25))
    mask = token_mask_reference(plan, grid, 64, 16, 1, 2)
    s = torch.matmul(q, k.transpose(-1, -2)) * 0.25
    share = torch.exp(torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1) - torch.logsumexp(s, -1))
    dense = masked_attention(q, k, v, torch.ones(64, 64, dtype=torch.bool))
    residual = dense - masked_attention(q, k, v, mask) * share[..., None]
    assert (share < 0.999).any()
    # The same inputs on a sparse step give back the dense output exactly ...
    same = call(patch, q, k, v, 2, ForwardInfo(ModelFacts("t", grid, 1), 1, 1), func=dense_backend([]),
                skip_reshape=True, skip_output_reshape=True)
    assert torch.allclose(same, dense, atol=1e-5)
    # ... and new queries are corrected with the statistics kept from it.
    moved = call(patch, q2, k, v, 2, ForwardInfo(ModelFacts("t", grid, 1), 2, 1), func=dense_backend([]),
                 skip_reshape=True, skip_output_reshape=True)
    assert torch.allclose(moved, masked_attention(q2, k, v, mask) * share[..., None] + residual, atol=1e-5)


def test_row_logsumexp_in_chunks(monkeypatch):
    import comfyui_accel.attention.sparse as sparse_module
    monkeypatch.setattr(sparse_module, "LSE_CHUNK_BYTES", 512)
    q, k = rand(2, 2, 50, 8), rand(2, 2, 50, 8, seed=1)
    want = torch.logsumexp(torch.matmul(q, k.transpose(-1, -2)) * 0.3, -1)
    assert torch.allclose(row_logsumexp(q, k, 0.3), want, atol=1e-5)


def test_config_errors_name_the_input():
    for bad, name in ((dict(density=0.0), "density"), (dict(density=1.5), "density"),
                      (dict(block_size=48), "block_size"),
                      (dict(policy="nope"), "policy"), (dict(policy="svg", probe_rows=0), "probe_rows")):
        problems = SparseConfig(**bad).problems()
        assert [n for n, _ in problems] == [name]
        with pytest.raises(ValueError, match=name):
            SparseAttention(SparseConfig(**bad))


def test_step_index():
    # The patch locates steps with the cache's locator (runs.step_index), on the run's schedule.
    schedule = torch.tensor([14.6, 5.0, 1.2, 0.3, 0.0]).tolist()
    assert runs.step_index(14.6, schedule) == 0
    assert runs.step_index(1.2, schedule) == 2
    assert runs.step_index(0.8, schedule) == 2   # an intermediate sigma belongs to the step it lies in
    assert runs.step_index(1.0, []) == 0


def test_grid_placement():
    assert TokenGrid(2, 3, 4, offset=None).placed(30) == TokenGrid(2, 3, 4, 6)
    assert TokenGrid(2, 3, 4, offset=3).placed(26) is None
    assert TokenGrid(2, 3, 4, offset=0).placed(10) is None


def test_a_run_that_never_reaches_the_override_says_so(tmp_path):
    patch = SparseAttention(SparseConfig(), report_dir=str(tmp_path))
    patch.finish(SparseRun(), "ok", None)
    assert any("cannot be patched" in n for n in patch.last_report["notices"])
    assert patch.last_report["summary"]["sparse_calls"] == 0
    # Reports are saved as new numbered files, never over an existing one, as strict JSON.
    (tmp_path / "accel_sparse_attention_00002_.json").write_text("user file")
    patch.finish(SparseRun(), "ok", None)
    patch.finish(SparseRun(), "ok", None)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["accel_sparse_attention_00001_.json", "accel_sparse_attention_00002_.json",
                     "accel_sparse_attention_00003_.json", "accel_sparse_attention_00004_.json"]
    assert (tmp_path / "accel_sparse_attention_00002_.json").read_text() == "user file"
    text = (tmp_path / "accel_sparse_attention_00003_.json").read_text()
    assert "NaN" not in text and json.loads(text)["summary"]["sparse_calls"] == 0


def fake_model(class_name, **attrs):
    return type(class_name, (), attrs)()


def test_model_facts_per_family():
    from comfyui_accel.attention.layout import model_facts
    wan = fake_model("WanModel", patch_size=(1, 2, 2), ref_conv=object(), blocks=[0] * 4)
    extra = {"reference_latent": torch.zeros(1, 16, 30, 52), "time_dim_concat": torch.zeros(1, 16, 2, 30, 52)}
    facts = model_facts(wan, (2, 16, 5, 30, 52), (2, 512, 4096), extra)
    assert facts.grid == TokenGrid(7, 15, 26, 15 * 26) and facts.layers == 4   # reference image first
    flipped = fake_model("DoubleStreamBlock", flipped_img_txt=True)
    hunyuan = fake_model("HunyuanVideo", patch_size=[1, 2, 2], double_blocks=[flipped] * 2, single_blocks=[0] * 3)
    facts = model_facts(hunyuan, (1, 16, 9, 20, 24), (1, 77, 4096), {})
    assert facts.grid == TokenGrid(9, 10, 12, 0) and facts.layers == 5        # text after the video (0.3.75)
    hunyuan = fake_model("HunyuanVideo", patch_size=[1, 2, 2], double_blocks=[object()] * 2, single_blocks=[0])
    facts = model_facts(hunyuan, (1, 16, 9, 20, 24), (1, 77, 4096), {})
    assert facts.grid == TokenGrid(9, 10, 12, None)                           # text (and byT5...) first
    flux = fake_model("Flux", patch_size=2, double_blocks=[0], single_blocks=[0] * 2)
    facts = model_facts(flux, (1, 16, 33, 40), (1, 512, 4096), {})
    assert facts.grid == TokenGrid(1, 17, 20, 512) and facts.layers == 3      # text first, odd size padded
    ltxv = fake_model("LTXVModel", transformer_blocks=[0] * 6)
    assert model_facts(ltxv, (1, 128, 4, 16, 24), (1, 128, 4096), {}).grid == TokenGrid(4, 16, 24, 0)
    unet = model_facts(fake_model("UNetModel", channel_mult=(1, 2, 4)), (1, 4, 64, 64), (1, 77, 768), {})
    assert unet.grid == TokenGrid(1, 64, 64, 0, True) and unet.levels == 3
    assert [unet.place(n) for n in (4096, 1024, 256, 64, 4096 + 77)] == [
        TokenGrid(1, 64, 64, 0, True), TokenGrid(1, 32, 32, 0, True), TokenGrid(1, 16, 16, 0, True), None, None]
    av = model_facts(fake_model("LTXAVModel", transformer_blocks=[0]), (1, 9000), (1, 8, 4096),
                     {"latent_shapes": [(1, 128, 2, 4, 4), (1, 8, 5, 16)]})
    assert av.grid == TokenGrid(2, 4, 4, 0, True) and av.place(33) is None    # the packed video stream
    other = model_facts(fake_model("SomeNewDiT"), (1, 4, 64, 64), (1, 77, 768), {})
    assert other.grid == TokenGrid(1, 64, 64, None) and other.layers is None
