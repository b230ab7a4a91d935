"""Save and load quantized diffusion models as safetensors (keys as in ``diffusion_model.state_dict()``,
the layout ``UNETLoader`` reads).

- Kept layers and all other parameters: as they are (optionally cast).
- Our quantized layer ``L``: ``L.weight`` holds the packed codes, ``L.weight_<part>`` every other part
  (scales, zero points, ``smooth``, the bf16 branch ``lora_down`` [K, r] and ``lora_up`` [r, N]).
- A layer on ComfyUI's own layout (``quant/core.py``): exactly as ComfyUI's ``Linear`` writes it,
  ``L.comfy_quant`` (its JSON) included, so ComfyUI's stock loader builds the same layer.
- Header ``_quantization_metadata`` (ComfyUI's, QUANTIZATION.md): every quantized layer's format. Ours
  take ComfyUI's name where ComfyUI computes them the same way (fp8_e4m3 as ``float8_e4m3fn``, which
  0.3.75's stock loader reads; int8 as ``int8_tensorwise`` with [N, 1] row scales, later releases'
  layout), else ``accel_<format>``, so a stock loader refuses the file naming the format instead of
  loading packed bytes as weights.
- Header ``accel_quant``: our description of every layer (format, group size, activation mode, shape,
  compute dtype) and the model's configuration, validated against the tensors before anything is
  built; version 2 (written only with layers on ComfyUI's layouts) adds ``core_layers``.
- Header ``config``: ``{"transformer": <configuration>}``, which ComfyUI's detection reads where the
  weights do not fix it (LTX-Video's attention heads); a loaded model does not keep its file's
  metadata, so it is written back from the configuration the model was built with.

A file is written to a temporary file and moved into place; an existing one is replaced only when asked.
"""
from __future__ import annotations

import json
import math
import os

import torch

from .. import compat, files
from . import core, formats
from .formats import Spec
from .linear import QuantLinear, packed_like
from .model import PREFIX, clean_param, compute_dtype, merged_float
from .qweight import EXTRA_PARTS, QuantWeight

META_KEY = "accel_quant"
FORMAT_VERSION = 2
_PLAIN_VERSION = 1  # what files without layers on ComfyUI's layouts still say (readers of version 1 load them)
MAX_SIDE = 1 << 20   # a linear layer's side in a file's metadata
_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float32, torch.float16, torch.bfloat16)}


class CheckpointError(ValueError):
    """A file that cannot be loaded, said in a sentence a person can act on."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def comfy_entry(qw: QuantWeight) -> dict:
    """The layer's ``_quantization_metadata`` entry: ComfyUI's layout where ComfyUI computes it the
    same way as is, else ``accel_<format>``. Smoothing factors have no place in ComfyUI's int8/fp8
    layouts, its int8_tensorwise always quantizes activations, and our fp8 layers have no calibrated
    input scale (ComfyUI would cast the activations unscaled, clipping at 448, on fp8 GPUs): they
    load weight-only."""
    native = qw.fmt.comfy_native
    if native is None or any(k in qw.parts for k in EXTRA_PARTS) or (qw.fmt.name == "int8" and not qw.spec.act_quant):
        return {"format": f"accel_{qw.spec.format}"}
    return {"format": native, **({"full_precision_matrix_mult": True} if native.startswith("float8") else {})}


def _file_key(layer: str, part: str) -> str:
    return f"{layer}.weight" if part == "weight" else f"{layer}.weight_{part}"


def layer_tensors(layer: str, qw: QuantWeight) -> dict[str, torch.Tensor]:
    out = {}
    for part, t in qw.parts.items():
        if part == "scale" and qw.spec.format == "int8":
            t = t.reshape(-1, 1)  # ComfyUI's int8_tensorwise stores one scale per row as [N, 1]
        out[_file_key(layer, part)] = t.detach().contiguous().cpu()
    return out


def state_to_save(state: dict[str, torch.Tensor], other_dtype: torch.dtype | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata for a diffusion model state dict holding QuantWeights."""
    tensors: dict[str, torch.Tensor] = {}
    comfy_layers, accel_layers = {}, {}
    # layers on ComfyUI's layout: their JSON goes in the header too, their tensors are written as they are
    core_layers = {key[: -len(".comfy_quant")]: {"comfy": json.loads(bytes(value.tolist()).decode("utf-8"))}
                   for key, value in state.items() if key.endswith(".comfy_quant")}
    comfy_layers.update({layer: entry["comfy"] for layer, entry in core_layers.items()})
    dtypes = set()
    for key, value in state.items():
        if isinstance(value, QuantWeight):
            layer = key[: -len(".weight")]
            tensors.update(layer_tensors(layer, value))
            comfy_layers[layer] = comfy_entry(value)
            accel_layers[layer] = {**value.spec.to_json(), "shape": list(value.shape),
                                   "extras": [k for k in EXTRA_PARTS if k in value.parts]}
            if value.rank:
                accel_layers[layer]["rank"] = value.rank
            dtypes.add(dtype_name(value.dtype))
            continue
        t = value.detach()
        if (other_dtype is not None and t.is_floating_point() and t.dtype.itemsize > 1
                and key.rpartition(".")[0] not in core_layers):
            t = t.to(other_dtype)
        tensors[key] = t.contiguous().cpu()
    metadata = {}
    if accel_layers or core_layers:
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": comfy_layers})
        accel = {"format_version": FORMAT_VERSION if core_layers else _PLAIN_VERSION, "layers": accel_layers,
                 "compute_dtype": sorted(dtypes)[0] if dtypes else None}
        if core_layers:
            accel["core_layers"] = core_layers
        metadata[META_KEY] = json.dumps(accel)
    return tensors, metadata


