"""Quantization nodes: Quantize Model, Save Quantized Model, Load Quantized Model."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..quant import auto, checkpoint, formats, pipeline, policy
from ..quant import model as qmodel
from . import plots
from .common import CATEGORY, fail, node_name, progress, report_text, require_diffusion_model
from .validate import AccelNode, folder_file, output_folder

log = logging.getLogger(__name__)

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

_FORMAT_HELP = "; ".join(f"{f.name}: {f.description}" for f in formats.FORMATS.values())


def _compute_dtype(choice: str, patcher) -> torch.dtype:
    if choice != "auto":
        return DTYPES[choice]
    current = qmodel.compute_dtype(patcher)
    if patcher.load_device.type == "cpu" and current == torch.float32:
        # On the CPU every matmul left in fp32 runs at a quarter of bf16's speed, and the
        # quantized layers' outputs are rounded already; bf16 is what makes int8 pay off.
        return torch.bfloat16
    return current


def _plot(rows: list[qmodel.LayerRow], title: str) -> torch.Tensor:
    quantized = [r for r in rows if r.format != "keep"]
    use_output = any(r.output_sqnr_db is not None for r in quantized)
    values = [min((r.output_sqnr_db if use_output else r.weight_sqnr_db) or 0.0, 99.0) for r in quantized]
    labels = [r.layer.split(".")[-1] for r in quantized]
    what = "output SQNR (calibration data)" if use_output else "weight SQNR"
    return plots.bar_plot(labels, values, f"{title}: {what}", ylabel="dB",
                          groups=[f"{r.layout or r.format}/{r.activations}" for r in quantized])


def calibration_widgets() -> list:
    """The calibration run's settings (shared by the nodes that calibrate)."""
    return [
        io.Int.Input("calibration_steps", default=8, min=1, max=200,
                     tooltip="Sampling steps of the calibration run (statistics are taken at every "
                             "step). Used only when positive and latent are connected."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                     tooltip="Noise seed of the calibration run."),
        io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1,
                       tooltip="CFG scale of the calibration run (use your workflow's)."),
    ]


def calibration_sockets() -> list:
    """The calibration run's optional inputs: the user's own conditioning and latent."""
    return [
        io.Conditioning.Input("positive", optional=True, tooltip="Calibration: your positive conditioning."),
        io.Conditioning.Input("negative", optional=True,
                              tooltip="Calibration: your negative conditioning (default: the positive)."),
        io.Latent.Input("latent", optional=True,
                        tooltip="Calibration: a latent of the size you generate (e.g. Empty Latent)."),
    ]


def model_report_plot() -> list:
    """The outputs of the nodes that return a changed model, its report and a plot."""
    return [io.Model.Output(display_name="model"), io.String.Output(display_name="report"),
            io.Image.Output(display_name="plot")]


def check_calibration(node: str, positive, latent) -> None:
    if positive is not None and latent is None:
        fail(node, "latent", "is needed for calibration when positive is connected (e.g. an Empty Latent)")


