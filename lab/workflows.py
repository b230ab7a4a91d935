"""Example workflows: UI format -> API prompt, standard model files -> fixtures, run and check.

``example_workflows/*.json`` are in ComfyUI's UI (LiteGraph) format, the files people share and
open in the frontend. To run one over the HTTP API it must become an API prompt, as the
frontend's ``graphToPrompt`` makes it: ``to_api`` does that with the server's ``/object_info``
(which widget value belongs to which input, links, Note/Reroute/PrimitiveNode, muted and
bypassed nodes).

The workflows name the model files people have (``flux1-dev.safetensors``...). When those are
not in the server's model folders, ``map_to_fixtures`` swaps them for the tiny random-weight
fixtures: the diffusion model for the family's fixture, text encoders + CLIPTextEncode for
``AccelTestConditioning``, the VAE for a random-weight tiny autoencoder (TAESD/TAEHV, real
ComfyUI classes the stock VAELoader loads), and the latent size for the fixture's. When every
file a workflow names is present (a user's own ComfyUI), nothing is mapped.

Used by the tests, ``make demo`` and ``lab/make_workflows.py``.
"""
from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

from lab import fixtures

PACK_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = PACK_ROOT / "example_workflows"

# V3's DynamicCombo: a combo whose chosen option brings its own inputs (SaveVideo's format on 0.33).
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
# Frontend-only nodes: never sent to the server.
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MODE_MUTED, MODE_BYPASS = 2, 4


class WorkflowError(ValueError):
    """A workflow that cannot be converted or mapped, said so a person can fix it."""