def write_atomic(tensors: dict, metadata: dict, path: str, overwrite: bool = False) -> None:
    """Write a safetensors file in one step, never over an existing file unless ``overwrite``."""
    import safetensors.torch
    files.write_atomic(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata), overwrite)


# ---------------------------------------------------------------- reading


def read_header(path: str) -> dict:
    """The safetensors header metadata; a clear error for a truncated or foreign file."""
    import safetensors
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise CheckpointError(f"{os.path.basename(path)} is not a readable safetensors file "
                              f"(truncated or damaged?): {e}") from None


def parse_layers(metadata: dict, name: str) -> tuple[dict[str, dict], str | None]:
    if META_KEY not in metadata:
        if "_quantization_metadata" in metadata:
            raise CheckpointError(f"{name} is a ComfyUI quantized checkpoint but was not written by Save "
                                  "Quantized Model; load it with ComfyUI's Load Diffusion Model")
        raise CheckpointError(f"{name} has no quantization metadata; it is not a quantized model file "
                              "(use Load Diffusion Model for ordinary files)")
    try:
        meta = json.loads(metadata[META_KEY])
        version = int(meta["format_version"])
        layers = meta["layers"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{name}: the '{META_KEY}' metadata is malformed ({e})") from None
    if not isinstance(layers, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in layers.items()):
        raise CheckpointError(f"{name}: the '{META_KEY}' metadata is malformed (its 'layers' must map layer "
                              "names to objects)")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{name} uses quantization file version {version}; this ComfyUI-Accel reads "
                              f"up to {FORMAT_VERSION}: update the node pack")
    return layers, meta.get("compute_dtype")


def expected_parts(layer: str, info: dict) -> tuple[Spec, tuple[int, int], dict]:
    try:
        spec = Spec.from_json(info)
        shape = tuple(int(s) for s in info["shape"])
        fmt = formats.get(spec.format)
    except KeyError as e:
        raise CheckpointError(f"layer {layer}: {e.args[0] if e.args else e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"layer {layer}: malformed metadata ({e})") from None
    if len(shape) != 2 or not all(0 < d <= MAX_SIDE for d in shape):
        raise CheckpointError(f"layer {layer}: a linear weight needs a 2-D shape of sides 1 to {MAX_SIDE}, "
                              f"metadata says {list(shape)}")
    problem = fmt.problem(shape, spec)
    if problem:
        raise CheckpointError(f"layer {layer}: {problem}")
    parts = dict(fmt.part_specs(shape, spec))
    extras = info.get("extras", [])
    if not isinstance(extras, list):
        raise CheckpointError(f"layer {layer}: malformed metadata ('extras' must be a list)")
    for extra in extras:
        if extra not in EXTRA_PARTS:
            raise CheckpointError(f"layer {layer}: unknown extra tensor '{extra}' (from a newer ComfyUI-Accel?)")
    if "smooth" in extras:
        parts["smooth"] = ((shape[1],), torch.float32)
    if "lora_down" in extras or "lora_up" in extras:
        try:
            rank = int(info["rank"])
            if not 0 < rank <= min(shape):
                raise ValueError(rank)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"layer {layer}: a low-rank branch without a valid 'rank' in the metadata") from None
        parts["lora_down"] = ((shape[1], rank), torch.bfloat16)
        parts["lora_up"] = ((rank, shape[0]), torch.bfloat16)
    return spec, shape, parts


