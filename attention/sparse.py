"""The sparse-attention patch: an ``optimized_attention_override`` plus two wrappers.

``apply_sparse_attention(model, config)`` returns a clone of a ComfyUI ModelPatcher with:
- ``transformer_options["optimized_attention_override"]`` = a :class:`SparseAttention`,
  which chains the override that was there before (called for every dense attention);
- an OUTER_SAMPLE wrapper (``runs.RunOwner``) that makes the per-run state (statistics for the
  Re-ttention correction, k-means centroids, the report) and saves the report at the end;
- an APPLY_MODEL wrapper that, for every model call, reads where the latent grid sits in the
  attention sequence (``layout.model_facts``) and the sampling step, and hands both to the
  attention calls of that forward through ``transformer_options``.

Per self-attention call over the grid: dense while warming up, in the first/last layers,
below ``min_tokens`` or when the grid is too small for two blocks; otherwise the policy plans
the blocks, the grid tokens are reordered, the block-sparse kernel runs on the grid rows and
every other row (text, tails) attends densely, and the output is put back in order. Cross,
masked and grouped-query attention go to the original function with a notice logged once.
Nothing here imports ComfyUI at module level.
"""
from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import files, runs
from ..kernels.block_sparse_attention import block_sparse_attention
from . import policies
from .layout import ModelFacts, model_facts
from .policies import Plan, Problem
from .report import RunReport

log = logging.getLogger(__name__)

BLOCK_SIZES = (16, 32, 64, 128)
# Query rows sampled per call for svg's profiling and for the error in the report.
DEFAULT_PROBE_ROWS = 32
# Memory for one chunk of scores when computing full-attention log-sum-exps.
LSE_CHUNK_BYTES = 64 << 20
REPORT_STEM = "accel_sparse_attention"   # saved reports: REPORT_STEM_00001_.json, ...


@dataclass
class SparseConfig:
    policy: str = "radial"
    density: float = 0.25
    block_size: int = 128
    top_p: float = 1.0
    dense_steps: int = 1
    dense_first_layers: int = 1
    dense_last_layers: int = 0
    min_tokens: int = 4096
    retention: bool = False
    probe_rows: int = DEFAULT_PROBE_ROWS

    def problems(self) -> list[tuple[str, str]]:
        """(input, what is wrong) for every setting out of range."""
        bad = []
        if self.policy not in policies.POLICIES:
            bad.append(("policy", f"must be one of {', '.join(policies.POLICIES)}, got {self.policy!r}"))
        if not (isinstance(self.density, (int, float)) and 0.0 < self.density <= 1.0):
            bad.append(("density", f"must be in (0, 1] (the fraction of key blocks kept), got {self.density}"))
        if self.block_size not in BLOCK_SIZES:
            bad.append(("block_size", f"must be one of {BLOCK_SIZES}, got {self.block_size}"))
        if not 0.0 < self.top_p <= 1.0:
            bad.append(("top_p", f"must be in (0, 1], got {self.top_p}"))
        for name in ("dense_steps", "dense_first_layers", "dense_last_layers", "min_tokens", "probe_rows"):
            if getattr(self, name) < 0:
                bad.append((name, f"must be 0 or more, got {getattr(self, name)}"))
        if self.policy == "svg" and self.probe_rows < 1:
            bad.append(("probe_rows", "must be at least 1 for svg, which picks each head's pattern on sampled rows"))
        return bad

    def validate(self) -> None:
        bad = self.problems()
        if bad:
            raise ValueError("; ".join(f"{name} {msg}" for name, msg in bad))


class ForwardInfo:
    """One model call: where the grid is, the step, and a counter of grid self-attention calls."""

    def __init__(self, facts: ModelFacts, step: int, layers: int | None):
        self.facts, self.step, self.layers = facts, step, layers
        self.calls = 0

    def next_layer(self) -> int:
        self.calls += 1
        return self.calls - 1