class AccelQuantizeModel(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelQuantizeModel",
            display_name="Quantize Model",
            category=f"{CATEGORY}/quant",
            description=("Quantizes the linear layers of the loaded diffusion model (any family) and returns a "
                         "new model; the input model is untouched. Layers known to be fragile (embeddings, "
                         "timestep path, final projection) stay in high precision; modulation layers are "
                         "quantized weight-only. A LoRA applied before this node is merged in; one applied "
                         "after it works too. With conditioning and a latent connected, a short sampling run "
                         "records activation statistics first (for smoothing, the report and 'auto'). "
                         "On ComfyUI 0.33 and later, formats ComfyUI has a layout for (int8, fp8, nvfp4, mxfp8, "
                         "w4a8, w4a4) run on ComfyUI's own quantized layers and comfy-kitchen's kernels where that "
                         "is the faster path on this device; the rest run on ours. Outputs a per-layer report "
                         "(with the layout each layer got and why) and plot."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to quantize (from a loader or LoRA node)."),
                io.Combo.Input("format", options=[*formats.FORMATS, "auto"], default="int8",
                               tooltip="Weight format. " + _FORMAT_HELP + "; auto: a format per layer from "
                                       "measured sensitivity (see the auto_* inputs)."),
                io.Int.Input("group_size", default=64, min=8, max=4096, step=8,
                             tooltip="Weights per scale along the input dimension for the grouped 4-bit "
                                     "formats (int4, w4a8); must divide every quantized layer's input "
                                     "width. 64 or 128 are usual. Ignored by other formats."),
                io.Combo.Input("compute_dtype", options=list(DTYPES), default="auto",
                               tooltip="Dtype of everything that is not a quantized matmul. auto: the "
                                       "model's own, except bfloat16 on a CPU running float32."),
                io.Float.Input("smooth_alpha", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="SmoothQuant strength (0 = off) for formats that quantize activations "
                                       "(int8, w4a8, fp8 on fp8 GPUs): moves activation outliers into the "
                                       "weights. Needs the calibration inputs."),
                *calibration_widgets(),
                io.String.Input("auto_formats", default="int8, w4a8, int4",
                                tooltip="format=auto: the formats it may choose from, comma separated; 16-bit "
                                        "is always an option."),
                io.Float.Input("auto_budget", default=0.35, min=0.0, max=1.0, step=0.01,
                               tooltip="format=auto: size of the quantizable layers as a fraction of their "
                                       "bf16 size (0.35 is about 5.6 bits per weight); 0 = no budget, use "
                                       "auto_min_sqnr_db alone."),
                io.Float.Input("auto_min_sqnr_db", default=0.0, min=0.0, max=80.0, step=0.5,
                               tooltip="format=auto: every layer's output SQNR (dB, on the calibration data; "
                                       "weight SQNR without calibration) must reach this; 0 = no floor."),
                io.String.Input("layer_overrides", default="", multiline=True,
                                tooltip="Optional lines '<regex> = <action>' matched against layer paths "
                                        "(e.g. 'blocks.0.self_attn.q'), first match wins: action 'keep' "
                                        "(high precision), a format name, or a format name followed by "
                                        "'weight_only'. Example: 'img_mod|txt_mod = keep'."),
                *calibration_sockets(),
            ],
            outputs=model_report_plot(),
        )

    @classmethod
    def execute(cls, model, format, group_size, compute_dtype, smooth_alpha, calibration_steps, seed, cfg,
                auto_formats, auto_budget, auto_min_sqnr_db, layer_overrides, positive=None, negative=None,
                latent=None) -> io.NodeOutput:
        node = node_name(cls)
        require_diffusion_model(node, model)
        try:
            overrides = policy.parse_overrides(layer_overrides)
        except ValueError as e:
            fail(node, "layer_overrides", str(e))
        candidates = []
        if format == "auto":
            try:
                candidates = auto.parse_candidates(auto_formats)
            except ValueError as e:
                fail(node, "auto_formats", str(e))
            if auto_budget <= 0 and auto_min_sqnr_db <= 0:
                fail(node, "auto_budget", "and auto_min_sqnr_db are both 0: give auto a budget or a quality floor")
        grouped = any(formats.get(f).grouped for f in (candidates or [format]) if f in formats.FORMATS)
        if group_size % 2:
            fail(node, "group_size", f"must be even (4-bit codes are packed two per byte), got {group_size}")
        check_calibration(node, positive, latent)
        if not qmodel.linear_layers(model):
            fail(node, "model", "has no linear layers to quantize")
        already = qmodel.quantized_layers(model)
        if already:
            fail(node, "model", f"is already quantized ({len(already)} layers, e.g. {already[0]}); "
                                "connect the model from before the Quantize Model / Load Quantized Model node")
        try:
            plans = qmodel.plan_model(model, format, group_size, overrides)
        except policy.PatternError as e:
            fail(node, "layer_overrides", str(e))
        except policy.LayerError as e:
            fail(node, "group_size" if grouped and "group size" in str(e) else "format",
                 f"cannot be used: {e}. Choose a size that divides it, or keep that layer with "
                 f"layer_overrides ('{e.path} = keep').")
        calibration = (pipeline.Calibration(positive, negative, latent, calibration_steps, seed, cfg)
                       if positive is not None else None)
        auto_options = (pipeline.AutoOptions(candidates, auto_budget if auto_budget > 0 else None,
                                             auto_min_sqnr_db if auto_min_sqnr_db > 0 else None)
                        if format == "auto" else None)
        try:
            result = pipeline.run(model, plans, _compute_dtype(compute_dtype, model), group_size, smooth_alpha,
                                  calibration, auto_options, progress=progress)
        except auto.BudgetError as e:
            fail(node, "auto_budget", f"cannot be met: {e}; raise auto_budget or lower auto_min_sqnr_db")
        text = report_text("Quantize Model", {"format": format, **result.summary}, [vars(r) for r in result.rows])
        log.info("Quantize Model: %s, %s layers quantized, linear weights %.2fx smaller than in bf16%s",
                 format, result.summary["layers quantized"], result.summary["linear weights vs bf16"],
                 f", worst layer {result.summary['worst layer output SQNR dB']} dB"
                 if "worst layer output SQNR dB" in result.summary else "")
        return io.NodeOutput(result.model, text, _plot(result.rows, format))