def load_quantized_state(path: str) -> tuple[dict, dict[str, QuantWeight], dict, str | None]:
    """Read and validate a file: (plain tensors, {layer: QuantWeight}, header, compute dtype)."""
    import safetensors
    name = os.path.basename(path)
    metadata = read_header(path)
    layers, compute = parse_layers(metadata, name)
    dtype = _DTYPES.get(compute or "", torch.float32)
    plain, packed = {}, {}
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            used = set()
            for layer, entry in core_layers(metadata).items():
                for key in _core_keys(name, layer, entry):
                    if key not in keys:
                        raise CheckpointError(f"{name}: layer {layer} (ComfyUI's {entry['comfy']['format']}) is "
                                              f"missing tensor {key}")
                    try:
                        plain[key] = f.get_tensor(key)
                    except Exception as e:  # safetensors' own error types
                        raise CheckpointError(f"{name}: tensor {key} cannot be read ({e}); "
                                              "the file is damaged") from None
                    used.add(key)
            for layer, info in layers.items():
                spec, shape, parts_spec = expected_parts(layer, info)
                parts = {}
                for part, (want_shape, want_dtype) in parts_spec.items():
                    key = _file_key(layer, part)
                    if key not in keys:
                        raise CheckpointError(f"{name}: layer {layer} is missing tensor {key}")
                    t = f.get_tensor(key)
                    if t.dtype != want_dtype:
                        raise CheckpointError(f"{name}: {key} is {dtype_name(t.dtype)}, the {spec.format} "
                                              f"format stores {dtype_name(want_dtype)}")
                    if tuple(t.shape) != want_shape:
                        if t.numel() != math.prod(want_shape):
                            raise CheckpointError(f"{name}: {key} has shape {list(t.shape)}, expected "
                                                  f"{list(want_shape)} for a {spec.format} layer of shape "
                                                  f"{list(shape)}")
                        t = t.reshape(want_shape)
                    parts[part] = t
                    used.add(key)
                packed[layer] = QuantWeight(parts, spec, shape, dtype)
            for key in keys - used:
                plain[key] = f.get_tensor(key)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{name}: could not read the tensors ({e}); the file may be damaged") from None
    return plain, packed, metadata, compute


def core_layers(metadata: dict) -> dict[str, dict]:
    """The layers a file holds in ComfyUI's layouts (version 2): {layer: {"comfy": its JSON, ...}}."""
    return json.loads(metadata[META_KEY]).get("core_layers", {}) if META_KEY in metadata else {}