def load(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def example_workflows() -> list[Path]:
    return sorted(WORKFLOWS_DIR.glob("*.json"))


def comfyui_templates() -> dict[str, Path]:
    """ComfyUI's own workflow templates, installed with it: template id -> its JSON file.

    Where the files live moved (0.3.75: in the media bundles; 0.33: in
    ``comfyui_workflow_templates_json``); the templates package's own resolver knows which
    layout is installed. Empty when the package is not installed.
    """
    try:
        import comfyui_workflow_templates_core
    except ImportError:
        return {}
    found = {}
    for entry in comfyui_workflow_templates_core.iter_templates():
        name = f"{entry.template_id}.json"
        if any(asset.filename == name for asset in entry.assets):
            try:
                found[entry.template_id] = Path(comfyui_workflow_templates_core.get_asset_path(entry.template_id, name))
            except FileNotFoundError:      # its bundle is not installed
                continue
    return found


# --- UI format -> API prompt ---------------------------------------------------------------

def _kind(spec: list) -> tuple[str, dict]:
    """(type, options) of an input spec in /object_info form; type "COMBO" for a list of choices."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
    if isinstance(kind, list):
        return "COMBO", {**opts, "options": kind}
    return kind, opts


def input_spec(node_info: dict, name: str) -> tuple[str, dict]:
    """(type, options) of one top-level input of a node; type "COMBO" for a list of choices."""
    for section in ("required", "optional"):
        spec = node_info["input"].get(section, {}).get(name)
        if spec is not None:
            return _kind(spec)
    raise KeyError(name)


def is_widget(kind: str, opts: dict) -> bool:
    return kind in WIDGET_TYPES and not opts.get("forceInput")


@dataclasses.dataclass(frozen=True)
class Widget:
    """One value in a node's ``widgets_values``."""
    name: str | None        # the input it sets; None for a frontend-only control or upload widget
    owner: str              # the node's input it belongs to: its own, the one a control or upload widget
                            # follows, or the DynamicCombo whose option brought it
    optional: bool          # its input is optional, or it belongs to an optional one
    default: object         # what the frontend shows when a workflow gives no value
    kind: str = ""          # the input's type ("INT", "COMBO", DYNAMIC_COMBO...); "" for a control or upload
    choices: tuple = ()     # a combo's choices, a DynamicCombo's option keys


def _choices(kind: str, opts: dict) -> tuple:
    if kind == DYNAMIC_COMBO:
        return tuple(option["key"] for option in opts.get("options", []))
    return tuple(opts.get("options") or ()) if kind == "COMBO" else ()


def _default(kind: str, opts: dict, choices: tuple):
    """The frontend's default for a widget (ComfyUI_frontend's widget constructors)."""
    if kind == DYNAMIC_COMBO:            # a plain combo of the option keys, no default of its own
        return choices[0] if choices else None
    if kind == "COMBO":
        return opts.get("default") or (choices[0] if choices else None)
    return opts.get("default", {"INT": 0, "FLOAT": 0, "STRING": "", "BOOLEAN": False}.get(kind))


def widgets(node_info: dict, choose) -> list[tuple[Widget, object]]:
    """A node's widgets in the frontend's ``widgets_values`` order, each with ``choose(widget)``'s value.

    Each widget input (required then optional, in ``input_order``) is one value; an INT with
    ``control_after_generate`` (by default one named seed or noise_seed) is followed by its
    control value ("fixed", "randomize"...), an upload combo by its upload button's value. A
    DynamicCombo is followed by the widgets of the option its value picks, named
    ``<combo>.<input>`` (nested ones likewise): the frontend inserts them right after the combo
    when its value is set, so the values that follow in a file fill them.
    """
    out: list[tuple[Widget, object]] = []

    def walk(entries, owner=None, within_optional=False):
        for name, spec, optional in entries:
            kind, opts = _kind(spec)
            if not is_widget(kind, opts):
                continue
            optional = optional or within_optional
            choices = _choices(kind, opts)
            widget = Widget(name, owner or name, optional, _default(kind, opts, choices), kind, choices)
            value = choose(widget)
            out.append((widget, value))
            if kind == DYNAMIC_COMBO:
                picked = next((o["inputs"] for o in opts.get("options", []) if o["key"] == value), None) or {}
                walk([(f"{name}.{sub}", sub_spec, section == "optional")
                      for section in ("required", "optional") for sub, sub_spec in (picked.get(section) or {}).items()],
                     owner or name, optional)
                continue
            # The frontend gives an INT a control widget when asked, and by default when it is
            # called seed or noise_seed (it does so for other packs' nodes too).
            default_control = kind == "INT" and name in ("seed", "noise_seed")
            extras = int(bool(opts.get("control_after_generate", default_control)))
            extras += int(any(opts.get(flag) for flag in UPLOAD_FLAGS))
            for _ in range(extras):
                extra = Widget(None, owner or name, optional, None)
                out.append((extra, choose(extra)))

    order = node_info.get("input_order") or {s: list(node_info["input"].get(s, {})) for s in ("required", "optional")}
    walk([(name, node_info["input"][section][name], section == "optional")
          for section in ("required", "optional") for name in order.get(section, [])])
    return out


def widget_inputs(node_info: dict, values: list) -> dict:
    """Input name -> value of each widget, for a node the frontend loads with ``widgets_values``.

    As both frontends (1.32 and 1.49) do: values are taken in order; a widget past the end of the
    list keeps its default (a file written for an older ComfyUI lacks the inputs added since);
    values past the last widget are ignored (a file written for a newer ComfyUI).
    """
    remaining = iter(values)
    missing = object()

    def positional(widget: Widget):
        value = next(remaining, missing)
        return widget.default if value is missing else value

    return {w.name: v for w, v in widgets(node_info, positional) if w.name is not None}


def _links(workflow: dict) -> dict[int, tuple[int, int, int, int]]:
    """link id -> (origin node, origin slot, target node, target slot); list or object form."""
    out = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"])
        else:
            out[link[0]] = (link[1], link[2], link[3], link[4])
    return out


def to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt the frontend would queue for this UI-format workflow."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("subgraphs are not supported by this converter; unpack them in the UI first")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = _links(workflow)
    missing = sorted({n["type"] for n in nodes.values() if n["type"] not in VIRTUAL_NODES
                      and n["type"] not in object_info and n.get("mode", 0) != MODE_MUTED})
    if missing:
        raise WorkflowError(f"node types not installed on this server: {', '.join(missing)}")

    def source(link_id, seen=()):
        """Follow a link back to a real output: ("link", [id, slot]), ("value", v) or None."""
        if link_id is None or link_id not in links:
            return None
        origin, slot = links[link_id][:2]
        node = nodes.get(origin)
        if node is None or link_id in seen:
            return None
        seen = (*seen, link_id)
        mode = node.get("mode", 0)
        if node["type"] == "PrimitiveNode":
            return ("value", node["widgets_values"][0])
        if node["type"] == "Reroute":
            return source(node["inputs"][0].get("link"), seen)
        if mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASS:
            # The frontend passes a bypassed node's output on from its input of the same type.
            out_type = node["outputs"][slot]["type"]
            inputs = node.get("inputs", [])
            same = [i for i, inp in enumerate(inputs) if inp.get("type") == out_type and inp.get("link") is not None]
            pick = slot if slot in same else (same[0] if same else None)
            return None if pick is None else source(inputs[pick]["link"], seen)
        return ("link", [str(origin), slot])

    prompt = {}
    for node in sorted(nodes.values(), key=lambda n: n["id"]):
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info[node["type"]]
        inputs: dict = {}
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if k in input_names(info)})
        else:
            inputs.update(widget_inputs(info, values))
        for inp in node.get("inputs", []):
            src = source(inp.get("link"))
            if src is None:
                continue
            inputs[inp["name"]] = src[1]
        title = node.get("title") or info.get("display_name") or node["type"]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}
    return prompt


