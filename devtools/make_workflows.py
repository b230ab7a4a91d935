"""Writes ``example_workflows/*.json`` (ComfyUI's UI format) from the descriptions below.

    python -m comfyui_accel.devtools.make_workflows [--screenshots]

Workflows are built in code so ids, links and layout stay consistent: nodes are placed in
columns from left to right (model -> our nodes -> sampler -> decode -> save), stacked without
overlap, with a Note at the top left saying what the workflow does, what it needs and what to
expect. Widget values are laid out from the server's ``/object_info`` exactly as the frontend
reads them (``workflows.widget_slots``), defaults filled in for what a workflow leaves out.

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

from .host import PACK_ROOT, ComfyServer
from .workflows import WIDGET_TYPES, WORKFLOWS_DIR, input_spec, widget_slots

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
    height: int = 0
    values: list = field(default_factory=list)
    inputs: list = field(default_factory=list)       # socket inputs: {"name", "type", "link", ...}
    outputs: list = field(default_factory=list)      # {"name", "type", "links"}
    color: tuple | None = None
    properties: dict = field(default_factory=dict)
    pos: tuple = (0, 0)

    def slot(self, name_or_index) -> int:
        if isinstance(name_or_index, int):
            return name_or_index
        for i, out in enumerate(self.outputs):
            if out["name"] == name_or_index:
                return i
        raise KeyError(f"{self.type} has no output {name_or_index!r}")


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
        node = Node(len(self.nodes) + 1, node_type, column, title, node_width, color=color,
                    properties={"Node name for S&R": node_type})
        order = info.get("input_order") or {}
        names = [n for section in ("required", "optional") for n in order.get(section, [])]
        unknown = set(values) - set(names)
        if unknown:
            raise KeyError(f"{node_type} has no input(s) {sorted(unknown)}")
        multiline = 0
        for name in names:
            kind, opts = input_spec(info, name)
            if kind not in WIDGET_TYPES or opts.get("forceInput"):
                optional = name in order.get("optional", [])
                node.inputs.append({"name": name, "type": kind, "link": None, **({"shape": 7} if optional else {})})
            elif kind == "STRING" and opts.get("multiline"):
                multiline += 1
        for slot in widget_slots(info):
            if slot is None:                     # control_after_generate: keep seeds as written
                node.values.append("fixed")
                continue
            _, opts = input_spec(info, slot)
            if slot in values:
                node.values.append(values[slot])
            elif "default" in opts:
                node.values.append(opts["default"])
            elif opts.get("options"):
                node.values.append(opts["options"][0])
            else:
                raise KeyError(f"{node_type}.{slot} has no default; give a value")
        for name in values:
            model = MODELS.get(values[name]) if isinstance(values[name], str) else None
            if model:
                node.properties.setdefault("models", []).append(
                    {"name": values[name], "url": model[1], "directory": model[0]})
        node.outputs = [{"name": name, "type": kind, "links": []}
                        for kind, name in zip(info["output"], info.get("output_name") or info["output"])]
        n_widgets = sum(1 for s in widget_slots(info))
        rows = max(len(node.inputs), len(node.outputs))
        node.height = max(node_height, rows * SLOT_H + n_widgets * WIDGET_H + multiline * 90 + 16)
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
            slots = widget_slots(self.info[target.type])
            target.values[slots.index(name)] = value
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


WORKFLOWS = [
    Workflow("accel_hunyuan_sparse_teacache", hunyuan_sparse_teacache,
             ("AccelSparseAttention", "AccelSparseAttentionReport", "AccelTeaCache", "AccelCacheReport")),
    Workflow("accel_cache_calibrate_wan22", cache_calibrate_wan22,
             ("AccelCacheCalibrate", "AccelTeaCache", "AccelCacheReport")),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--screenshots", action="store_true", help=f"also render each into {SCREENSHOT_DIR}/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server = ComfyServer(fixture_nodes=False)
    try:
        server.start()
        written, skipped = build_all(server.object_info())
        for path in written:
            log.info("wrote %s", path.relative_to(PACK_ROOT))
        for line in skipped:
            log.info("skipped %s", line)
        if args.screenshots:
            from .browser import Frontend
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
