"""Writes ``example_workflows/*.json`` (ComfyUI's UI format) from the descriptions below.

    python -m lab.make_workflows [--screenshots]

Workflows are built in code so ids, links and layout stay consistent: nodes are placed in
columns from left to right (model -> our nodes -> sampler -> decode -> save), stacked without
overlap, with a Note at the top left saying what the workflow does, what it needs and what to
expect. Widget values are laid out from the server's ``/object_info`` exactly as the frontend
reads them (``workflows.widgets``), defaults filled in for what a workflow leaves out.

One file serves every supported ComfyUI (0.3.75 to 0.33): the generator writes the same bytes on
each (``Node.finish`` says how), and each frontend fills in what a newer ComfyUI added.

A workflow whose nodes are not all registered on this checkout is skipped (it waits for its
node family). ``--screenshots`` also renders each workflow in the real frontend (headless
Chromium) into ``docs/workflows/<name>.png``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from lab.host import PACK_ROOT, ComfyServer
from lab.workflows import WORKFLOWS_DIR, Widget, input_spec, is_widget, write_fixture_image
from lab.workflows import widgets as node_widgets

log = logging.getLogger("comfyui_accel.make_workflows")
SCREENSHOT_DIR = PACK_ROOT / "docs" / "workflows"

# Standard release files (names, folders and download links as ComfyUI's own templates give
# them; tests/e2e/test_example_workflows.py checks the names against the templates package).
MODELS = {
    "flux1-dev.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors"),
    "clip_l.safetensors": ("text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
    "t5xxl_fp16.safetensors": ("text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"),
    "ae.safetensors": ("vae", "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors"),
    "wan2.1_t2v_1.3B_fp16.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors"),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": ("text_encoders", "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    "wan_2.1_vae.safetensors": ("vae", "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/vae/wan_2.1_vae.safetensors"),
    "wan2.2_ti2v_5B_fp16.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/wan2.2_ti2v_5B_fp16.safetensors"),
    "wan2.2_vae.safetensors": ("vae", "https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/vae/wan2.2_vae.safetensors"),
    "hunyuan_video_t2v_720p_bf16.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files/diffusion_models/hunyuan_video_t2v_720p_bf16.safetensors"),
    "llava_llama3_fp8_scaled.safetensors": ("text_encoders", "https://huggingface.co/Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files/text_encoders/llava_llama3_fp8_scaled.safetensors"),
    "hunyuan_video_vae_bf16.safetensors": ("vae", "https://huggingface.co/Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files/vae/hunyuan_video_vae_bf16.safetensors"),
    "sd_xl_base_1.0.safetensors": ("checkpoints", "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"),
}

# LiteGraph's geometry (classic canvas): title bar, slot row and widget row heights.
TITLE_H, SLOT_H, WIDGET_H = 30, 20, 24
COL_GAP, ROW_GAP, MARGIN = 60, 50, 40
ACCEL_COLOR = ("#2a363b", "#3f5159")       # our nodes: LiteGraph's "cyan"
POSITIVE_COLOR, NEGATIVE_COLOR = ("#232", "#353"), ("#322", "#533")
NOTE_COLOR = ("#432", "#653")


@dataclass
class Node:
    id: int
    type: str
    column: int
    title: str | None = None
    width: int = 320
    min_height: int = 0
    widgets: list = field(default_factory=list)      # [Widget, value] in widgets_values order
    given: set = field(default_factory=set)          # the inputs the workflow sets (the rest: defaults)
    from_comfyui: bool = True                        # one of ComfyUI's own nodes (else a custom pack's: ours)
    inputs: list = field(default_factory=list)       # socket inputs: {"name", "type", "link", ...}
    outputs: list = field(default_factory=list)      # {"name", "type", "links"}
    color: tuple | None = None
    properties: dict = field(default_factory=dict)
    multiline: set = field(default_factory=set)      # the inputs shown as multiline text boxes
    pos: tuple = (0, 0)
    values: list | None = None                       # widgets_values as written (Note: its text)
    height: int = 0

    def slot(self, name_or_index) -> int:
        if isinstance(name_or_index, int):
            return name_or_index
        for i, out in enumerate(self.outputs):
            if out["name"] == name_or_index:
                return i
        raise KeyError(f"{self.type} has no output {name_or_index!r}")

    def set_value(self, name: str, value) -> None:
        index = next(i for i, (w, _) in enumerate(self.widgets) if w.name == name)
        self.widgets[index][1] = value
        self.given.add(name)

    def finish(self) -> None:
        """What the file holds, the same whichever supported ComfyUI writes it.

        A newer ComfyUI adds inputs to its nodes as optional ones (so that older prompts still
        run: CreateVideo's bit_depth, SaveVideo's codec in 0.33) and its preview and save nodes
        gained pass-through outputs; both frontends (1.32, 1.49) give a widget the file has no
        value for its default, and a node the output slots of its definition that the file leaves
        out. So a ComfyUI node's values stop after the last one that is not an optional input the
        workflow leaves unset (our nodes, the same on every host, keep all of theirs), and every
        node's output slots after the last one the workflow links.
        """
        if self.values is not None:        # a Note or PrimitiveNode: values and size as made
            self.height = self.min_height
            return
        kept = list(self.widgets)
        while self.from_comfyui and kept and kept[-1][0].optional and kept[-1][0].owner not in self.given:
            kept.pop()
        self.values = [value for _, value in kept]
        boxes = sum(1 for w, _ in self.widgets[:len(self.values)] if w.name in self.multiline)
        linked = [i for i, out in enumerate(self.outputs) if out["links"]]
        self.outputs = self.outputs[:linked[-1] + 1] if linked else []
        rows = max(len(self.inputs), len(self.outputs))
        self.height = max(self.min_height, rows * SLOT_H + len(self.values) * WIDGET_H + boxes * 90 + 16)


class Graph:
    """A UI-format workflow under construction; ``to_json`` lays it out."""

    def __init__(self, object_info: dict, name: str):
        self.info = object_info
        self.name = name
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def add(self, node_type: str, column: int, title: str | None = None, color=None, node_width: int = 320,
            node_height: int = 0, **values) -> Node:
        """A node with widget ``values`` by input name (defaults for the rest), in ``column``."""
        info = self.info[node_type]
        node = Node(len(self.nodes) + 1, node_type, column, title, node_width, node_height, color=color,
                    properties={"Node name for S&R": node_type})

        def choose(widget: Widget):
            if widget.name is None:          # control_after_generate: keep seeds as written
                return "fixed"
            value = values.get(widget.name, widget.default)
            if value is None:
                raise KeyError(f"{node_type}.{widget.name} has no default; give a value")
            return value

        node.widgets = [[w, v] for w, v in node_widgets(info, choose)]
        node.given = set(values)
        node.from_comfyui = not info.get("python_module", "").startswith("custom_nodes.")
        unknown = node.given - {w.name for w, _ in node.widgets}
        if unknown:
            raise KeyError(f"{node_type} has no widget input(s) {sorted(unknown)}")
        order = info.get("input_order") or {}
        for section in ("required", "optional"):
            for name in order.get(section, []):
                kind, opts = input_spec(info, name)
                if not is_widget(kind, opts):
                    node.inputs.append({"name": name, "type": kind, "link": None,
                                        **({"shape": 7} if section == "optional" else {})})
                elif kind == "STRING" and opts.get("multiline"):
                    node.multiline.add(name)
        for name in values:
            model = MODELS.get(values[name]) if isinstance(values[name], str) else None
            if model:
                node.properties.setdefault("models", []).append(
                    {"name": values[name], "url": model[1], "directory": model[0]})
        node.outputs = [{"name": name, "type": kind, "links": []}
                        for kind, name in zip(info["output"], info.get("output_name") or info["output"])]
        self.nodes.append(node)
        return node

    def note(self, column: int, title: str, text: str, width: int = 420, height: int | None = None) -> Node:
        lines = sum(max(1, -(-len(line) // (width // 8))) for line in text.splitlines())
        node = Node(len(self.nodes) + 1, "Note", column, title, width, height or lines * 16 + 30,
                    values=[text], color=NOTE_COLOR, properties={})
        self.nodes.append(node)
        return node

    def primitive(self, column: int, title: str, value, targets: list[tuple[Node, str]]) -> Node:
        """A PrimitiveNode feeding one widget of several nodes (e.g. the same seed and steps)."""
        kind, _ = input_spec(self.info[targets[0][0].type], targets[0][1])
        values = [value, "fixed"] if kind in ("INT", "FLOAT") else [value]
        node = Node(len(self.nodes) + 1, "PrimitiveNode", column, title, 240, 58 + WIDGET_H * len(values),
                    values=values, properties={"Run widget replace on values": False})
        node.outputs = [{"name": kind, "type": kind, "links": [], "widget": {"name": targets[0][1]}}]
        self.nodes.append(node)
        for target, name in targets:
            target.set_value(name, value)
            target.inputs.append({"name": name, "type": kind, "widget": {"name": name}, "link": None})
            self.connect(node, 0, target, name)
        return node

    def connect(self, src: Node, out, dst: Node, input_name: str) -> None:
        slot = src.slot(out)
        index = next((i for i, inp in enumerate(dst.inputs) if inp["name"] == input_name), None)
        if index is None:
            raise KeyError(f"{dst.type} has no socket input {input_name!r}")
        if dst.inputs[index]["link"] is not None:
            raise ValueError(f"{dst.type}.{input_name} is already connected")
        link_id = len(self.links) + 1
        kind = src.outputs[slot]["type"]
        self.links.append([link_id, src.id, slot, dst.id, index, kind])
        src.outputs[slot]["links"].append(link_id)
        dst.inputs[index]["link"] = link_id

    def group(self, title: str, nodes: list[Node], color: str = "#3f789e") -> None:
        self.groups.append({"title": title, "nodes": nodes, "color": color})

    def _layout(self) -> None:
        columns = sorted({n.column for n in self.nodes})
        x = MARGIN
        for col in columns:
            members = [n for n in self.nodes if n.column == col]
            y = MARGIN + TITLE_H
            for n in members:
                n.pos = (x, y)
                y += n.height + TITLE_H + ROW_GAP
            x += max(n.width for n in members) + COL_GAP

    def to_json(self) -> dict:
        for n in self.nodes:
            n.finish()
        self._layout()
        order = _execution_order(self.nodes, self.links)
        nodes = []
        for n in self.nodes:
            out = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": [n.width, n.height], "flags": {},
                   "order": order[n.id], "mode": 0, "inputs": n.inputs,
                   "outputs": [{**o, "slot_index": i} for i, o in enumerate(n.outputs)],
                   "properties": n.properties, "widgets_values": n.values}
            if n.title:
                out["title"] = n.title
            if n.color:
                out["color"], out["bgcolor"] = n.color
            nodes.append(out)
        groups = []
        for i, g in enumerate(self.groups, 1):
            x0 = min(n.pos[0] for n in g["nodes"]) - 20
            y0 = min(n.pos[1] for n in g["nodes"]) - TITLE_H - 44
            x1 = max(n.pos[0] + n.width for n in g["nodes"]) + 20
            y1 = max(n.pos[1] + n.height for n in g["nodes"]) + 20
            groups.append({"id": i, "title": g["title"], "bounding": [x0, y0, x1 - x0, y1 - y0], "color": g["color"],
                           "font_size": 24, "flags": {}})
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-accel/" + self.name)), "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": nodes, "links": self.links, "groups": groups, "config": {},
                "extra": {"ds": {"scale": 0.75, "offset": [0, 0]}}, "version": 0.4}


def _execution_order(nodes: list[Node], links: list[list]) -> dict[int, int]:
    """A topological order (LiteGraph's "order" field), stable by node id."""
    deps = {n.id: set() for n in nodes}
    for _, src, _, dst, _, _ in links:
        deps[dst].add(src)
    order, done = {}, set()
    while len(done) < len(nodes):
        ready = sorted(i for i, d in deps.items() if i not in done and d <= done)
        for i in ready:
            order[i] = len(order)
            done.add(i)
    return order


# --- the workflows -------------------------------------------------------------------------

@dataclass
class Workflow:
    name: str            # file name without .json
    build: callable      # (Graph) -> None
    needs: tuple         # our node ids it uses (skipped until all are registered)


def cache_calibrate_wan22(g: Graph) -> None:
    """Cache Calibrate -> TeaCache on Wan 2.2 TI2V 5B, which has no published coefficients."""
    g.note(0, "What this does", (
        "Step caching for a model with no published TeaCache coefficients: Wan 2.2 TI2V 5B, text to video.\n\n"
        "1. Cache Calibrate runs ONE real, uncached sampling pass with your prompt and settings, records how "
        "much the first block's input and the model's output change at every step, fits TeaCache's rescale "
        "polynomial and picks the threshold that reaches 'target_speedup' (2x). The profile is also saved "
        "as JSON under output/accel_cache/.\n"
        "2. TeaCache uses that profile; the KSampler then skips about half of the model evaluations.\n"
        "3. Cache Report shows what was skipped (steps computed / reused, bound speedup); the calibration "
        "report and its fit plot are shown too.\n\n"
        "Needs (ComfyUI/models/...):\n"
        "  diffusion_models/wan2.2_ti2v_5B_fp16.safetensors\n"
        "  text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors\n"
        "  vae/wan2.2_vae.safetensors\n\n"
        "Expect: two videos in output/video/: 'accel_reference' (the uncached calibration run) and "
        "'accel_teacache' (about 2x fewer model evaluations, very close to the reference). Calibrate "
        "once per model and step count; afterwards keep the profile (or re-run with the same settings, "
        "ComfyUI caches it) and sample as often as you like. Seed and steps are shared by both samplers "
        "(the two primitive nodes)."), width=440)
    unet = g.add("UNETLoader", 0, unet_name="wan2.2_ti2v_5B_fp16.safetensors", weight_dtype="default")
    clip = g.add("CLIPLoader", 0, clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", type="wan", device="default")
    vae = g.add("VAELoader", 0, vae_name="wan2.2_vae.safetensors")

    shift = g.add("ModelSamplingSD3", 1, shift=8.0)
    pos = g.add("CLIPTextEncode", 1, title="Positive prompt", color=POSITIVE_COLOR, node_width=360,
                text="A red fox trotting through fresh snow in a pine forest at sunrise, soft light, tracking shot.")
    neg = g.add("CLIPTextEncode", 1, title="Negative prompt", color=NEGATIVE_COLOR, node_width=360,
                text="blurry, low quality, static, distorted")
    latent = g.add("Wan22ImageToVideoLatent", 1, width=1280, height=704, length=121, batch_size=1)
    g.connect(unet, 0, shift, "model")
    g.connect(clip, 0, pos, "clip")
    g.connect(clip, 0, neg, "clip")
    g.connect(vae, 0, latent, "vae")

    calib = g.add("AccelCacheCalibrate", 2, color=ACCEL_COLOR, cfg=5.0, sampler_name="uni_pc", scheduler="simple",
                  denoise=1.0, target_speedup=2.0)
    for src, name in ((shift, "model"), (pos, "positive"), (neg, "negative"), (latent, "latent_image")):
        g.connect(src, 0, calib, name)
    tea = g.add("AccelTeaCache", 3, color=ACCEL_COLOR, node_width=380)
    g.connect(shift, 0, tea, "model")
    g.connect(calib, 0, tea, "profile")          # Cache Calibrate outputs: profile, latent, report, plot
    calib_text = g.add("PreviewAny", 3, title="Calibration report", node_width=380, node_height=240)
    calib_plot = g.add("PreviewImage", 3, title="Calibration fit", node_width=380, node_height=300)
    g.connect(calib, 2, calib_text, "source")
    g.connect(calib, 3, calib_plot, "images")

    sampler = g.add("KSampler", 4, cfg=5.0, sampler_name="uni_pc", scheduler="simple", denoise=1.0, node_width=380)
    for src, name in ((tea, "model"), (pos, "positive"), (neg, "negative"), (latent, "latent_image")):
        g.connect(src, 0, sampler, name)
    g.primitive(1, "seed (both samplers)", 42, [(calib, "seed"), (sampler, "seed")])
    g.primitive(1, "steps (both samplers)", 20, [(calib, "steps"), (sampler, "steps")])
    report = g.add("AccelCacheReport", 4, color=ACCEL_COLOR, node_width=380, node_height=420)
    g.connect(tea, 0, report, "model")
    g.connect(sampler, 0, report, "latent")

    for src, slot, name in ((sampler, 0, "teacache"), (calib, 1, "reference")):
        decode = g.add("VAEDecode", 5, node_width=300)
        g.connect(src, slot, decode, "samples")
        g.connect(vae, 0, decode, "vae")
        video = g.add("CreateVideo", 5, node_width=300, fps=24.0)
        g.connect(decode, 0, video, "images")
        save = g.add("SaveVideo", 5, title=f"Save video ({name})", node_width=300,
                     filename_prefix=f"video/accel_{name}")
        g.connect(video, 0, save, "video")


def hunyuan_sparse_teacache(g: Graph) -> None:
    """HunyuanVideo text to video with radial sparse attention and TeaCache."""
    g.note(0, "What this does", (
        "HunyuanVideo text to video, made cheaper twice over:\n"
        "- Sparse Attention (radial): each block of video tokens attends to the key blocks within a window "
        "that narrows with the distance between frames, 25% of them ('density'); text tokens stay dense. "
        "Attention is most of HunyuanVideo's work at 480p and above, so this is where long videos gain.\n"
        "- TeaCache with HunyuanVideo's published coefficients ('auto', threshold -1 = 0.15, about 1.6-2x): "
        "steps whose first-block input barely changed reuse the cached residual of all blocks.\n"
        "The two compose: steps TeaCache computes run with sparse attention.\n\n"
        "Needs (ComfyUI/models/...):\n"
        "  diffusion_models/hunyuan_video_t2v_720p_bf16.safetensors\n"
        "  text_encoders/clip_l.safetensors\n"
        "  text_encoders/llava_llama3_fp8_scaled.safetensors\n"
        "  vae/hunyuan_video_vae_bf16.safetensors\n\n"
        "Expect: a 73-frame 848x480 video in output/video/ ('accel_hunyuan'). Sparse Attention Report shows "
        "the density kept and the error against exact attention per layer and head (heat maps); Cache Report "
        "shows the steps computed and reused. Set density to 1.0 and threshold to 0 to get the plain model "
        "for a side-by-side comparison (same seed). Sequences under 'min_tokens' stay dense."), width=440)
    unet = g.add("UNETLoader", 0, unet_name="hunyuan_video_t2v_720p_bf16.safetensors", weight_dtype="default")
    clip = g.add("DualCLIPLoader", 0, clip_name1="clip_l.safetensors", clip_name2="llava_llama3_fp8_scaled.safetensors",
                 type="hunyuan_video", device="default")
    vae = g.add("VAELoader", 0, vae_name="hunyuan_video_vae_bf16.safetensors")

    shift = g.add("ModelSamplingSD3", 1, shift=7.0)
    pos = g.add("CLIPTextEncode", 1, title="Prompt", color=POSITIVE_COLOR, node_width=360,
                text="A paper boat drifting down a rain-soaked city street at night, neon reflections, slow camera "
                     "pan.")
    guidance = g.add("FluxGuidance", 1, guidance=6.0)
    no_neg = g.add("ConditioningZeroOut", 1, title="No negative (cfg 1)")
    latent = g.add("EmptyHunyuanLatentVideo", 1, width=848, height=480, length=73, batch_size=1)
    g.connect(unet, 0, shift, "model")
    g.connect(clip, 0, pos, "clip")
    g.connect(pos, 0, guidance, "conditioning")
    g.connect(pos, 0, no_neg, "conditioning")

    sparse = g.add("AccelSparseAttention", 2, color=ACCEL_COLOR, node_width=340, policy="radial", density=0.25)
    g.connect(shift, 0, sparse, "model")
    tea = g.add("AccelTeaCache", 3, color=ACCEL_COLOR, node_width=340)
    g.connect(sparse, 0, tea, "model")
    sampler = g.add("KSampler", 3, node_width=340, seed=7, steps=30, cfg=1.0, sampler_name="euler",
                    scheduler="simple", denoise=1.0)
    for src, name in ((tea, "model"), (guidance, "positive"), (no_neg, "negative"), (latent, "latent_image")):
        g.connect(src, 0, sampler, name)

    sparse_report = g.add("AccelSparseAttentionReport", 4, color=ACCEL_COLOR, node_width=380)
    g.connect(tea, 0, sparse_report, "model")
    g.connect(sampler, 0, sparse_report, "latent")
    cache_report = g.add("AccelCacheReport", 4, color=ACCEL_COLOR, node_width=380, node_height=400)
    g.connect(tea, 0, cache_report, "model")
    g.connect(sampler, 0, cache_report, "latent")
    text = g.add("PreviewAny", 5, title="Sparse attention report", node_width=380, node_height=240)
    maps = g.add("PreviewImage", 5, title="Density and error heat maps", node_width=380, node_height=380)
    g.connect(sparse_report, 0, text, "source")
    g.connect(sparse_report, 1, maps, "images")

    decode = g.add("VAEDecodeTiled", 6, node_width=300, tile_size=256, overlap=64, temporal_size=64,
                   temporal_overlap=8)
    g.connect(sampler, 0, decode, "samples")
    g.connect(vae, 0, decode, "vae")
    video = g.add("CreateVideo", 6, node_width=300, fps=24.0)
    g.connect(decode, 0, video, "images")
    save = g.add("SaveVideo", 6, node_width=300, filename_prefix="video/accel_hunyuan")
    g.connect(video, 0, save, "video")


WAN21_FILES = ("  diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors\n"
               "  text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors\n"
               "  vae/wan_2.1_vae.safetensors\n")
WAN21_PROMPT = "A hummingbird hovering at a red flower in slow motion, garden background softly out of focus."
WAN21_NEGATIVE = "blurry, low quality, static, distorted, watermark"


def _wan21_inputs(g: Graph, model: Node, column: int = 1) -> tuple[Node, Node, Node, Node, Node]:
    """Text encoder, VAE, shift, prompts and empty latent of a Wan 2.1 1.3B text-to-video run.
    Returns (shift, positive, negative, latent, vae); the shift takes ``model``."""
    clip = g.add("CLIPLoader", 0, clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", type="wan", device="default")
    vae = g.add("VAELoader", 0, vae_name="wan_2.1_vae.safetensors")
    shift = g.add("ModelSamplingSD3", column, shift=8.0)
    pos = g.add("CLIPTextEncode", column, title="Positive prompt", color=POSITIVE_COLOR, node_width=360,
                text=WAN21_PROMPT)
    neg = g.add("CLIPTextEncode", column, title="Negative prompt", color=NEGATIVE_COLOR, node_width=360,
                text=WAN21_NEGATIVE)
    latent = g.add("EmptyHunyuanLatentVideo", column, width=832, height=480, length=33, batch_size=1)
    g.connect(model, 0, shift, "model")
    g.connect(clip, 0, pos, "clip")
    g.connect(clip, 0, neg, "clip")
    return shift, pos, neg, latent, vae


def _save_video(g: Graph, column: int, samples: Node, vae: Node, prefix: str, fps: float = 16.0) -> None:
    decode = g.add("VAEDecode", column, node_width=300)
    g.connect(samples, 0, decode, "samples")
    g.connect(vae, 0, decode, "vae")
    video = g.add("CreateVideo", column, node_width=300, fps=fps)
    g.connect(decode, 0, video, "images")
    save = g.add("SaveVideo", column, node_width=300, filename_prefix=prefix)
    g.connect(video, 0, save, "video")


def _show(g: Graph, column: int, src: Node, text_slot: int | None, plot_slot: int | None, title: str,
          width: int = 360) -> None:
    """Preview nodes for a report (text) and its plot (image)."""
    if text_slot is not None:
        text = g.add("PreviewAny", column, title=f"{title} report", node_width=width, node_height=220)
        g.connect(src, text_slot, text, "source")
    if plot_slot is not None:
        plot = g.add("PreviewImage", column, title=f"{title} plot", node_width=width, node_height=300)
        g.connect(src, plot_slot, plot, "images")


def wan21_quant_sparse_taylor(g: Graph) -> None:
    """Wan 2.1 text to video: int8 quantization -> svg2 sparse attention -> TaylorSeer -> sampler."""
    g.note(0, "What this does", (
        "Wan 2.1 1.3B text to video with three accelerations chained on the MODEL:\n"
        "1. Quantize Model (int8): the linear layers get int8 weights and per-token int8 activations "
        "(SmoothQuant 0.5, calibrated on your prompt in a short 8-step run first); fragile layers stay in 16-bit. "
        "Linear weights about 2x smaller than bf16; the report lists every layer's SQNR.\n"
        "2. Sparse Attention (svg2): queries and keys are clustered (k-means); each query cluster keeps the key "
        "blocks holding 90% of its estimated attention mass, at most 25% of them.\n"
        "3. TaylorSeer: the model runs fully on the first 3 steps and then every 3rd step; the steps between are "
        "forecast (first order) from the last computed ones.\n\n"
        "Needs (ComfyUI/models/...):\n" + WAN21_FILES + "\n"
        "Expect: a 33-frame 832x480 video in output/video/ ('accel_wan21'), the quantization report and its "
        "per-layer SQNR plot, the sparse attention report and heat maps, and the Cache Report (computed and "
        "forecast steps). Bypass any of the three nodes (Ctrl+B) to compare with the same seed."), width=440)
    unet = g.add("UNETLoader", 0, unet_name="wan2.1_t2v_1.3B_fp16.safetensors", weight_dtype="default")
    shift, pos, neg, latent, vae = _wan21_inputs(g, unet)

    quant = g.add("AccelQuantizeModel", 2, color=ACCEL_COLOR, node_width=360, format="int8", seed=11, cfg=6.0)
    for src, name in ((shift, "model"), (pos, "positive"), (neg, "negative"), (latent, "latent")):
        g.connect(src, 0, quant, name)
    sparse = g.add("AccelSparseAttention", 3, color=ACCEL_COLOR, node_width=340, policy="svg2", density=0.25,
                   top_p=0.9)
    g.connect(quant, 0, sparse, "model")
    taylor = g.add("AccelTaylorSeer", 3, color=ACCEL_COLOR, node_width=340, interval=3, order=1, warmup_steps=3)
    g.connect(sparse, 0, taylor, "model")
    sampler = g.add("KSampler", 4, node_width=340, seed=11, steps=30, cfg=6.0, sampler_name="uni_pc",
                    scheduler="simple", denoise=1.0)
    for src, name in ((taylor, "model"), (pos, "positive"), (neg, "negative"), (latent, "latent_image")):
        g.connect(src, 0, sampler, name)
    _show(g, 4, quant, 1, 2, "Quantization", width=340)

    sparse_report = g.add("AccelSparseAttentionReport", 5, color=ACCEL_COLOR, node_width=360)
    g.connect(taylor, 0, sparse_report, "model")
    g.connect(sampler, 0, sparse_report, "latent")
    _show(g, 5, sparse_report, 0, 1, "Sparse attention")
    cache_report = g.add("AccelCacheReport", 5, color=ACCEL_COLOR, node_width=360, node_height=380)
    g.connect(taylor, 0, cache_report, "model")
    g.connect(sampler, 0, cache_report, "latent")
    _save_video(g, 6, sampler, vae, "video/accel_wan21")


def sdxl_auto_quant_cache(g: Graph) -> None:
    """SDXL: Quantize Model (auto, memory budget) + TaylorSeer."""
    g.note(0, "What this does", (
        "SDXL base text to image within a memory budget, with step caching:\n"
        "1. Quantize Model (format auto): a short calibration run on your prompt measures how sensitive every "
        "linear layer is; then each layer gets the format (int8, w4a8, int4 or 16-bit) that keeps the quantizable "
        "layers within 35% of their bf16 size ('auto_budget', about 5.6 bits per weight) with the least error. "
        "The report lists each layer's format and SQNR.\n"
        "2. TaylorSeer: on a UNet the deep blocks are computed on the first 3 steps and then every 3rd step, and "
        "forecast in between; the outer blocks always run.\n\n"
        "Needs (ComfyUI/models/...):\n"
        "  checkpoints/sd_xl_base_1.0.safetensors\n\n"
        "Expect: a 1024x1024 image in output/ ('accel_sdxl'), the quantization report with its per-layer plot, "
        "and the Cache Report. Lower auto_budget for a smaller model (more 4-bit layers), raise it for "
        "fidelity."), width=420)
    ckpt = g.add("CheckpointLoaderSimple", 0, ckpt_name="sd_xl_base_1.0.safetensors")
    pos = g.add("CLIPTextEncode", 1, title="Positive prompt", color=POSITIVE_COLOR, node_width=360,
                text="A lighthouse on a rocky coast at golden hour, waves, dramatic clouds, detailed oil painting.")
    neg = g.add("CLIPTextEncode", 1, title="Negative prompt", color=NEGATIVE_COLOR, node_width=360,
                text="text, watermark, blurry")
    latent = g.add("EmptyLatentImage", 1, width=1024, height=1024, batch_size=1)
    g.connect(ckpt, 1, pos, "clip")
    g.connect(ckpt, 1, neg, "clip")
    quant = g.add("AccelQuantizeModel", 2, color=ACCEL_COLOR, node_width=360, format="auto", auto_budget=0.35,
                  seed=5, cfg=7.0)
    for src, slot, name in ((ckpt, 0, "model"), (pos, 0, "positive"), (neg, 0, "negative"), (latent, 0, "latent")):
        g.connect(src, slot, quant, name)
    taylor = g.add("AccelTaylorSeer", 3, color=ACCEL_COLOR, node_width=340, interval=3, order=1, warmup_steps=3)
    g.connect(quant, 0, taylor, "model")
    sampler = g.add("KSampler", 3, node_width=340, seed=5, steps=25, cfg=7.0, sampler_name="euler",
                    scheduler="normal", denoise=1.0)
    for src, name in ((taylor, "model"), (pos, "positive"), (neg, "negative"), (latent, "latent_image")):
        g.connect(src, 0, sampler, name)
    _show(g, 4, quant, 1, 2, "Quantization")
    cache_report = g.add("AccelCacheReport", 4, color=ACCEL_COLOR, node_width=360, node_height=360)
    g.connect(taylor, 0, cache_report, "model")
    g.connect(sampler, 0, cache_report, "latent")
    decode = g.add("VAEDecode", 5, node_width=260)
    g.connect(sampler, 0, decode, "samples")
    g.connect(ckpt, 2, decode, "vae")
    save = g.add("SaveImage", 5, node_width=360, node_height=380, filename_prefix="accel_sdxl")
    g.connect(decode, 0, save, "images")


QUANTIZED_WAN = "quantized/wan2.1_t2v_1.3B_int8.safetensors"


def wan21_quantize_save(g: Graph) -> None:
    """Quantize once and save: the first of a pair (the second loads the file)."""
    g.note(0, "What this does", (
        "Quantize once, keep the file (1 of 2): Wan 2.1 1.3B to int8, calibrated on a prompt, saved as "
        f"models/diffusion_models/{QUANTIZED_WAN}.\n"
        "Quantizing takes a while (a calibration run, then a pass over every layer); once saved, "
        "'accel_wan21_quantize_2_load' loads the quantized model directly, in any later session.\n\n"
        "Needs (ComfyUI/models/...):\n"
        "  diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors\n"
        "  text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (for the calibration prompt)\n\n"
        "Expect: the file (linear weights about half their bf16 size), the quantization report and plot, and "
        "the save report. Saving never replaces an existing file unless 'overwrite' is on: delete or rename the "
        "old file to quantize again."), width=420)
    unet = g.add("UNETLoader", 0, unet_name="wan2.1_t2v_1.3B_fp16.safetensors", weight_dtype="default")
    clip = g.add("CLIPLoader", 0, clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", type="wan", device="default")
    shift = g.add("ModelSamplingSD3", 1, shift=8.0)
    pos = g.add("CLIPTextEncode", 1, title="Calibration prompt", color=POSITIVE_COLOR, node_width=360,
                text=WAN21_PROMPT)
    latent = g.add("EmptyHunyuanLatentVideo", 1, width=832, height=480, length=33, batch_size=1)
    g.connect(unet, 0, shift, "model")
    g.connect(clip, 0, pos, "clip")
    quant = g.add("AccelQuantizeModel", 2, color=ACCEL_COLOR, node_width=360, format="int8", cfg=6.0)
    for src, name in ((shift, "model"), (pos, "positive"), (latent, "latent")):
        g.connect(src, 0, quant, name)
    save = g.add("AccelSaveQuantized", 3, color=ACCEL_COLOR, node_width=360,
                 filename=QUANTIZED_WAN.removesuffix(".safetensors"))
    g.connect(quant, 0, save, "model")
    _show(g, 3, save, 0, None, "Save")
    _show(g, 4, quant, 1, 2, "Quantization", width=380)


def wan21_load_quantized(g: Graph) -> None:
    """The second of the pair: load the saved quantized model and sample with it."""
    g.note(0, "What this does", (
        "Quantize once, keep the file (2 of 2): loads the int8 Wan 2.1 1.3B saved by "
        "'accel_wan21_quantize_1_save' and samples with it; no quantization work, about half the weight "
        "memory of bf16.\n\n"
        "Needs (ComfyUI/models/...):\n"
        f"  diffusion_models/{QUANTIZED_WAN} (run accel_wan21_quantize_1_save once)\n"
        "  text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors\n"
        "  vae/wan_2.1_vae.safetensors\n\n"
        "Expect: a 33-frame 832x480 video in output/video/ ('accel_wan21_int8') and the loader's report "
        "(file, quantized layers, formats)."), width=420)
    load = g.add("AccelLoadQuantized", 0, color=ACCEL_COLOR, node_width=360, unet_name=QUANTIZED_WAN)
    shift, pos, neg, latent, vae = _wan21_inputs(g, load)
    sampler = g.add("KSampler", 2, node_width=340, seed=11, steps=30, cfg=6.0, sampler_name="uni_pc",
                    scheduler="simple", denoise=1.0)
    for src, name in ((shift, "model"), (pos, "positive"), (neg, "negative"), (latent, "latent_image")):
        g.connect(src, 0, sampler, name)
    _show(g, 2, load, 1, None, "Load")
    _save_video(g, 3, sampler, vae, "video/accel_wan21_int8")


VQ_IMAGE = "example.png"
VQ_TOKENS_PREFIX = "vq_tokens/accel_example"
VQ_TOKEN_FILE = f"{VQ_TOKENS_PREFIX}_00001_.vqt [output]"


def vq_encode_save(g: Graph) -> None:
    """VQ latent compression (1 of 2): VAE encode -> fit codebook -> encode -> save tokens."""
    g.note(0, "What this does", (
        "VQ latent compression (1 of 2): an image becomes a small file of discrete tokens.\n"
        "1. VAE Encode with the Flux VAE: a 16-channel latent, 8x smaller in each side.\n"
        "2. VQ Fit Codebook: k-means on the latent's vectors (one per latent pixel), 256 codes, 2 residual "
        "levels (8 bits each per latent pixel).\n"
        "3. VQ Encode: each latent pixel becomes the indices of its nearest codes.\n"
        "4. VQ Save Tokens: rANS entropy-coded indices with the codebook in one .vqt file under "
        "output/vq_tokens/.\n\n"
        f"Needs: input/{VQ_IMAGE} (any image: pick one in Load Image), and ComfyUI/models/vae/ae.safetensors\n\n"
        "Expect: the bitrate report (fixed-length, entropy bound, rANS-coded and real file size, in bits per "
        "pixel, against a bf16 latent) with its plot; the codebook report (latent PSNR per residual level); the "
        "encode report (latent PSNR of the tokens). 'accel_vq_latent_2_load_decode' reads the file back into "
        "an image. Each run writes a new file (_00001_, _00002_...). The embedded codebook (about 32 KB) "
        "dominates the file of a small image: turn embed_codebook off and save the codebook once (VQ Save "
        "Codebook) to share it between many token files."), width=420)
    image = g.add("LoadImage", 0, node_width=320, node_height=340, image=VQ_IMAGE)
    vae = g.add("VAELoader", 0, vae_name="ae.safetensors")
    encode = g.add("VAEEncode", 1, node_width=240)
    g.connect(image, 0, encode, "pixels")
    g.connect(vae, 0, encode, "vae")
    fit = g.add("AccelVQFitCodebook", 2, color=ACCEL_COLOR, node_width=340, codebook_size=256, residual_levels=2,
                iterations=10)
    g.connect(encode, 0, fit, "latent")
    vq = g.add("AccelVQEncode", 2, color=ACCEL_COLOR, node_width=340)
    g.connect(encode, 0, vq, "latent")
    g.connect(fit, 0, vq, "codebook")
    g.connect(vae, 0, vq, "vae")
    save = g.add("AccelVQSaveTokens", 2, color=ACCEL_COLOR, node_width=340, filename_prefix=VQ_TOKENS_PREFIX,
                 embed_codebook=True)
    g.connect(vq, 0, save, "tokens")
    _show(g, 3, save, 0, 1, "Bitrate", width=380)
    _show(g, 4, fit, 1, 2, "Codebook", width=380)
    _show(g, 4, vq, 1, None, "Encode", width=380)


def vq_load_decode(g: Graph) -> None:
    """VQ latent compression (2 of 2): load tokens -> VQ decode -> VAE decode."""
    g.note(0, "What this does", (
        "VQ latent compression (2 of 2): a .vqt token file back to an image.\n"
        "1. VQ Load Tokens reads the file saved by 'accel_vq_latent_1_encode_save' and checks it (complete, "
        "undamaged, codebook hash).\n"
        "2. VQ Decode: the codes' sum per latent pixel, i.e. the quantized latent.\n"
        "3. VAE Decode with the same Flux VAE.\n\n"
        "Needs: output/vq_tokens/accel_example_00001_.vqt (run accel_vq_latent_1_encode_save once; pick another "
        "file in VQ Load Tokens), and ComfyUI/models/vae/ae.safetensors\n\n"
        "Expect: the decoded image in output/ ('accel_vq_decoded'), close to the original (the encode report "
        "of workflow 1 gives its latent PSNR), and the load report with the file's size in bits per pixel. Set "
        "residual_levels to 1 in VQ Decode to see what the first level alone gives."), width=420)
    tokens = g.add("AccelVQLoadTokens", 0, color=ACCEL_COLOR, node_width=380, token_file=VQ_TOKEN_FILE)
    vae = g.add("VAELoader", 0, vae_name="ae.safetensors")
    decode = g.add("AccelVQDecode", 1, color=ACCEL_COLOR, node_width=300)
    g.connect(tokens, 0, decode, "tokens")
    _show(g, 1, tokens, 1, None, "Load", width=380)
    image = g.add("VAEDecode", 2, node_width=260)
    g.connect(decode, 0, image, "samples")
    g.connect(vae, 0, image, "vae")
    save = g.add("SaveImage", 3, node_width=380, node_height=400, filename_prefix="accel_vq_decoded")
    g.connect(image, 0, save, "images")


def flux_svdquant_teacache(g: Graph) -> None:
    """Flux text to image: SVD Low-Rank Branch -> Quantize Model (W4A4) -> TeaCache -> sampler."""
    g.note(0, "What this does", (
        "FLUX.1 dev text to image with 4-bit weights and activations (SVDQuant) and step caching:\n"
        "1. SVD Low-Rank Branch: a short calibration run on your prompt measures each attention/MLP layer's "
        "input channels; SmoothQuant (alpha 0.5) moves activation outliers into the weights, and an SVD "
        "keeps the top 32 directions of each smoothed weight as a 16-bit branch.\n"
        "2. Quantize Model (w4a4): only what the branch left (the residual) gets 4-bit weights, and the "
        "activations 4 bits per token, with the branch's smoothing (its own smooth_alpha is 0); the branch runs "
        "beside it (fused into the same pass).\n"
        "3. TeaCache with Flux's published coefficients: steps whose first-block input barely changed "
        "reuse the cached residual of all blocks.\n\n"
        "Needs (ComfyUI/models/...):\n"
        "  diffusion_models/flux1-dev.safetensors\n"
        "  text_encoders/clip_l.safetensors\n"
        "  text_encoders/t5xxl_fp16.safetensors\n"
        "  vae/ae.safetensors\n\n"
        "Expect: a 1024x1024 image in output/ ('accel_flux'); the SVD report (energy in the branch, SQNR of "
        "plain 4-bit against branch + 4-bit residual per layer) with its plot, the quantization report and "
        "the Cache Report. Bypass SVD Low-Rank Branch (Ctrl+B) to see plain W4A4 with the same seed."),
        width=440)
    unet = g.add("UNETLoader", 0, unet_name="flux1-dev.safetensors", weight_dtype="default")
    clip = g.add("DualCLIPLoader", 0, clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors",
                 type="flux", device="default")
    vae = g.add("VAELoader", 0, vae_name="ae.safetensors")
    pos = g.add("CLIPTextEncode", 1, title="Prompt", color=POSITIVE_COLOR, node_width=360,
                text="A red vintage bicycle leaning against a blue wooden door, morning sunlight, film photo.")
    guidance = g.add("FluxGuidance", 1, guidance=3.5)
    no_neg = g.add("ConditioningZeroOut", 1, title="No negative (cfg 1)")
    latent = g.add("EmptySD3LatentImage", 1, width=1024, height=1024, batch_size=1)
    g.connect(clip, 0, pos, "clip")
    g.connect(pos, 0, guidance, "conditioning")
    g.connect(pos, 0, no_neg, "conditioning")

    svd = g.add("AccelSVDLowRankBranch", 2, color=ACCEL_COLOR, node_width=360, rank=32, smooth_alpha=0.5,
                report_format="w4a4", seed=3, cfg=1.0)
    for src, name in ((unet, "model"), (guidance, "positive"), (no_neg, "negative"), (latent, "latent")):
        g.connect(src, 0, svd, name)
    quant = g.add("AccelQuantizeModel", 3, color=ACCEL_COLOR, node_width=340, format="w4a4", group_size=64,
                  smooth_alpha=0.0)   # the branched layers carry SVD Low-Rank Branch's smoothing
    g.connect(svd, 0, quant, "model")
    tea = g.add("AccelTeaCache", 3, color=ACCEL_COLOR, node_width=340)
    g.connect(quant, 0, tea, "model")
    sampler = g.add("KSampler", 4, node_width=340, seed=3, steps=20, cfg=1.0, sampler_name="euler",
                    scheduler="simple", denoise=1.0)
    for src, name in ((tea, "model"), (guidance, "positive"), (no_neg, "negative"), (latent, "latent_image")):
        g.connect(src, 0, sampler, name)
    _show(g, 4, svd, 1, 2, "SVD", width=340)
    _show(g, 5, quant, 1, 2, "Quantization")
    cache_report = g.add("AccelCacheReport", 6, color=ACCEL_COLOR, node_width=360, node_height=380)
    g.connect(tea, 0, cache_report, "model")
    g.connect(sampler, 0, cache_report, "latent")
    decode = g.add("VAEDecode", 6, node_width=260)
    g.connect(sampler, 0, decode, "samples")
    g.connect(vae, 0, decode, "vae")
    save = g.add("SaveImage", 7, node_width=380, node_height=400, filename_prefix="accel_flux")
    g.connect(decode, 0, save, "images")


WORKFLOWS = [
    Workflow("accel_flux_svdquant_teacache", flux_svdquant_teacache,
             ("AccelSVDLowRankBranch", "AccelQuantizeModel", "AccelTeaCache", "AccelCacheReport")),
    Workflow("accel_hunyuan_sparse_teacache", hunyuan_sparse_teacache,
             ("AccelSparseAttention", "AccelSparseAttentionReport", "AccelTeaCache", "AccelCacheReport")),
    Workflow("accel_cache_calibrate_wan22", cache_calibrate_wan22,
             ("AccelCacheCalibrate", "AccelTeaCache", "AccelCacheReport")),
    Workflow("accel_wan21_quant_sparse_taylorseer", wan21_quant_sparse_taylor,
             ("AccelQuantizeModel", "AccelSparseAttention", "AccelSparseAttentionReport", "AccelTaylorSeer",
              "AccelCacheReport")),
    Workflow("accel_sdxl_auto_quant_taylorseer", sdxl_auto_quant_cache,
             ("AccelQuantizeModel", "AccelTaylorSeer", "AccelCacheReport")),
    Workflow("accel_wan21_quantize_1_save", wan21_quantize_save, ("AccelQuantizeModel", "AccelSaveQuantized")),
    Workflow("accel_wan21_quantize_2_load", wan21_load_quantized, ("AccelLoadQuantized",)),
    Workflow("accel_vq_latent_1_encode_save", vq_encode_save,
             ("AccelVQFitCodebook", "AccelVQEncode", "AccelVQSaveTokens")),
    Workflow("accel_vq_latent_2_load_decode", vq_load_decode, ("AccelVQLoadTokens", "AccelVQDecode")),
]


def build_all(object_info: dict, out_dir: Path = WORKFLOWS_DIR) -> tuple[list[Path], list[str]]:
    """Write every workflow whose nodes exist; return (written files, skipped with reason)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for wf in WORKFLOWS:
        absent = [n for n in wf.needs if n not in object_info]
        if absent:
            skipped.append(f"{wf.name}: waits for {', '.join(absent)}")
            continue
        g = Graph(object_info, wf.name)
        wf.build(g)
        path = out_dir / f"{wf.name}.json"
        path.write_text(json.dumps(g.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(path)
    return written, skipped


def _stand_in_files(server: ComfyServer) -> None:
    """Stand-ins for the files the workflows name, so that the loaders offer them and the frontend
    marks no node as missing its model (1.49 outlines such nodes in red and shows an error
    overlay). Nothing runs: the model files stay empty; the input image is a real picture, which
    Load Image previews."""
    models = {f"{directory}/{name}" for name, (directory, _) in MODELS.items()}
    models.add(f"diffusion_models/{QUANTIZED_WAN}")
    for relative in models:
        (server.models_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (server.models_dir / relative).touch()
    tokens = server.output_dir / VQ_TOKEN_FILE.removesuffix(" [output]")
    tokens.parent.mkdir(parents=True, exist_ok=True)
    tokens.touch()
    write_fixture_image(server.base / "input" / VQ_IMAGE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--screenshots", action="store_true", help=f"also render each into {SCREENSHOT_DIR}/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server = ComfyServer(fixture_nodes=False)
    try:
        if args.screenshots:
            _stand_in_files(server)
        server.start()
        written, skipped = build_all(server.object_info())
        for path in written:
            log.info("wrote %s", path.relative_to(PACK_ROOT))
        for line in skipped:
            log.info("skipped %s", line)
        if args.screenshots:
            from lab.browser import Frontend
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            with Frontend(server, for_screenshots=True) as fe:
                for path in written:
                    shot = SCREENSHOT_DIR / f"{path.stem}.png"
                    fe.load(json.loads(path.read_text()), name=path.name)
                    fe.screenshot(shot)
                    log.info("wrote %s", shot.relative_to(PACK_ROOT))
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