def input_names(node_info: dict) -> set:
    """Every input a prompt may give the node: its own, and each DynamicCombo option's inputs
    under their prompt names (``format.codec``, nested ones likewise)."""
    names = set()

    def walk(inputs: dict, prefix: str) -> None:
        for section in ("required", "optional"):
            for name, spec in (inputs.get(section) or {}).items():
                names.add(prefix + name)
                kind, opts = _kind(spec)
                if kind == DYNAMIC_COMBO:
                    for option in opts.get("options", []):
                        walk(option.get("inputs") or {}, f"{prefix}{name}.")

    walk(node_info["input"], "")
    return names


# --- standard model files -> fixtures ------------------------------------------------------

# Diffusion-model file names of the official releases (as ComfyUI's own templates name them)
# -> fixture family. Text encoders and VAEs need no entry: they are replaced by kind.
MODEL_FILES = {
    "flux1-dev.safetensors": "flux",
    "flux1-dev-fp8.safetensors": "flux",
    "flux1-schnell.safetensors": "flux",
    "wan2.1_t2v_1.3B_bf16.safetensors": "wan21",
    "wan2.1_t2v_1.3B_fp16.safetensors": "wan21",
    "wan2.1_t2v_14B_bf16.safetensors": "wan21",
    "wan2.1_t2v_14B_fp16.safetensors": "wan21",
    "wan2.2_ti2v_5B_fp16.safetensors": "wan22_5b",
    "hunyuan_video_t2v_720p_bf16.safetensors": "hunyuan_video",
    "sd_xl_base_1.0.safetensors": "sdxl",
    "sd3.5_medium.safetensors": "sd3",
    "ltx-video-2b-v0.9.5.safetensors": "ltxv",
    "v1-5-pruned-emaonly-fp16.safetensors": "sd15",
}
# VAE files -> fixture family, for workflows with no diffusion model (VQ on a VAE's latents).
VAE_FILES = {"ae.safetensors": "flux", "wan_2.1_vae.safetensors": "wan21", "wan2.2_vae.safetensors": "wan22_5b",
             "hunyuan_video_vae_bf16.safetensors": "hunyuan_video"}
# Files one example workflow writes and another reads: file -> (fixture family or None, the
# workflow that writes it). ``run`` runs the writer first when the file is missing.
PRODUCED_FILES = {
    "quantized/wan2.1_t2v_1.3B_int8.safetensors": ("wan21", "accel_wan21_quantize_1_save"),
    "vq_tokens/accel_example_00001_.vqt [output]": (None, "accel_vq_latent_1_encode_save"),
}
# A missing input image becomes a smooth random one of this size: at 8x VAE compression its
# 32x32 latent has enough vectors for a 256-code VQ codebook.
FIXTURE_IMAGE_SIDE = 256
DIFFUSION_LOADERS = {"UNETLoader": "unet_name", "CheckpointLoaderSimple": "ckpt_name"}
CLIP_LOADERS = {"CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader", "QuadrupleCLIPLoader"}
# Nodes that set the pixel size of the latent; mapped to the fixture's size.
LATENT_SIZE_NODES = {"EmptyLatentImage", "EmptySD3LatentImage", "EmptyHunyuanLatentVideo", "Wan22ImageToVideoLatent",
                     "EmptyLTXVLatentVideo", "EmptyMochiLatentVideo", "EmptyCosmosLatentVideo",
                     "AccelTestEmptyLatent"}
