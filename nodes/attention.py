"""Sparse attention nodes: the patcher and its report."""
from __future__ import annotations

import logging
import os

import torch
from comfy_api.latest import io

from .. import families
from ..attention import policies
from ..attention.layout import unsupported
from ..cache.adapters import find_adapter
from ..attention.report import matrices
from ..attention.sparse import BLOCK_SIZES, SparseConfig, apply_sparse_attention, find_patches
from .common import CATEGORY, fail, node_name, report_text, require_diffusion_model
from .plots import heatmap
from .validate import AccelNode

log = logging.getLogger(__name__)

REPORT_FOLDER = "accel_sparse_attention"


class AccelSparseAttention(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelSparseAttention",
            display_name="Sparse Attention",
            category=f"{CATEGORY}/attention",
            description=(
                "Makes the model's self-attention over the video/image latent block-sparse: each block of "
                "queries attends only to the key blocks a policy keeps; text tokens stay dense. Returns a "
                "patched copy of the model (the input model is unchanged). Works with any attention backend "
                "and chains an attention override that is already installed. The report of each run is "
                "logged, shown by the Sparse Attention Report node and, with save_report, saved as JSON in "
                "the output folder."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (Wan, HunyuanVideo, LTX-Video, "
                                                "Flux and other transformer models)."),
                io.Combo.Input("policy", options=list(policies.POLICIES), default="radial",
                               tooltip="How key blocks are chosen. radial: window that narrows with frame "
                                       "distance (static). sliding_tile: 3-D window of tiles (static). svg: per "
                                       "head spatial or temporal pattern picked on sampled rows. svg2: k-means "
                                       "clusters of q and k, top-p of the estimated mass. draft: pooled "
                                       "low-resolution attention map picks the blocks."),
                io.Float.Input("density", default=0.25, min=0.01, max=1.0, step=0.01,
                               tooltip="Fraction of key blocks each query block keeps, in (0, 1]. Attention "
                                       "work shrinks to about this fraction; 1.0 is dense. For svg2 this is "
                                       "the largest budget top_p may use."),
                io.Combo.Input("block_size", options=list(BLOCK_SIZES), default=128,
                               tooltip="Tokens per attention block. 128 suits GPUs and the CPU path; smaller "
                                       "blocks select more precisely at more overhead. Sequences that the "
                                       "block size does not divide are padded."),
                io.Float.Input("top_p", default=0.9, min=0.01, max=1.0, step=0.01,
                               tooltip="svg2 only: keep the key blocks with the most estimated attention mass "
                                       "until this share of it is covered (never more than the density). "
                                       "1.0 always uses the full density budget."),
                io.Int.Input("dense_steps", default=1, min=0, max=1000,
                             tooltip="Number of first sampling steps that run dense attention (the layout "
                                     "of the picture forms there). Also where Re-ttention measures its "
                                     "statistics."),
                io.Int.Input("dense_first_layers", default=1, min=0, max=1000,
                             tooltip="Number of first transformer layers that always run dense attention."),
                io.Int.Input("dense_last_layers", default=0, min=0, max=1000,
                             tooltip="Number of last transformer layers that always run dense attention."),
                io.Int.Input("min_tokens", default=4096, min=0, max=10_000_000,
                             tooltip="Sequences shorter than this many tokens stay dense (sparsity gains "
                                     "little on short sequences)."),
                io.Boolean.Input("retention", default=False,
                                 tooltip="Re-ttention correction. At the last dense warm-up step it keeps, per "
                                         "row, the share of softmax mass the kept blocks had and what the "
                                         "dropped blocks added; sparse steps rescale by that share and add it "
                                         "back. Needs dense_steps >= 1; holds one attention output per layer "
                                         "in memory."),
                io.Int.Input("probe_rows", default=32, min=0, max=4096,
                             tooltip="Query rows per call computed exactly to measure the error against "
                                     "dense attention for the report, and for svg to pick each head's "
                                     "pattern (svg needs at least 1). 0 turns the error measurement off."),
                io.Boolean.Input("save_report", default=False,
                                 tooltip=f"Also save each run's report as a new JSON file in the output folder "
                                         f"under {REPORT_FOLDER}/ (never overwrites a file). The Sparse "
                                         f"Attention Report node shows it either way."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, policy, density, block_size, top_p, dense_steps, dense_first_layers,
                dense_last_layers, min_tokens, retention, probe_rows, save_report) -> io.NodeOutput:
        node = node_name(cls)
        config = SparseConfig(policy=policy, density=float(density), block_size=int(block_size),
                              top_p=float(top_p), dense_steps=int(dense_steps),
                              dense_first_layers=int(dense_first_layers), dense_last_layers=int(dense_last_layers),
                              min_tokens=int(min_tokens), retention=bool(retention), probe_rows=int(probe_rows))
        for name, message in config.problems():
            fail(node, name, message)
        dm = getattr(getattr(model, "model", None), "diffusion_model", None)
        if dm is None:
            fail(node, "model", "has no diffusion model whose attention could be patched")
        require_diffusion_model(node, model)
        reason = unsupported(dm)
        if reason is not None:
            also = "; TeaCache works on it too" if find_adapter(dm) is not None else ""
            fail(node, "model", f"is {families.a_model(model)}: {reason}. Quantize Model and TaylorSeer work on "
                                f"it{also}.")
        report_dir = None
        if save_report:
            import folder_paths
            report_dir = os.path.join(folder_paths.get_output_directory(), REPORT_FOLDER)
        patched, _ = apply_sparse_attention(model, config, report_dir)
        return io.NodeOutput(patched)


class AccelSparseAttentionReport(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelSparseAttentionReport",
            display_name="Sparse Attention Report",
            category=f"{CATEGORY}/attention",
            description=(
                "The report of the sampling run that made the connected LATENT with a model patched by Sparse "
                "Attention: per layer and head "
                "the density kept, the pattern svg chose and the relative error against exact attention on "
                "sampled rows, as text/JSON and heat maps (density, then error; layers down, heads across)."),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of a Sparse Attention node (or a model made "
                                                "from it) that a sampler used."),
                io.Latent.Input("latent", tooltip="The sampler's LATENT output: makes this node run after the "
                                                  "sampling it reports on."),
            ],
            outputs=[io.String.Output(display_name="report"), io.Image.Output(display_name="heat_maps")],
        )

    @classmethod
    def execute(cls, model, latent) -> io.NodeOutput:
        node = node_name(cls)
        patches = find_patches(model)
        if not patches:
            fail(node, "model", "carries no Sparse Attention patch: connect the MODEL output of a Sparse Attention "
                                "node")
        report = patches[0].history.find(latent["samples"])
        if report is None:
            fail(node, "latent", "comes from no sampling run with this model that is still kept: connect the LATENT "
                                 "output of the sampler that used it")
        summary = dict(report["summary"])
        if patches[0].last_report_path:
            summary["saved_as"] = str(patches[0].last_report_path)
        if report["notices"]:
            summary["notices"] = " | ".join(report["notices"])
        text = report_text("Sparse attention report", summary, report["rows"])
        density, error, layers = matrices(report)
        density, error = density or [[float("nan")]], error or [[float("nan")]]
        label = f"layers {layers[0]}..{layers[-1]} (rows) x heads (columns)" if layers else "no sparse layer"
        images = torch.cat([heatmap(density, "Density kept per layer and head", "head", label, 0.0, 1.0),
                            heatmap(error, "Relative error vs dense attention", "head", label)])
        return io.NodeOutput(text, images)


NODES = [AccelSparseAttention, AccelSparseAttentionReport]