_SAVE_DTYPES = {"keep": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _target_path(node: str, filename: str) -> str:
    import os
    import folder_paths
    # ComfyUI lists the legacy models/unet first; write where new files belong.
    roots = folder_paths.get_folder_paths("diffusion_models")
    root = next((r for r in roots if os.path.basename(os.path.normpath(r)) == "diffusion_models"), roots[0])
    folder, stem = output_folder(node, "filename", filename, root, "models/diffusion_models")
    return os.path.join(folder, stem if stem.endswith(".safetensors") else stem + ".safetensors")


class AccelSaveQuantized(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelSaveQuantized",
            display_name="Save Quantized Model",
            category=f"{CATEGORY}/quant",
            description=("Writes a quantized model (from Quantize Model) to models/diffusion_models as "
                         "safetensors, with any LoRA applied after quantization baked in. Layers on ComfyUI's own "
                         "layouts are written in ComfyUI's checkpoint format, and fp8 and int8 layers of ours in "
                         "its float8_e4m3fn and int8_tensorwise layouts, so a file with only those loads in the "
                         "stock Load Diffusion Model node (fp8: ComfyUI 0.3.75 and later; the others 0.33 and "
                         "later). Other formats load with Load Quantized Model, which reads every file."),
            inputs=[
                io.Model.Input("model", tooltip="A model from Quantize Model or Load Quantized Model."),
                io.String.Input("filename", default="quantized/model",
                                tooltip="File name under models/diffusion_models ('.safetensors' is added); "
                                        "subfolders allowed."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of that name. Off: an existing file is an error."),
                io.Combo.Input("other_weights_dtype", options=list(_SAVE_DTYPES), default="keep",
                               tooltip="Dtype for the layers that are not quantized (norms, kept layers): "
                                       "keep them as they are, or cast to bfloat16/float16 to save space."),
            ],
            outputs=[io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename, overwrite, other_weights_dtype) -> io.NodeOutput:
        node = node_name(cls)
        if not qmodel.quantized_layers(model):
            fail(node, "model", "has no quantized layers; connect the output of Quantize Model")
        path = _target_path(node, filename)
        try:
            info = checkpoint.save_model(model, path, overwrite, _SAVE_DTYPES[other_weights_dtype])
        except FileExistsError:
            fail(node, "filename", f"{path} already exists; choose another name or set overwrite")
        log.info("Save Quantized Model: wrote %s (%d bytes, %d quantized layers)", path, info["bytes"],
                 info["quantized layers"])
        return io.NodeOutput(report_text("Save Quantized Model", info))


class AccelLoadQuantized(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths
        return io.Schema(
            node_id="AccelLoadQuantized",
            display_name="Load Quantized Model",
            category=f"{CATEGORY}/quant",
            description=("Loads a model written by Save Quantized Model (any format), checking the file's "
                         "metadata against its tensors first."),
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="A file in models/diffusion_models written by Save Quantized Model."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, unet_name) -> io.NodeOutput:
        import folder_paths
        node = node_name(cls)
        path = folder_file(node, "unet_name", unet_name, folder_paths.get_folder_paths("diffusion_models"),
                           "a file in models/diffusion_models")
        try:
            model = checkpoint.load_model(str(path))
        except checkpoint.CheckpointError as e:
            fail(node, "unet_name", f"cannot be loaded: {e}")
        layers = qmodel.quantized_layers(model)
        formats_used = sorted({qmodel.layer_format(model.get_model_object(qmodel.PREFIX + n)) for n in layers})
        summary = {"file": unet_name, "quantized layers": len(layers), "formats": formats_used,
                   "compute dtype": checkpoint.dtype_name(qmodel.compute_dtype(model))}
        log.info("Load Quantized Model: %s, %d quantized layers (%s)", unet_name, len(layers), ", ".join(formats_used))
        return io.NodeOutput(model, report_text("Load Quantized Model", summary))


NODES = [AccelQuantizeModel, AccelSaveQuantized, AccelLoadQuantized]