def _core_keys(name: str, layer: str, entry: dict) -> list[str]:
    try:
        fmt = entry["comfy"]["format"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{name}: layer {layer} has malformed ComfyUI layout metadata") from None
    if fmt not in core.FILE_PARTS:
        raise CheckpointError(f"{name}: layer {layer} uses ComfyUI's {fmt} layout, which this ComfyUI-Accel does "
                              "not know: update the node pack")
    return [f"{layer}.weight{suffix}" for suffix in core.FILE_PARTS[fmt]]


def standin(qw: QuantWeight) -> torch.Tensor:
    """A weight of the layer's logical shape and dtype that takes no memory (stride 0),
    so ComfyUI's model detection and constructor see the shapes they expect."""
    return torch.zeros((), dtype=qw.dtype).expand(*qw.shape)


def install(diffusion_model: torch.nn.Module, packed: dict[str, QuantWeight], name: str = "the file") -> None:
    """Put QuantLinear modules in a freshly loaded model (ours alone, not shared yet). Every
    layer is checked first (it exists and is a linear layer of the stored shape), so a file
    that names something else changes nothing."""
    targets = []
    for layer, qw in packed.items():
        parent_name, _, child = layer.rpartition(".")
        try:
            parent = diffusion_model.get_submodule(parent_name) if parent_name else diffusion_model
        except AttributeError:
            parent = None
        old = parent._modules.get(child) if parent is not None else None
        # ComfyUI's mixed-precision Linear (a file with layers on ComfyUI's layouts) is no nn.Linear
        linear = isinstance(old, torch.nn.Linear) or (
            type(old).__qualname__.endswith("MixedPrecisionOps.Linear") and getattr(old, "weight", None) is not None)
        if not linear or tuple(old.weight.shape) != tuple(qw.shape):
            what = "no such layer" if old is None else f"a {type(old).__name__}"
            raise CheckpointError(f"{name}: the metadata names layer {layer!r} as a {list(qw.shape)} linear layer, but "
                                  f"the model ComfyUI built from the file has {what} there")
        targets.append((parent, child, old, qw))
    for parent, child, old, qw in targets:
        bias = getattr(old, "bias", None)
        setattr(parent, child, QuantLinear(qw, None if bias is None else bias.detach()))


# ---------------------------------------------------------------- ComfyUI side


def model_config(patcher) -> dict:
    """The model's configuration as JSON values (what detection should reproduce)."""
    config = {k: v for k, v in patcher.model.model_config.unet_config.items() if k != "dtype"}
    return json.loads(json.dumps(config, default=str))


def computed_state(patcher) -> dict[str, torch.Tensor]:
    """The diffusion model's tensors as ``patcher`` computes with them: its own layers (object
    patches) and clean weights (the backup where a loaded clone patched them in place), with its
    weight patches (a LoRA) applied as ComfyUI's full load applies them (our layers repack through
    ``set_weight``, float weights are rounded stochastically, both seeded by the key). Nothing is
    loaded: 0.33's dynamic-VRAM loader refuses ``force_patch_weights``, the old way to bake them."""
    import comfy.float
    device = patcher.load_device
    out = {}
    for key in patcher.model.diffusion_model.state_dict():
        path, _, name = key.rpartition(".")
        full = "diffusion_model." + key
        module = patcher.get_model_object("diffusion_model." + path) if path else patcher.model.diffusion_model
        if core.core_format(module) is not None:  # ComfyUI's own layer: its tensors, written once per layer
            if f"{path}.weight" not in out:
                out.update(_core_layer_state(patcher, path, module, device))
            continue
        clean = clean_param(patcher, path, name)
        if full not in patcher.patches:
            out[key] = clean
            continue
        w = merged_float(clean, patcher.patches[full], full, device, getattr(module, "convert_" + name, None))
        seed = compat.string_to_seed(full)
        if isinstance(clean, QuantWeight):
            out[key] = packed_like(clean, w, seed)
        else:
            out[key] = comfy.float.stochastic_rounding(w, clean.dtype, seed=seed)
    return out


def _core_layer_state(patcher, path: str, module, device) -> dict[str, torch.Tensor]:
    """A layer on ComfyUI's layout as ``patcher`` computes it: its weight patches (a LoRA) applied
    the way ComfyUI's full load does (dequantize, add, requantize with stochastic rounding)."""
    full = f"diffusion_model.{path}.weight"
    if full not in patcher.patches:
        return core.layer_state(module, f"{path}.")
    w = merged_float(clean_param(patcher, path, "weight"), patcher.patches[full], full, device, module.convert_weight)
    weight = module.set_weight(w, seed=compat.string_to_seed(full), return_weight=True)
    return core.layer_state(module, f"{path}.", weight)


def save_model(patcher, path: str, overwrite: bool = False, other_dtype: torch.dtype | None = None) -> dict:
    """Write the model as ``patcher`` computes it, its LoRA patches baked in (``computed_state``)."""
    tensors, metadata = state_to_save(computed_state(patcher), other_dtype)
    if META_KEY not in metadata:
        raise CheckpointError("the model has no quantized layers")
    config = model_config(patcher)
    accel = json.loads(metadata[META_KEY])
    accel["model_config"] = config
    for layer, entry in accel.get("core_layers", {}).items():  # our format, where a layer has one (not stock-loaded)
        module = patcher.get_model_object(PREFIX + layer)
        if getattr(module, "accel_spec", None) is not None:
            entry.update(module.accel_spec.to_json(), shape=list(module.weight.shape))
    metadata[META_KEY] = json.dumps(accel)
    metadata["config"] = json.dumps({"transformer": {k: v for k, v in config.items() if k != "image_model"}})
    write_atomic(tensors, metadata, path, overwrite)
    layers = json.loads(metadata["_quantization_metadata"])["layers"]
    native = sorted({v["format"] for v in layers.values() if not v["format"].startswith("accel_")})
    private = sorted({v["format"] for v in layers.values() if v["format"].startswith("accel_")})
    return {"path": path, "bytes": os.path.getsize(path), "quantized layers": len(layers),
            "ComfyUI layouts": native, "ComfyUI-Accel layouts": private}


def _loading_ops(quantized: set[str]):
    """ComfyUI operations whose Linear keeps our layers' zero-stride stand-in weight instead of
    copying it into a full-size tensor, so memory stays at the packed size."""
    import comfy.ops

    class QuantLoadOps(comfy.ops.manual_cast):
        class Linear(comfy.ops.manual_cast.Linear):
            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                key = prefix + "weight"
                kept = prefix[:-1] in quantized and key in state_dict
                if kept:
                    self.weight = torch.nn.Parameter(state_dict.pop(key), requires_grad=False)
                super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                              unexpected_keys, error_msgs)
                if kept and key in missing_keys:
                    missing_keys.remove(key)

    return QuantLoadOps