class SparseRun:
    """State of one sampling run: dropped when it ends."""

    def __init__(self, schedule: list[float] | tuple = ()):
        self.schedule = schedule
        self.report = RunReport()
        self.layer_counts: dict[str, int] = {}   # family -> grid self-attention calls per forward
        self.static_plans: dict[tuple, Plan] = {}
        self.memory: dict[tuple, dict] = {}       # (layer, branch) -> svg2 centroids, Re-ttention ratios
        self.notices: list[str] = []
        self.generator = torch.Generator().manual_seed(0)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D] reordered along N by index [B|1, H|1, N]."""
    if index.shape[0] == 1 and index.shape[1] == 1:
        return x.index_select(2, index[0, 0])
    B, H, N, D = x.shape
    return torch.gather(x, 2, index.expand(B, H, -1)[..., None].expand(-1, -1, -1, D))


def _put(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_take`: out[..., index[i], :] = x[..., i, :]."""
    out = torch.empty_like(x)
    if index.shape[0] == 1 and index.shape[1] == 1:
        return out.index_copy_(2, index[0, 0], x)
    B, H, N, D = x.shape
    return out.scatter_(2, index.expand(B, H, -1)[..., None].expand(-1, -1, -1, D), x)


def _dense_sdpa(q, k, v, scale):
    if q.device.type == "cpu" and q.dtype == torch.float16:  # fp16 matmuls crawl on the CPU
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def row_logsumexp(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Log-sum-exp over all keys of every query row, [B, H, N] fp32, in chunks of rows."""
    B, H, N, _ = q.shape
    rows = max(1, LSE_CHUNK_BYTES // max(1, 4 * B * H * k.shape[2]))
    kt = k.float().transpose(-1, -2)
    return torch.cat([torch.logsumexp(torch.matmul(q[:, :, i:i + rows].float(), kt) * scale, -1)
                      for i in range(0, N, rows)], dim=2)


class SparseAttention(runs.RunOwner):
    """The override callable and the run's wrappers."""

    def __init__(self, config: SparseConfig, previous=None, report_dir: str | None = None):
        config.validate()
        super().__init__(f"accel_sparse_attention_{uuid.uuid4().hex[:12]}")
        self.config = config
        self.previous = previous
        self.report_dir = report_dir
        self.last_report_path = None
        self._logged: set[str] = set()

    @property
    def last_report(self) -> dict | None:
        return self.history.latest()

    def _notice(self, run: SparseRun | None, message: str) -> None:
        if run is not None and message not in run.notices:
            run.notices.append(message)
        if message not in self._logged:
            self._logged.add(message)
            log.info("Sparse attention: %s", message)

    # --- wrappers -------------------------------------------------------------------------

    def start(self, guider, schedule: list[float]) -> SparseRun:
        run = SparseRun(schedule)
        options = getattr(guider, "model_options", {}).get("transformer_options", {})
        if not any(o is self for o in _chain(options.get("optimized_attention_override"))):
            self._notice(run, "another node replaced the attention override after this one without chaining "
                              "it; attention stays dense for this run")
        return run

    def apply_model(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        run = self.run_of(transformer_options)
        if run is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        diffusion_model = getattr(executor.class_obj, "diffusion_model", None)
        try:
            facts = model_facts(diffusion_model, tuple(x.shape),
                                None if c_crossattn is None else tuple(c_crossattn.shape), kwargs)
        except Exception as e:  # a latent we cannot read as a grid: this call stays dense
            self._notice(run, f"could not read the token grid of this model ({type(e).__name__}: {e}); dense")
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        step = runs.step_index(float(torch.as_tensor(t).max()), run.schedule)
        fwd = ForwardInfo(facts, step, facts.layers or run.layer_counts.get(facts.family))
        options = dict(transformer_options)
        options[self.key] = fwd
        try:
            return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        finally:
            if fwd.calls:
                run.layer_counts[facts.family] = fwd.calls

    def finish(self, run: SparseRun, status: str, output) -> None:
        c = self.config
        settings = {"policy": c.policy, "density_requested": c.density, "block_size": c.block_size,
                    "top_p": c.top_p, "dense_steps": c.dense_steps, "dense_first_layers": c.dense_first_layers,
                    "dense_last_layers": c.dense_last_layers, "min_tokens": c.min_tokens,
                    "retention": c.retention}
        if run.report.sparse_calls == 0 and not run.report.dense_reasons:
            self._notice(run, "no self-attention call over the latent grid reached the override: this model's "
                              "attention cannot be patched this way, so it ran unchanged (dense)")
        report = run.report.build(settings, run.notices)
        self.history.add(report, output)
        s = report["summary"]
        if self.report_dir:
            try:
                self.last_report_path = files.write_json(self.report_dir, REPORT_STEM, report)
            except OSError as e:
                log.warning("Sparse attention: could not save the report in %s: %s", self.report_dir, e)
        log.info("Sparse attention (%s): %d sparse / %d dense attention calls, mean density %s, mean error "
                 "vs dense %s%s", c.policy, s["sparse_calls"], s["dense_calls"], _fmt(s["mean_density"]),
                 _fmt(s["mean_rel_error"]), f", report {self.last_report_path}" if self.last_report_path else "")

    # --- the override ---------------------------------------------------------------------

    def __call__(self, func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        def dense():
            if self.previous is not None:
                return self.previous(func, q, k, v, heads, mask=mask, attn_precision=attn_precision,
                                     skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape, **kwargs)
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)

        run = self.run_of(kwargs.get("transformer_options"))
        fwd = (kwargs.get("transformer_options") or {}).get(self.key)
        if run is None or fwd is None:
            return dense()
        n_q, n_k = (q.shape[2], k.shape[2]) if skip_reshape else (q.shape[1], k.shape[1])
        if n_q != n_k:
            self._notice(run, "cross-attention (queries and keys of different lengths) stays dense")
            run.report.dense("cross_attention")
            return dense()
        grid = fwd.facts.place(n_q)
        if grid is None:
            run.report.dense("no_grid")  # text encoders, token refiners: not the latent stack
            return dense()
        run.report.layout(fwd.facts.family, grid, n_q)
        layer = fwd.next_layer()
        reason = self._dense_reason(run, fwd, layer, q, k, mask, kwargs, skip_reshape, heads, grid)
        if reason is not None:
            run.report.dense(reason)
            out = dense()
            if reason == "warmup" and self.config.retention:
                self._record_statistics(run, fwd, layer, q, k, v, heads, skip_reshape, grid, kwargs, out)
            return out
        try:
            out = self._sparse(run, fwd, layer, q, k, v, heads, skip_reshape, grid, kwargs)
        except Exception as e:  # never let a sparse-path failure take the sampling down
            self._notice(run, f"sparse attention failed and fell back to dense ({type(e).__name__}: {e})")
            log.debug("sparse attention failure", exc_info=True)
            run.report.dense("error")
            return dense()
        if skip_output_reshape:
            return out
        B, H, N, D = out.shape
        return out.transpose(1, 2).reshape(B, N, H * D)

    def _dense_reason(self, run, fwd, layer, q, k, mask, kwargs, skip_reshape, heads, grid) -> str | None:
        c = self.config
        if mask is not None:
            self._notice(run, "masked attention stays dense")
            return "mask"
        gqa = kwargs.get("enable_gqa") or (k.shape[1] != q.shape[1] if skip_reshape else k.shape[-1] != q.shape[-1])
        if gqa:
            self._notice(run, "grouped-query attention stays dense")
            return "gqa"
        n = q.shape[2] if skip_reshape else q.shape[1]
        if n < c.min_tokens:
            return "short_sequence"
        if grid.tokens // c.block_size < 2:
            self._notice(run, f"a grid of {grid.tokens} tokens is under two blocks of {c.block_size}: dense")
            return "small_grid"
        if fwd.step < c.dense_steps:
            return "warmup"
        if layer < c.dense_first_layers:
            return "dense_layer"
        if c.dense_last_layers:
            if fwd.layers is None:
                self._notice(run, "the layer count is learned on the first model call, which stays dense")
                return "dense_layer"
            if layer >= fwd.layers - c.dense_last_layers:
                return "dense_layer"
        return None

    # --- the sparse path ------------------------------------------------------------------

    def _planned(self, run, fwd, layer, q, k, v, heads, skip_reshape, grid, kwargs):
        """q, k, v as [B, H, N, D], the softmax scale, the grid's problem and the policy's plan."""
        if not skip_reshape:
            B, N, HD = q.shape
            q, k, v = (t.view(B, N, heads, HD // heads).transpose(1, 2) for t in (q, k, v))
        scale = kwargs.get("scale") or q.shape[-1] ** -0.5
        c = self.config
        G, o = grid.tokens, grid.offset
        gq, gk, gv = (t[:, :, o:o + G] for t in (q, k, v))
        rows = min(c.probe_rows, G)
        probe = torch.randperm(G, generator=run.generator)[:rows].to(q.device) if rows else None
        memory = run.memory.setdefault((layer, _branch(kwargs, q.shape)), {})
        problem = Problem(gq, gk, gv, grid, c.block_size, c.density, scale, c.top_p, probe, memory, fwd.step)
        return q, k, v, scale, problem, self._plan(run, problem)

    def _plan(self, run, problem: Problem) -> Plan:
        c = self.config
        if c.policy in policies.STATIC:
            key = (c.policy, problem.grid.frames, problem.grid.height, problem.grid.width, c.block_size, c.density,
                   str(problem.q.device))
            if key not in run.static_plans:
                run.static_plans[key] = policies.plan(c.policy, problem)
            return run.static_plans[key]
        return policies.plan(c.policy, problem)

    def _attend(self, q, k, v, plan: Plan, grid, scale, return_lse=False):
        """Plan applied to the whole sequence; q, k, v [B, H, N, D]. Returns the output in the
        original order (and the log-sum-exp of the sparse rows, original order, -inf elsewhere)."""
        B, H, N, D = q.shape
        bs = self.config.block_size
        G, o = grid.tokens, grid.offset
        S, n_blocks = G // bs, -(-N // bs)
        dev = q.device
        outside = torch.cat([torch.arange(0, o, device=dev), torch.arange(o + G, N, device=dev)])

        def sequence(order):  # grid tokens in plan order, then every other token
            lead = order.shape[:2]
            return torch.cat([order + o, outside.expand(*lead, -1)], dim=-1)

        q_index, k_index = sequence(plan.q_order), sequence(plan.k_order)
        qs, ks, vs = _take(q, q_index), _take(k, k_index), _take(v, k_index)
        # Every query block also keeps the key blocks past the grid's full blocks (grid tail,
        # text): listed first, so that padded list slots stay at the end.
        lead = plan.kv_indices.shape[:3]
        tail = torch.arange(S, n_blocks, device=dev, dtype=torch.int32).expand(*lead, -1)
        lists = torch.cat([tail, plan.kv_indices.to(dev)], dim=-1)
        counts = plan.kv_counts.to(dev) + (n_blocks - S)
        result = block_sparse_attention(qs[:, :, :S * bs], ks, vs, lists, counts, bs, scale, return_lse)
        sparse_out, lse = result if return_lse else (result, None)
        rest = _dense_sdpa(qs[:, :, S * bs:], ks, vs, scale) if N > S * bs else sparse_out[:, :, :0]
        out = _put(torch.cat([sparse_out, rest.to(sparse_out.dtype)], dim=2), q_index)
        if not return_lse:
            return out, None
        full_lse = torch.full((B, H, N), float("-inf"), device=dev)
        full_lse[:, :, :S * bs] = lse
        full_lse = _put(full_lse[..., None], q_index)[..., 0]
        return out, full_lse

    def _sparse(self, run, fwd, layer, q, k, v, heads, skip_reshape, grid, kwargs):
        q, k, v, scale, problem, plan = self._planned(run, fwd, layer, q, k, v, heads, skip_reshape, grid, kwargs)
        out, _ = self._attend(q, k, v, plan, grid, scale)
        if self.config.retention:
            stats = problem.state.get("retention")
            if stats is not None and stats["ratio"].shape == out.shape[:3]:
                out = retention_correct(out, stats)
            else:
                self._notice(run, "the Re-ttention correction needs a dense warm-up step (dense_steps >= 1) "
                                  "to measure statistics; uncorrected until then")
        error = None
        if problem.probe is not None:
            rows = grid.offset + problem.probe
            truth = policies.rows_attention(q, k, v, rows, None, scale)
            diff = (out[:, :, rows].float() - truth).pow(2).sum((-1, -2)).sqrt()
            error = (diff / truth.pow(2).sum((-1, -2)).sqrt().clamp_min(1e-12)).mean(0).tolist()
        density = policies.density_of(plan).expand(q.shape[0], q.shape[1]).mean(0).tolist()
        temporal = None if plan.pattern is None else plan.pattern.float().mean(0).tolist()
        run.report.sparse(layer, fwd.step, density, error, temporal)
        return out

    def _record_statistics(self, run, fwd, layer, q, k, v, heads, skip_reshape, grid, kwargs, dense_out):
        """On a dense step, what Re-ttention keeps: the share of each row's softmax mass the plan
        keeps, and what the kept keys alone then miss (dense output minus the rescaled sparse one)."""
        try:
            q, k, v, scale, problem, plan = self._planned(run, fwd, layer, q, k, v, heads, skip_reshape, grid,
                                                          kwargs)
            sparse_out, kept_lse = self._attend(q, k, v, plan, grid, scale, return_lse=True)
            if dense_out.ndim == 3:  # (B, N, H*D) from the dense function
                dense_out = dense_out.view(q.shape[0], q.shape[2], q.shape[1], -1).transpose(1, 2)
            ratio = torch.exp(kept_lse - row_logsumexp(q, k, scale))
            ratio = torch.where(torch.isfinite(kept_lse), ratio, torch.ones_like(ratio))
            residual = dense_out.float() - sparse_out.float() * ratio[..., None]
            problem.state["retention"] = {"ratio": ratio, "residual": residual.to(q.dtype)}
        except Exception as e:
            self._notice(run, f"could not record Re-ttention statistics ({type(e).__name__}: {e})")


def retention_correct(sparse_out: torch.Tensor, stats: dict) -> torch.Tensor:
    """Re-ttention: the sparse softmax normaliser divided by the share of the mass the kept keys
    had at the last dense step (so the row is scaled by that share), plus the part of the
    output the dropped keys gave then."""
    return (sparse_out.float() * stats["ratio"][..., None] + stats["residual"].float()).to(sparse_out.dtype)


def _branch(kwargs, shape) -> tuple:
    """Which conditioning branches are in the batch, so per-branch memory is not mixed up."""
    options = kwargs.get("transformer_options") or {}
    return tuple(options.get("cond_or_uncond") or ()), tuple(shape[:3])


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def apply_sparse_attention(model, config: SparseConfig, report_dir: str | None = None):
    """A clone of ``model`` (a ComfyUI ModelPatcher) with sparse attention installed.
    Returns ``(clone, patch)``; ``patch.last_report`` holds the report of the last run."""
    import comfy.patcher_extension as ext

    clone = model.clone()
    options = clone.model_options.setdefault("transformer_options", {})
    patch = SparseAttention(config, options.get("optimized_attention_override"), report_dir)
    options["optimized_attention_override"] = patch
    clone.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, patch.key, patch.outer_sample)
    clone.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, patch.key, patch.apply_model)
    return clone, patch


def find_patches(model) -> list[SparseAttention]:
    """Our patches on ``model``'s override chain, outermost first."""
    override = getattr(model, "model_options", {}).get("transformer_options", {}).get("optimized_attention_override")
    return [p for p in _chain(override) if isinstance(p, SparseAttention)]


def _chain(override):
    """An attention override and those it chains (``previous``), outermost first."""
    while override is not None:
        yield override
        override = getattr(override, "previous", None)
