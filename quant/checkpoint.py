"""Save and load quantized diffusion models as safetensors.

File layout (a diffusion-model file, keys as in ``diffusion_model.state_dict()``, the
layout ``UNETLoader`` reads):

- layers kept in high precision and all other parameters: as they are (optionally cast);
- a quantized layer ``L``: ``L.weight`` holds the packed codes, ``L.weight_<part>`` every
  other packed tensor (scales, zero points, smoothing factors, the bf16 low-rank branch
  ``weight_lora_down`` [K, r] and ``weight_lora_up`` [r, N]), ``L.bias`` the bias;
- header ``_quantization_metadata`` (ComfyUI's own, QUANTIZATION.md):
  ``{"format_version": "1.0", "layers": {L: {"format": ...}}}``. Layers in a format that
  ComfyUI has a layout for are written in that layout: ``fp8_e4m3`` as ``float8_e4m3fn``
  (fp8 ``weight`` + scalar fp32 ``weight_scale``), which ComfyUI 0.3.75's stock loader
  reads; ``int8`` as ``int8_tensorwise`` (int8 ``weight`` + fp32 ``weight_scale`` [N, 1],
  one scale per output row), the layout of later ComfyUI releases (comfy-kitchen's
  ``TensorWiseINT8Layout``, which also quantizes activations per token). Every other
  layer is listed as ``accel_<format>`` so that a stock loader refuses the file with that
  name in its error instead of loading packed bytes as weights;
- header ``accel_quant``: our own description of every quantized layer (format, group size,
  activation mode, logical shape, compute dtype) and the model's configuration, which
  ``load_quantized_state`` validates against the tensors before building anything;
- header ``config``: ``{"transformer": <the model's configuration>}``, the metadata ComfyUI's
  detection reads for models whose configuration the weights alone do not fix (LTX-Video's
  attention heads); a loaded model does not keep its file's metadata, so it is written back
  from the configuration the model was built with. Other families' detection ignores it.

Writing goes to a temporary file in the target folder, then is moved into place; an
existing file is only replaced when asked.
"""
from __future__ import annotations

import json
import os

import torch

from .. import files
from . import formats
from .formats import Spec
from .linear import QuantLinear
from .qweight import EXTRA_PARTS, QuantWeight

META_KEY = "accel_quant"
FORMAT_VERSION = 1
MAX_SIDE = 1 << 20   # a linear layer's side in a file's metadata
_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float32, torch.float16, torch.bfloat16)}


