"""``QuantWeight``: a packed linear weight that behaves as a tensor where ComfyUI needs one.

ComfyUI's ModelPatcher backs a weight up with ``.to(device, copy=...)``, converts it with
``.to(torch.float32)``, restores it with ``set_attr_param`` and sizes it with ``nelement() *
element_size()``. The packed tensors (codes, scales, smoothing) must do all that together, so they
live in one tensor subclass (not ComfyUI's ``QuantizedTensor``: its API changed between 0.3.75 and
later releases). Shape [N, K] and ``dtype`` are the logical weight's; ``.to(device)`` moves the
parts; ``.to(another float dtype)``, ``empty_like`` + ``copy_`` and any other op dequantize.

Beside the format's parts, under reserved names: ``smooth`` [K] (SmoothQuant: the stored weight is
``W * smooth``, the input is divided by it) and the low-rank branch ``lora_down`` [K, r] and
``lora_up`` [r, N] in the smoothed coordinates (``quant/lowrank.py``).
"""
from __future__ import annotations

import logging

import torch
from torch.utils._pytree import tree_map

from . import formats
from .formats import Spec

log = logging.getLogger(__name__)

EXTRA_PARTS = ("smooth", "lora_down", "lora_up")
aten = torch.ops.aten


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant: ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``; the layer then computes
    ``(X / s) @ (W * s)^T``, moving activation outliers into the weights by ``alpha``."""
    w_absmax = weight.abs().amax(dim=0).float().cpu().clamp(min=1e-5)
    a = act_absmax.float().clamp(min=1e-5)
    s = a.pow(alpha) / w_absmax.pow(1.0 - alpha)
    return s.clamp(min=1e-4, max=1e4)


def branch_weight(down: torch.Tensor, up: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """A low-rank branch as a float32 [N, K] weight in the layer's own (unsmoothed) coordinates."""
    w = up.float().t() @ down.float().t()
    return w if smooth is None else w / smooth[None, :].to(w.device)


