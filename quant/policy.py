"""Which linear layers get quantized, and how: roles by name, then the user's overrides.

Roles come from the layer's path inside ``diffusion_model``, named as in ComfyUI's model classes
(Wan, Flux/Chroma, HunyuanVideo, LTX-Video, SD3/MMDiT, SD1.5/SDXL, Lumina 2, Qwen-Image, HiDream...):

- ``embedding``, ``final`` -> kept: the entry and output projections (every quantization study keeps
  them); ``timestep`` -> kept: the timestep/guidance MLPs are tiny, run on one token per sample, and
  their errors shift every block at once (TFMQ-DM, Q-Diffusion);
- ``modulation`` (adaLN: Flux ``img_mod``, SD3 ``adaLN_modulation``...) -> weight-only: its input, the
  timestep vector, moves its range with the timestep, which breaks activation quantization (PTQ4DiT,
  ViDiT-Q), while its weights quantize fine (nunchaku: W4A16) and hold about a quarter of Flux's;
- ``linear`` (attention, MLP) -> the chosen format.

Overrides are lines ``<regex> = keep | <format> [weight_only]``, first match wins, before the roles.
They run in the ``regex`` module with a time limit (``re`` can backtrack for hours on a pattern like
``^(([a-z_0-9]+[.]?)+)+!`` and cannot be interrupted): one node run gets ``MATCH_SECONDS`` in all.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import regex

from . import formats
from .formats import Spec

_ROLE_PATTERNS = [
    ("final", r"^(final_layer|head|norm_out|proj_out|final_linear|last_layer|out)(\.|$)"),
    ("timestep", r"^(time_in|vector_in|guidance_in|time_r_in|t_embedder|time_embedding|time_embed|"
                 r"time_projection|time_text_embed|timestep_embedder|adaln_single|label_emb|t_block)(\.|$)"),
    ("embedding", r"^(img_in|txt_in|x_embedder|context_embedder|patchify_proj|patch_embedding|"
                  r"input_embedder|c_embedder|cap_embedder|caption_projection|text_embedding|img_emb|"
                  r"y_embedder|pos_embed|vision_in|audio_proj\w*|ref_conv|proj_in)(\.|$)"),
    ("modulation", r"(^|\.)(img_mod|txt_mod|modulation|adaLN_modulation|emb_layers|norm1_context|"
                   r"double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)"
                   r"(\.|$)|(^|\.)norm1\.linear$"),
]
KEPT_ROLES = ("final", "timestep", "embedding")

_REASONS = {
    "final": "output projection: kept in high precision",
    "timestep": "timestep/guidance embedding: kept in high precision",
    "embedding": "input embedding: kept in high precision",
    "modulation": "modulation: weight-only (its input range moves with the timestep)",
    "linear": "attention/MLP linear",
}


def role_of(path: str) -> str:
    for role, pattern in _ROLE_PATTERNS:
        if re.search(pattern, path):
            return role
    return "linear"


MAX_OVERRIDE_LINES = 256
MAX_PATTERN_CHARS = 1000
MATCH_SECONDS = 2.0


class PatternError(ValueError):
    """A layer_overrides pattern that took too long to match."""


@dataclass
class _Clock:
    """Time left for matching, shared by the overrides of one parse; starts at the first match."""
    seconds: float = MATCH_SECONDS
    deadline: float | None = None

    def left(self) -> float:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.seconds
        return max(0.0, self.deadline - time.monotonic())


@dataclass
class Override:
    pattern: regex.Pattern
    action: str            # "keep" or a format name
    weight_only: bool
    line: str
    clock: _Clock = field(default_factory=_Clock, repr=False, compare=False)

    def matches(self, path: str) -> bool:
        try:
            return self.pattern.search(path, timeout=self.clock.left()) is not None
        except TimeoutError:
            raise PatternError(f"line {self.line!r}: matching the layer names took more than {self.clock.seconds:g} s "
                               "(a pattern that backtracks, like nested repeats '(a+)+'); write a simpler "
                               "pattern") from None


def parse_overrides(text: str, seconds: float = MATCH_SECONDS) -> list[Override]:
    """Parse ``<regex> = <action>`` lines; raises ValueError with the bad line named. Matching
    with the result may take ``seconds`` in all (PatternError beyond)."""
    out = []
    clock = _Clock(seconds)
    lines = [raw.strip() for raw in (text or "").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if len(lines) > MAX_OVERRIDE_LINES:
        raise ValueError(f"has {len(lines)} rules; at most {MAX_OVERRIDE_LINES} are allowed")
    for line in lines:
        if "=" not in line:
            raise ValueError(f"line {line!r} has no '='; write '<regex> = keep' or '<regex> = <format>'")
        pattern_text, action_text = (s.strip() for s in line.rsplit("=", 1))
        if len(pattern_text) > MAX_PATTERN_CHARS:
            raise ValueError(f"line {line[:40]!r}...: the pattern is {len(pattern_text)} characters long; at most "
                             f"{MAX_PATTERN_CHARS} are allowed")
        try:
            pattern = regex.compile(pattern_text)
        except (regex.error, OverflowError, RecursionError) as e:
            raise ValueError(f"line {line!r}: the pattern is not a valid regular expression ({e})") from None
        words = action_text.split()
        action = words[0] if words else ""
        weight_only = words[1:] == ["weight_only"]
        if action != "keep" and action not in formats.FORMATS or (words[1:] and not weight_only):
            raise ValueError(f"line {line!r}: the action must be 'keep', a format "
                             f"({', '.join(formats.FORMATS)}) or a format followed by 'weight_only'")
        out.append(Override(pattern, action, weight_only, line, clock))
    return out


@dataclass
class LayerPlan:
    path: str                 # inside diffusion_model
    shape: tuple[int, int]    # (out_features, in_features)
    role: str
    spec: Spec | None         # None: kept in high precision
    reason: str
    auto: bool = False        # the format is left to ``auto.allocate``


def plan_layer(path: str, shape: tuple[int, int], fmt: str, group_size: int | None,
               overrides: list[Override]) -> LayerPlan:
    """The plan for one layer (``fmt`` may be "auto"). A format that cannot hold the layer
    raises LayerError."""
    role = role_of(path)
    for ov in overrides:
        if ov.matches(path):
            if ov.action == "keep":
                return LayerPlan(path, shape, role, None, f"override '{ov.line}': kept")
            spec = make_spec(ov.action, group_size, act_quant=not ov.weight_only)
            return LayerPlan(path, shape, role, _checked(spec, shape, path), f"override '{ov.line}'")
    if role in KEPT_ROLES:
        return LayerPlan(path, shape, role, None, _REASONS[role])
    if fmt == "auto":
        return LayerPlan(path, shape, role, None, _REASONS[role], auto=True)
    spec = make_spec(fmt, group_size, act_quant=role != "modulation")
    return LayerPlan(path, shape, role, _checked(spec, shape, path), _REASONS[role])


def make_spec(fmt: str, group_size: int | None, act_quant: bool) -> Spec:
    f = formats.get(fmt)
    return Spec(fmt, group_size if f.grouped else None, act_quant and f.act_bits is not None)


class LayerError(ValueError):
    """A format that cannot hold a layer; ``path`` names the layer."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


def _checked(spec: Spec, shape, path) -> Spec:
    problem = formats.get(spec.format).problem(shape, spec)
    if problem:
        raise LayerError(f"layer {path} {tuple(shape)}: {problem}", path)
    return spec