_FILE_INPUTS = {"UNETLoader": ("unet_name",), "CheckpointLoaderSimple": ("ckpt_name",), "VAELoader": ("vae_name",),
                "AccelLoadQuantized": ("unet_name",), "AccelVQLoadTokens": ("token_file",), "LoadImage": ("image",),
                "CLIPLoader": ("clip_name",), "DualCLIPLoader": ("clip_name1", "clip_name2"),
                "TripleCLIPLoader": ("clip_name1", "clip_name2", "clip_name3"),
                "QuadrupleCLIPLoader": ("clip_name1", "clip_name2", "clip_name3", "clip_name4")}


@dataclasses.dataclass
class Mapping:
    prompt: dict
    family: str | None              # None: nothing mapped (every named file is present)
    missing: list[str]              # the named model files this server does not have
    notes: list[str]                # what was replaced, one line each


def named_files(prompt: dict) -> list[tuple[str, str, str]]:
    """(node id, input, file name) of every file the prompt names (models, images, tokens)."""
    out = []
    for node_id, node in prompt.items():
        for name in _FILE_INPUTS.get(node["class_type"], ()):
            value = node["inputs"].get(name)
            if isinstance(value, str):
                out.append((node_id, name, value))
    return out


def missing_files(prompt: dict, object_info: dict) -> list[str]:
    """Named files not offered by the server's loaders (i.e. not in its model/input/output folders)."""
    missing = []
    for node_id, name, value in named_files(prompt):
        _, opts = input_spec(object_info[prompt[node_id]["class_type"]], name)
        if value not in opts.get("options", []):
            missing.append(value)
    return sorted(set(missing))


def _family(prompt: dict) -> str:
    """The fixture family a workflow runs on: its diffusion model's, else that of a model file
    another workflow writes for it, else its VAE's (a workflow with no diffusion model)."""
    loaders = [node["inputs"].get(inp) for node in prompt.values() for cls, inp in DIFFUSION_LOADERS.items()
               if node["class_type"] == cls]
    unknown = [name for name in loaders if name not in MODEL_FILES]
    if unknown:
        raise WorkflowError(f"no fixture for the model file(s) {', '.join(map(str, unknown))}; "
                            f"known: {', '.join(MODEL_FILES)}")
    families = {MODEL_FILES[name] for name in loaders}
    families |= {PRODUCED_FILES[name][0] for _, _, name in named_files(prompt)
                 if PRODUCED_FILES.get(name, (None,))[0]}
    if not families:
        families = {VAE_FILES.get(name) for node_id, _, name in named_files(prompt)
                    if prompt[node_id]["class_type"] == "VAELoader"}
    if len(families) != 1 or None in families:
        raise WorkflowError(f"expected one model family in the workflow, found {sorted(map(str, families))}")
    return families.pop()