class CheckpointError(ValueError):
    """A file that cannot be loaded, said in a sentence a person can act on."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def native_format(qw: QuantWeight) -> str | None:
    """ComfyUI's name for this layer's layout, when ComfyUI reads it as is."""
    if any(k in qw.parts for k in EXTRA_PARTS):
        return None  # smoothing factors have no place in ComfyUI's int8/fp8 layouts
    return qw.fmt.comfy_native


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
    dtypes = set()
    for key, value in state.items():
        if isinstance(value, QuantWeight):
            layer = key[: -len(".weight")]
            tensors.update(layer_tensors(layer, value))
            native = native_format(value)
            comfy_layers[layer] = {"format": native or f"accel_{value.spec.format}"}
            accel_layers[layer] = {**value.spec.to_json(), "shape": list(value.shape),
                                   "extras": [k for k in EXTRA_PARTS if k in value.parts]}
            if value.rank:
                accel_layers[layer]["rank"] = value.rank
            dtypes.add(dtype_name(value.dtype))
            continue
        t = value.detach()
        if other_dtype is not None and t.is_floating_point() and t.dtype.itemsize > 1:
            t = t.to(other_dtype)
        tensors[key] = t.contiguous().cpu()
    metadata = {}
    if accel_layers:
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": comfy_layers})
        metadata[META_KEY] = json.dumps({"format_version": FORMAT_VERSION, "layers": accel_layers,
                                         "compute_dtype": sorted(dtypes)[0] if dtypes else None})
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
                        if t.numel() != _numel(want_shape):
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


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


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
        if not isinstance(old, torch.nn.Linear) or tuple(old.weight.shape) != tuple(qw.shape):
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
    import comfy.lora
    from .. import compat
    from .linear import packed_like
    device = patcher.load_device
    out = {}
    for key in patcher.model.diffusion_model.state_dict():
        path, _, name = key.rpartition(".")
        full = "diffusion_model." + key
        module = patcher.get_model_object("diffusion_model." + path) if path else patcher.model.diffusion_model
        clean = patcher.backup[full].weight if full in patcher.backup else getattr(module, name)
        if full not in patcher.patches:
            out[key] = clean
            continue
        w = clean.to(device=device, dtype=torch.float32, copy=True)
        convert = getattr(module, "convert_" + name, None)
        if convert is not None:
            w = convert(w, inplace=True)
        w = comfy.lora.calculate_weight(patcher.patches[full], w, full)
        seed = compat.string_to_seed(full)
        if isinstance(clean, QuantWeight):
            out[key] = packed_like(clean, w, seed)
        else:
            out[key] = comfy.float.stochastic_rounding(w, clean.dtype, seed=seed)
    return out


def save_model(patcher, path: str, overwrite: bool = False, other_dtype: torch.dtype | None = None) -> dict:
    """Write the model as ``patcher`` computes it, its LoRA patches baked in (``computed_state``)."""
    tensors, metadata = state_to_save(computed_state(patcher), other_dtype)
    if META_KEY not in metadata:
        raise CheckpointError("the model has no quantized layers")
    config = model_config(patcher)
    accel = json.loads(metadata[META_KEY])
    accel["model_config"] = config
    metadata[META_KEY] = json.dumps(accel)
    metadata["config"] = json.dumps({"transformer": {k: v for k, v in config.items() if k != "image_model"}})
    write_atomic(tensors, metadata, path, overwrite)
    layers = json.loads(metadata["_quantization_metadata"])["layers"]
    native = sorted({v["format"] for v in layers.values() if not v["format"].startswith("accel_")})
    private = sorted({v["format"] for v in layers.values() if v["format"].startswith("accel_")})
    return {"path": path, "bytes": os.path.getsize(path), "quantized layers": len(layers),
            "ComfyUI layouts": native, "ComfyUI-Accel layouts": private}


def _loading_ops(quantized: set[str]):
    """ComfyUI operations for building the model: quantized layers take a zero-stride stand-in
    weight instead of copying it into a full-size tensor (so memory stays at the packed size)."""
    import comfy.ops

    class QuantLoadOps(comfy.ops.manual_cast):
        class Linear(comfy.ops.manual_cast.Linear):
            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                key = prefix + "weight"
                if prefix[:-1] in quantized and key in state_dict:
                    self.weight = torch.nn.Parameter(state_dict.pop(key), requires_grad=False)
                    super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                  unexpected_keys, error_msgs)
                    if key in missing_keys:
                        missing_keys.remove(key)
                    return
                super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                              unexpected_keys, error_msgs)

    return QuantLoadOps


def load_model(path: str):
    """A ModelPatcher for a file written by :func:`save_model` (validated first)."""
    import comfy.sd
    plain, packed, metadata, compute = load_quantized_state(path)
    sd = dict(plain)
    for layer, qw in packed.items():
        sd[f"{layer}.weight"] = standin(qw)
    # ComfyUI's detection may read file metadata (LTX-Video's "config"); not the quantization keys.
    meta = {k: v for k, v in metadata.items() if k not in ("_quantization_metadata", META_KEY)}
    try:
        patcher = comfy.sd.load_diffusion_model_state_dict(
            sd, model_options={"custom_operations": _loading_ops(set(packed))}, metadata=meta)
    except Exception as e:  # ComfyUI's detection and constructors on a file that does not fit them
        raise CheckpointError(f"ComfyUI could not build a model from {os.path.basename(path)} "
                              f"({type(e).__name__}: {e})") from None
    if patcher is None:
        raise CheckpointError(f"ComfyUI could not detect the model type of {os.path.basename(path)}")
    saved = json.loads(metadata[META_KEY]).get("model_config")
    if saved is not None and model_config(patcher) != saved:
        raise CheckpointError(f"ComfyUI's detection builds {os.path.basename(path)} with another configuration "
                              f"than the model it was saved from ({model_config(patcher)} instead of {saved})")
    install(patcher.model.diffusion_model, {k: v.retarget(device=patcher.offload_device) for k, v in packed.items()},
            os.path.basename(path))
    dtype = _DTYPES.get(compute or "")
    current = getattr(patcher.model, "manual_cast_dtype", None) or patcher.model.get_dtype()
    if dtype is not None and dtype != current:
        patcher.set_model_compute_dtype(dtype)
    return patcher