def load_model(path: str):
    """A ModelPatcher for a file written by :func:`save_model` (validated first)."""
    import comfy.model_management
    import comfy.sd
    plain, packed, metadata, compute = load_quantized_state(path)
    name = os.path.basename(path)
    sd = dict(plain)
    for layer, qw in packed.items():
        sd[f"{layer}.weight"] = standin(qw)
    in_core = core_layers(metadata)
    missing = sorted({e["comfy"]["format"] for e in in_core.values()} - compat.core_quant_formats())
    if missing:
        raise CheckpointError(f"{name} has layers in ComfyUI's {', '.join(missing)} layout, which this ComfyUI "
                              f"({compat.host_version()}) cannot build: it needs ComfyUI 0.33 or later with "
                              "comfy-kitchen")
    for layer, entry in in_core.items():  # what ComfyUI's loader reads to build the layer in its layout
        sd[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(entry["comfy"]).encode("utf-8")), dtype=torch.uint8)
    # ComfyUI's detection may read file metadata (LTX-Video's "config"); not the quantization keys.
    meta = {k: v for k, v in metadata.items() if k not in ("_quantization_metadata", META_KEY)}
    dtype = _DTYPES.get(compute or "")
    # ComfyUI's mixed-precision Linear keeps a stand-in already in its compute dtype as it is (no copy)
    ops = (compat.core_ops(dtype or torch.float32, comfy.model_management.get_torch_device()) if in_core
           else _loading_ops(set(packed)))
    try:
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": ops}, metadata=meta)
    except Exception as e:  # ComfyUI's detection and constructors on a file that does not fit them
        raise CheckpointError(f"ComfyUI could not build a model from {name} ({type(e).__name__}: {e})") from None
    if patcher is None:
        raise CheckpointError(f"ComfyUI could not detect the model type of {name}")
    saved = json.loads(metadata[META_KEY]).get("model_config")
    if saved is not None and model_config(patcher) != saved:
        raise CheckpointError(f"ComfyUI's detection builds {name} with another configuration "
                              f"than the model it was saved from ({model_config(patcher)} instead of {saved})")
    install(patcher.model.diffusion_model, {k: v.retarget(device=patcher.offload_device) for k, v in packed.items()},
            name)
    for layer, entry in in_core.items():  # ours to the report and to Quantize Model (which refuses to quantize twice)
        if "format" in entry:
            module = patcher.model.diffusion_model.get_submodule(layer)
            module.accel_spec = Spec.from_json(entry)
            module.accel_reason = f"ComfyUI's {entry['comfy']['format']} (loaded)"
    if dtype is not None and dtype != compute_dtype(patcher):
        patcher.set_model_compute_dtype(dtype)
    return patcher