def map_to_fixtures(prompt: dict, object_info: dict, models_dir, size: str = "tiny", input_dir=None) -> Mapping:
    """Swap the standard model files for fixtures when any of them is missing on the server.

    Writes the fixture files it needs into ``models_dir`` (the server's models folder) and a
    missing input image into ``input_dir``. A file another example workflow writes
    (``PRODUCED_FILES``) is not mapped: run that workflow first (``run`` does).
    """
    missing = missing_files(prompt, object_info)
    if not missing:
        return Mapping(json.loads(json.dumps(prompt)), None, [], [])
    unmade = [name for name in missing if name in PRODUCED_FILES]
    if unmade:
        raise WorkflowError(f"{unmade[0]} is written by the example workflow {PRODUCED_FILES[unmade[0]][1]}; "
                            "run that one first")
    prompt = json.loads(json.dumps(prompt))
    family = _family(prompt)
    spec = fixtures.family_spec(family)
    size_spec = fixtures.size_spec(family, size)
    info = None
    if any(node["class_type"] in DIFFUSION_LOADERS for node in prompt.values()):
        info = fixtures.write_fixture(family, size, models_dir)
    vae_name = fixtures.write_tae_fixture(family, models_dir)
    notes: list[str] = []
    redirect: dict[tuple[str, int], list | None] = {}   # (node, slot) -> new source (None: removed)

    def model_node() -> dict:
        return {"class_type": info.loader_node, "inputs": dict(info.loader_inputs),
                "_meta": {"title": f"fixture {family}/{size}"}}

    for node_id, node in list(prompt.items()):
        cls, inputs = node["class_type"], node["inputs"]
        if cls == "UNETLoader":
            notes.append(f"{node_id} UNETLoader {inputs['unet_name']} -> {info.loader_node} {family}/{size}")
            prompt[node_id] = model_node()
        elif cls == "CheckpointLoaderSimple":
            notes.append(f"{node_id} CheckpointLoaderSimple {inputs['ckpt_name']} -> {info.loader_node} "
                         f"{family}/{size}, VAELoader {vae_name}, no CLIP")
            prompt[node_id] = model_node()
            vae_id = str(max(int(k) for k in prompt if k.isdigit()) + 1)
            prompt[vae_id] = {"class_type": "VAELoader", "inputs": {"vae_name": vae_name},
                              "_meta": {"title": "fixture VAE"}}
            redirect[(node_id, 1)] = None
            redirect[(node_id, 2)] = [vae_id, 0]
        elif cls in CLIP_LOADERS:
            notes.append(f"{node_id} {cls} removed (text encoders -> AccelTestConditioning)")
            del prompt[node_id]
            redirect[(node_id, 0)] = None
        elif cls == "LoadImage" and inputs["image"] in missing:
            if input_dir is None:
                raise WorkflowError(f"node {node_id} loads {inputs['image']}, which is missing; no input folder given")
            write_fixture_image(Path(input_dir) / inputs["image"])
            notes.append(f"{node_id} LoadImage {inputs['image']} -> a smooth random {FIXTURE_IMAGE_SIDE}px image")
        elif cls == "VAELoader":
            notes.append(f"{node_id} VAELoader {inputs['vae_name']} -> {vae_name} (random-weight tiny autoencoder)")
            inputs["vae_name"] = vae_name
        elif cls in LATENT_SIZE_NODES:
            sizes = {"width": size_spec.width, "height": size_spec.height}
            if spec.temporal_down is not None:
                sizes["length"] = size_spec.length
            inputs.update({k: v for k, v in sizes.items() if k in inputs})
            notes.append(f"{node_id} {cls} -> " + "x".join(str(inputs[k]) for k in ("width", "height", "length")
                                                         if k in inputs))
    removed_clip = {key for key, new in redirect.items() if new is None}
    for node_id, node in list(prompt.items()):
        clip_inputs = [k for k, v in node["inputs"].items() if _is_link(v) and (v[0], v[1]) in removed_clip]
        if not clip_inputs:
            continue
        texts = [v for v in node["inputs"].values() if isinstance(v, str)]
        seed = zlib.crc32("\n".join(texts).encode()) & 0x7FFFFFFF
        if object_info[node["class_type"]]["output"] != ["CONDITIONING"]:
            raise WorkflowError(f"node {node_id} ({node['class_type']}) takes a CLIP but is not a text encoder; "
                                "no fixture stands in for it")
        notes.append(f"{node_id} {node['class_type']} -> AccelTestConditioning (seed {seed} from its text)")
        prompt[node_id] = {"class_type": "AccelTestConditioning",
                           "inputs": {"family": family, "size": size, "seed": seed, "batch": 1, "tokens": 0},
                           "_meta": node.get("_meta", {})}
    for node in prompt.values():
        for k, v in list(node["inputs"].items()):
            if _is_link(v) and (v[0], v[1]) in redirect:
                new = redirect[(v[0], v[1])]
                if new is None:
                    raise WorkflowError(f"{node['class_type']} input {k} takes a CLIP, which the fixtures replace")
                node["inputs"][k] = new
    return Mapping(prompt, family, missing, notes)