class QuantWeight(torch.Tensor):
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, parts: dict[str, torch.Tensor], spec: Spec, shape, dtype: torch.dtype):
        device = parts["weight"].device
        return torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype, device=device,
                                                   requires_grad=False)

    def __init__(self, parts, spec, shape, dtype):
        self.parts = parts
        self.spec = spec
        self.fmt = formats.get(spec.format)

    # ---- construction -------------------------------------------------------------
    @classmethod
    @torch.no_grad()  # outside ComfyUI's inference mode, autograd would keep float copies alive
    def quantize(cls, w: torch.Tensor, spec: Spec, dtype: torch.dtype, smooth: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, input_sq: torch.Tensor | None = None) -> "QuantWeight":
        """Pack float weight ``w`` [N, K]. ``smooth`` [K] > 0 folds SmoothQuant factors in.
        ``input_sq`` [K]: per-channel mean square of the layer's inputs (calibration), for
        formats that choose their parts for the output error (``quantize_for_inputs``)."""
        fmt = formats.get(spec.format)
        problem = fmt.problem(tuple(w.shape), spec)
        if problem:
            raise ValueError(problem)
        w = w.to(torch.float32)
        if smooth is not None:
            smooth = smooth.to(device=w.device, dtype=torch.float32)
            w = w * smooth[None, :]
            if input_sq is not None:  # the layer sees x / smooth
                input_sq = input_sq.to(smooth.device) / smooth.square()
        if input_sq is None:
            parts = fmt.quantize(w, spec, generator)
        else:
            parts = fmt.quantize_for_inputs(w, spec, input_sq)
        if smooth is not None:
            parts["smooth"] = smooth
        return cls(parts, spec, tuple(w.shape), dtype)

    def _like(self, parts: dict, dtype: torch.dtype | None = None) -> "QuantWeight":
        return QuantWeight(parts, self.spec, tuple(self.shape), dtype or self.dtype)

    # ---- what the layer uses ------------------------------------------------------
    @property
    def smooth(self) -> torch.Tensor | None:
        return self.parts.get("smooth")

    @property
    def branch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The low-rank branch ``(lora_down [K, r], lora_up [r, N])``, or None."""
        if "lora_down" not in self.parts:
            return None
        return self.parts["lora_down"], self.parts["lora_up"]

    @property
    def rank(self) -> int:
        return 0 if self.branch is None else self.parts["lora_down"].shape[1]

    def with_branch(self, down: torch.Tensor | None, up: torch.Tensor | None) -> "QuantWeight":
        """The same packed residual with this branch (None removes it)."""
        parts = {k: v for k, v in self.parts.items() if k not in ("lora_down", "lora_up")}
        if down is not None:
            parts["lora_down"], parts["lora_up"] = down.to(self.device), up.to(self.device)
        return self._like(parts)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.fmt.dequantize(self.parts, tuple(self.shape), self.spec, torch.float32)
        if self.branch is not None:
            down, up = self.branch
            w = w.addmm_(up.float().t(), down.float().t())
        if self.smooth is not None:
            w = w / self.smooth[None, :]
        return w.to(dtype or self.dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n, k = self.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        inv = None if self.smooth is None else 1.0 / self.smooth.to(x2.device)
        if self.branch is None:
            y = self.fmt.linear(x2, self.parts, (n, k), self.spec, bias, inv)
        else:
            y = self.fmt.linear_with_branch(x2, self.parts, (n, k), self.spec, bias, inv, *self.branch)
        return y.reshape(*lead, n)

    def select_rows(self, index: torch.Tensor) -> "QuantWeight":
        """The same layer restricted to some output rows (every format's per-row parts lead
        with N; per-tensor scalars and the [K] extras are shared; the branch's up projection
        is [r, N])."""
        n = self.shape[0]
        parts = {k: v[index] if k not in EXTRA_PARTS and v.dim() > 0 and v.shape[0] == n else v
                 for k, v in self.parts.items()}
        if "lora_up" in parts:
            parts["lora_up"] = parts["lora_up"][:, index]
        return QuantWeight(parts, self.spec, (len(index), self.shape[1]), self.dtype)

    def requantize(self, w: torch.Tensor, seed: int | None = None) -> "QuantWeight":
        """Pack a new float weight the same way (format, group size, smoothing); a branched
        weight keeps its branch and packs ``w`` minus the branch."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=w.device).manual_seed(int(seed) % (2 ** 63))
        w = w.to(self.device)
        if self.branch is not None:
            w = w.float() - branch_weight(*self.branch, self.smooth)
        new = QuantWeight.quantize(w, self.spec, self.dtype, smooth=self.smooth, generator=generator)
        return new.with_branch(*self.branch) if self.branch is not None else new

    def retarget(self, device=None, dtype: torch.dtype | None = None, copy: bool = False) -> "QuantWeight":
        """The same packed weight on ``device`` and/or with another logical dtype."""
        parts = {k: v.to(device=device, copy=copy) if device is not None or copy else v
                 for k, v in self.parts.items()}
        return self._like(parts, dtype)

    def packed_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def bits_per_weight(self) -> float:
        return 8 * self.packed_nbytes() / self.numel()

    def __repr__(self, *, tensor_contents=None):
        return (f"QuantWeight({self.spec.format}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"group={self.spec.group_size}, act_quant={self.spec.act_quant}, "
                f"smooth={self.smooth is not None}, rank={self.rank}, device={self.device})")

    # ---- tensor protocol ----------------------------------------------------------
    def __tensor_flatten__(self):
        # lets torch (and the lab's weight byte counts) see the packed tensors inside
        names = []
        for key, value in self.parts.items():
            object.__setattr__(self, "_part_" + key, value)
            names.append("_part_" + key)
        return names, (self.spec, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        spec, dtype = ctx
        parts = {name[len("_part_"):]: t for name, t in inner.items()}
        return QuantWeight(parts, spec, tuple(outer_size), dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        log.debug("QuantWeight: %s runs on the dequantized weight", func)
        args, kwargs = tree_map(lambda a: a.dequantize() if isinstance(a, QuantWeight) else a, (args, kwargs))
        return func(*args, **kwargs)


def _detach(qw, *args, **kwargs):
    # An alias: shares the parts dict, so an in-place copy_ on ``param.data`` reaches the param.
    return QuantWeight(qw.parts, qw.spec, tuple(qw.shape), qw.dtype)


def _clone(qw, *args, **kwargs):
    return qw._like({k: v.clone() for k, v in qw.parts.items()})


def _to_copy(qw, dtype=None, device=None, layout=None, pin_memory=None, non_blocking=False,
             memory_format=None, **kwargs):
    if dtype is not None and dtype != qw.dtype:
        return qw.dequantize(dtype).to(device=device if device is not None else qw.device)
    return qw.retarget(device=device, copy=True)


def _copy_(dst, src, non_blocking=False):
    if isinstance(dst, QuantWeight):
        if isinstance(src, QuantWeight):
            new = src.retarget(device=dst.device)
            if new.spec != dst.spec:
                raise ValueError(f"cannot copy a {new.spec.format} weight into a {dst.spec.format} weight")
        else:
            new = dst.requantize(src)
        dst.parts.clear()
        dst.parts.update(new.parts)
        return dst
    return dst.copy_(src.dequantize(dst.dtype), non_blocking=non_blocking)


def _empty_like(qw, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None, **kwargs):
    return torch.empty(tuple(qw.shape), dtype=dtype or qw.dtype, device=device or qw.device)


def _shallow_copy_ok(a, b):
    return False


_HANDLERS = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten.clone.default: _clone,
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy_,
    aten.empty_like.default: _empty_like,
    aten._has_compatible_shallow_copy_type.default: _shallow_copy_ok,
}
