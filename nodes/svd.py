"""SVD Low-Rank Branch: SVDQuant's 16-bit low-rank branch on the loaded model (any family)."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..quant import lowrank, pipeline, policy, svdquant
from ..quant.linear import QuantLinear
from ..quant import model as qmodel
from . import plots
from .common import CATEGORY, fail, node_name, progress, report_text
from .quant import calibration_sockets, calibration_widgets, check_calibration, model_report_plot
from .validate import AccelNode

log = logging.getLogger(__name__)

NODE = "SVD Low-Rank Branch"


# the formats the report can compare in (vq formats need their own k-means; fp8 is 8-bit)
REPORT_FORMATS = ("w4a4", "nvfp4_w4a4", "w4a8", "int4", "nvfp4", "mxfp4", "int8")


def _plot(rows: list[svdquant.LayerRow], names: tuple[str, str]) -> "torch.Tensor":  # noqa: F821
    measured = [r for r in rows if r.sqnr_plain_db is not None]
    if not measured:
        return plots.bar_plot([r.layer.split(".")[-1] for r in rows], [100 * r.energy for r in rows],
                              "energy in the branch", ylabel="%")
    labels, values, groups = [], [], []
    for r in measured:
        short = r.layer.split(".")[-1]
        labels += [short, short]
        values += [min(r.sqnr_plain_db, 99.0), min(r.sqnr_branched_db, 99.0)]
        groups += list(names)
    return plots.bar_plot(labels, values, f"layer {measured[0].sqnr_on} SQNR", ylabel="dB", groups=groups)


class AccelSVDLowRankBranch(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelSVDLowRankBranch",
            display_name=NODE,
            category=f"{CATEGORY}/quant",
            description=("SVDQuant inside the graph. Before Quantize Model: smooths each attention/MLP linear layer "
                         "with activation statistics (moving activation outliers into the weight), splits the "
                         "smoothed weight by SVD into a 16-bit rank-r branch and a residual, and Quantize Model then "
                         "quantizes only the residual (use format w4a4, or nvfp4_w4a4, for 4-bit weights and "
                         "activations; w4a8 for 8-bit activations). After Quantize Model: fits the branch to each "
                         "layer's quantization error instead, without requantizing. The input model is untouched. A "
                         "LoRA loaded after this node and Quantize Model joins the branch (no requantization); one "
                         "applied before is merged before the SVD. Outputs a per-layer report and plot."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model: before Quantize Model (SVDQuant) or after "
                                                "it (error compensation)."),
                io.Int.Input("rank", default=32, min=16, max=128, step=8,
                             tooltip="Rank r of the branch (16-128): it stores r x (in + out) 16-bit weights per "
                                     "layer; 32 is SVDQuant's default. At most half the layer's smaller side."),
                io.Float.Input("smooth_alpha", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="SmoothQuant strength (0-1, 0 = off): how much of the activation outliers "
                                       "move into the weight before the SVD. Needs the calibration inputs; "
                                       "ignored after Quantize Model (its smoothing is kept)."),
                io.Boolean.Input("search_alpha", default=False,
                                 tooltip="Choose the smoothing strength per layer instead: each alpha of "
                                         f"{', '.join(map(str, svdquant.ALPHA_GRID))} is tried and the one whose "
                                         "branched layer (branch + residual in report_format) best reproduces the "
                                         "calibration outputs is kept. About 7x the branch build time; needs the "
                                         "calibration inputs; smooth_alpha is then unused."),
                io.Combo.Input("svd", options=list(lowrank.METHODS), default="randomized",
                               tooltip="randomized: torch.svd_lowrank (rank + 16 directions, 2 power "
                                       "iterations), much faster on wide layers; full: exact SVD."),
                io.Combo.Input("report_format", options=list(REPORT_FORMATS), default="w4a4",
                               tooltip="Before Quantize Model: the format the report quantizes each layer in, "
                                       "plainly and as residual + branch, to show the SQNR gain (dB). Use the "
                                       "format you will pick in Quantize Model."),
                io.Int.Input("group_size", default=64, min=8, max=4096, step=8,
                             tooltip="Group size (weights per scale along the input) of report_format, when "
                                     "it is grouped."),
                *calibration_widgets(),
                io.String.Input("layer_overrides", default="", multiline=True,
                                tooltip="Which layers get a branch. Default: the attention/MLP linears. Lines "
                                        "'<regex> = keep' leave matching layer paths out; '<regex> = <format>' "
                                        "brings any matching layer in (first match wins), e.g. "
                                        "'blocks\\.0\\. = keep'."),
                *calibration_sockets(),
            ],
            outputs=model_report_plot(),
        )

    @classmethod
    def execute(cls, model, rank, smooth_alpha, search_alpha, svd, report_format, group_size, calibration_steps, seed,
                cfg, layer_overrides, positive=None, negative=None, latent=None) -> io.NodeOutput:
        node = node_name(cls)
        try:
            overrides = policy.parse_overrides(layer_overrides)
        except ValueError as e:
            fail(node, "layer_overrides", str(e))
        check_calibration(node, positive, latent)
        already = svdquant.branched_layers(model)
        if already:
            fail(node, "model", f"already has a low-rank branch ({len(already)} layers, e.g. {already[0]}); "
                                "connect the model from before the first SVD Low-Rank Branch node")
        after = bool(qmodel.quantized_layers(model))
        try:
            layers = svdquant.select_layers(model, overrides)
        except (policy.PatternError, policy.LayerError) as e:
            fail(node, "layer_overrides", str(e))
        if after:
            layers = [(p, m) for p, m in layers if p in set(qmodel.quantized_layers(model))]
            core_layers = [p for p, m in layers if not isinstance(m, QuantLinear)]
            if core_layers and len(core_layers) == len(layers):
                fail(node, "model", f"holds its quantized layers in ComfyUI's own layouts (e.g. {core_layers[0]}), "
                                    "which have no place for a low-rank branch; put this node before Quantize Model")
            layers = [(p, m) for p, m in layers if isinstance(m, QuantLinear)]
        if not layers:
            fail(node, "layer_overrides", "selects no layer" + (" that Quantize Model quantized" if after else "")
                 + "; check the patterns against the layer names in Quantize Model's report")
        for path, module in layers:
            shape = tuple(module.weight.shape)
            if rank > svdquant.max_rank(shape):
                fail(node, "rank", f"{rank} is too large for layer {path} {list(shape)}: at most "
                                   f"{svdquant.max_rank(shape)} (half its smaller side); lower the rank or leave "
                                   f"the layer out with layer_overrides ('{path} = keep')")
            problem = svdquant.patch_shape_problem(model.patches.get(f"{qmodel.PREFIX}{path}.weight", []), shape)
            if problem:
                fail(node, "model", f"carries {problem} on layer {path}, whose weight is {list(shape)}: the LoRA "
                                    "was made for another model; remove it or use a matching one")
        if after and any(svdquant.original_float_weight(model, p, m) is None for p, m in layers):
            fail(node, "model", "has quantized layers without their float weights (loaded from a quantized file?): "
                                "after Quantize Model the branch needs the original weights; put this node before "
                                "Quantize Model instead")
        paths = [p for p, _ in layers]
        stats = None
        summary = {}
        if positive is not None:
            calibration = pipeline.Calibration(positive, negative, latent, calibration_steps, seed, cfg)
            stats = calibration.run(model, paths, progress)
        elif smooth_alpha > 0 and not after:
            summary["notice"] = pipeline.SMOOTHING_SKIPPED
        report_spec = policy.make_spec(report_format, group_size, act_quant=True)
        alpha = svdquant.AUTO_ALPHA if search_alpha and stats is not None else smooth_alpha
        result = svdquant.branch_model(model, paths, rank, alpha, stats, svd, report_spec,
                                       progress=progress(len(paths)))
        summary = {**result.summary, **({} if after else {"report format": report_format}), **summary}
        text = report_text(NODE, summary, [vars(r) for r in result.rows])
        log.info("%s: %s, %d layers at rank %d in %.2f s%s", NODE, "after quantization" if after else "SVDQuant split",
                 len(result.rows), rank, summary["branch build time s"],
                 f", median SQNR {summary['median SQNR plain dB']} -> {summary['median SQNR branched dB']} dB"
                 if "median SQNR plain dB" in summary else "")
        names = ("quantized", "quantized + branch") if after else (f"plain {report_format}",
                                                                    f"SVDQuant {report_format}")
        return io.NodeOutput(result.model, text, _plot(result.rows, names))


NODES = [AccelSVDLowRankBranch]