def write_fixture_image(path: Path) -> None:
    import numpy as np
    from PIL import Image
    from lab.vq_fixtures import smooth_images
    pixels = smooth_images(1, FIXTURE_IMAGE_SIDE, FIXTURE_IMAGE_SIDE, seed=zlib.crc32(path.name.encode()))[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((pixels.numpy() * 255).round().astype(np.uint8)).save(path)


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# --- run and check -------------------------------------------------------------------------

@dataclasses.dataclass
class WorkflowRun:
    name: str
    mapping: Mapping
    entry: dict                          # the /history entry
    files: dict[str, list[Path]]         # output node id -> files it wrote or previewed
    texts: dict[str, list[str]]          # output node id -> text it showed


def output_nodes(prompt: dict, object_info: dict) -> list[str]:
    return [node_id for node_id, node in prompt.items() if object_info[node["class_type"]].get("output_node")]


def run(server, path, size: str = "tiny", timeout: float = 600.0) -> WorkflowRun:
    """Convert, map to fixtures where needed, run through the server and collect the outputs."""
    object_info = server.object_info()
    prompt = to_api(load(path), object_info)
    writers = {PRODUCED_FILES[name][1] for name in missing_files(prompt, object_info) if name in PRODUCED_FILES}
    for writer in sorted(writers):
        run(server, WORKFLOWS_DIR / f"{writer}.json", size, timeout)
    if writers:
        object_info = server.object_info()
    mapping = map_to_fixtures(prompt, object_info, server.models_dir, size, server.base / "input")
    entry = server.run(mapping.prompt, timeout=timeout)
    files: dict[str, list[Path]] = {}
    texts: dict[str, list[str]] = {}
    for node_id, out in entry.get("outputs", {}).items():
        for kind, items in out.items():
            if kind == "text":
                texts[node_id] = [str(t) for t in items]
            elif isinstance(items, list) and items and isinstance(items[0], dict) and "filename" in items[0]:
                files.setdefault(node_id, []).extend(server.output_files(entry, node_id, kind=kind))
    return WorkflowRun(Path(path).stem, mapping, entry, files, texts)


def check(run_: WorkflowRun, object_info: dict) -> list[str]:
    """Problems with a run's outputs (empty when fine): every output node showed something (or
    fed a node that did), every file exists and holds finite numbers, every text is non-empty."""
    problems = []
    prompt = run_.mapping.prompt
    consumed = {v[0] for node in prompt.values() for v in node["inputs"].values() if _is_link(v)}
    for node_id in output_nodes(prompt, object_info):
        # An output node shows something, or hands its result (a report) on to one that does.
        if node_id not in run_.entry.get("outputs", {}) and node_id not in consumed:
            problems.append(f"output node {node_id} ({prompt[node_id]['class_type']}) produced no output")
    for node_id, paths in run_.files.items():
        for path in paths:
            problem = check_file(path)
            if problem:
                problems.append(f"node {node_id}: {path.name}: {problem}")
    for node_id, items in run_.texts.items():
        if not any(t.strip() for t in items):
            problems.append(f"node {node_id} showed an empty text")
    return problems


def check_file(path: Path) -> str | None:
    """None when the file exists and its numbers are finite; else what is wrong."""
    if not path.is_file() or path.stat().st_size == 0:
        return "missing or empty"
    suffix = path.suffix.lower()
    if suffix == ".latent":
        from lab.prompts import read_latent
        import torch
        t = read_latent(path)
        return None if torch.isfinite(t).all() else "latent has non-finite values"
    if suffix in (".png", ".webp", ".jpg"):
        import numpy as np
        from PIL import Image
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.float32)
        return None if a.size and np.isfinite(a).all() else "image is empty"
    if suffix == ".json":
        json.loads(path.read_text())
        return None
    if suffix in (".mp4", ".webm"):
        import av
        with av.open(str(path)) as container:
            frames = sum(1 for _ in container.decode(video=0))
        return None if frames > 0 else "video has no frames"
    return None

