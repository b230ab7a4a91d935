"""The one check every node's inputs pass before the node runs, on every host.

Every node of the pack derives from :class:`AccelNode`. Its ``execute`` is wrapped so the
inputs are checked against the node's own schema first, whoever calls it (ComfyUI's executor,
a test, a benchmark), and whatever the host checked already: ComfyUI 0.33 refuses a combo value
outside its options when the prompt is queued, 0.3.75 does not check V3 combos at all, and no
host refuses NaN in a FLOAT (NaN passes every ``<`` and ``>``) or checks a value that arrives
through a link. The rules, from the schema alone:

- a combo value is one of its options (an option ``128`` also accepts ``"128"``);
- an INT is an integer and a FLOAT a finite number, both within the widget's min and max;
- a BOOLEAN is a bool; a STRING is text without NUL characters, of bounded length;
- LATENT, MODEL and the pack's own types are the objects they name.

The node then checks what depends on several inputs with :func:`fail`, and turns every file
name a user or a file gives into a path with :func:`folder_file` / :func:`output_folder`,
which keep it inside ComfyUI's input, output and models folders.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
from pathlib import Path

import torch
from comfy_api.latest import io

from .. import files
from .common import AccelInputError, fail, node_name

MAX_TEXT = 1024                 # characters of a one-line STRING input
MAX_MULTILINE_TEXT = 64 * 1024  # ... and of a multiline one
_SHOWN_OPTIONS = 20             # a longer option list is summarised in messages

_CUSTOM_TYPES: dict[str, tuple[type, str]] = {}


def custom_type(name: str, cls: type, what: str):
    """``io.Custom(name)`` whose inputs must be ``cls`` objects (``what`` says where they come from)."""
    _CUSTOM_TYPES[name] = (cls, what)
    return io.Custom(name)


class AccelNode(io.ComfyNode):
    """Base class of every node in the pack: ``execute`` runs on checked inputs."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        execute = cls.__dict__.get("execute")
        # ComfyUI clones node classes (a subclass with the same dict): wrap once.
        if isinstance(execute, classmethod) and not getattr(execute.__func__, "_accel_checked", False):
            cls.execute = classmethod(_checked(execute.__func__))


def _checked(run):
    signature = inspect.signature(run)

    @functools.wraps(run)
    def execute(cls, *args, **kwargs):
        schema = cls.define_schema()
        try:
            bound = signature.bind(cls, *args, **kwargs)
        except TypeError as e:  # a missing or unknown input
            raise AccelInputError(f"{node_name(schema)}: {e}") from None
        return run(cls, **check_inputs(schema, dict(list(bound.arguments.items())[1:])))

    execute._accel_checked = True
    return execute


def check_inputs(schema: io.Schema, values: dict) -> dict:
    """``values`` checked against ``schema`` (see the module notes), combo strings mapped to
    their options' type; raises AccelInputError naming the node, the input, the value and what
    is allowed."""
    node = node_name(schema)
    out = dict(values)
    for spec in schema.inputs:
        name = spec.id
        if name not in values or (values[name] is None and spec.optional):
            continue
        out[name] = _check_one(node, name, spec, values[name])
    return out


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _check_one(node: str, name: str, spec, value):
    if isinstance(spec, io.Combo.Input):
        return _combo(node, name, list(spec.options or []), value)
    if isinstance(spec, io.Boolean.Input):
        if not isinstance(value, bool):
            fail(node, name, f"must be true or false, got {_shown(value)}")
        return value
    if isinstance(spec, io.Int.Input):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            fail(node, name, f"must be a whole number, got {_shown(value)}")
        return _in_range(node, name, int(value), spec.min, spec.max)
    if isinstance(spec, io.Float.Input):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            fail(node, name, f"must be a number, got {_shown(value)}")
        value = float(value)
        if not math.isfinite(value):
            fail(node, name, f"must be a finite number, got {value}")
        return _in_range(node, name, value, spec.min, spec.max)
    if isinstance(spec, io.String.Input):
        if not isinstance(value, str):
            fail(node, name, f"must be text, got {_shown(value)}")
        limit = MAX_MULTILINE_TEXT if spec.multiline else MAX_TEXT
        if len(value) > limit:
            fail(node, name, f"is {len(value)} characters long; at most {limit} are allowed")
        if "\x00" in value:
            fail(node, name, "contains a NUL character")
        return value
    _check_object(node, name, str(spec.get_io_type()), value)
    return value


def _combo(node: str, name: str, options: list, value):
    for option in options:
        if type(option) is type(value) and option == value:
            return value
    if isinstance(value, str):  # "128" for the option 128: what an API client may send
        for option in options:
            if not isinstance(option, str) and str(option) == value:
                return option
    if len(options) > _SHOWN_OPTIONS:
        allowed = f"one of the {len(options)} listed options (e.g. {', '.join(map(repr, options[:3]))})"
    elif options:
        allowed = f"one of {', '.join(map(repr, options))}"
    else:
        allowed = "nothing yet: the list is empty"
    fail(node, name, f"is {_shown(value)}, which is not an option; allowed: {allowed}")


def _in_range(node: str, name: str, value, low, high):
    if (low is not None and value < low) or (high is not None and value > high):
        fail(node, name, f"is {value}; allowed: {low} to {high}")
    return value


def _check_object(node: str, name: str, io_type: str, value) -> None:
    if io_type == "LATENT":
        if not (isinstance(value, dict) and isinstance(value.get("samples"), torch.Tensor)):
            fail(node, name, "must be a LATENT (a dict with a 'samples' tensor)")
    elif io_type == "MODEL":
        from comfy.model_patcher import ModelPatcher
        if not isinstance(value, ModelPatcher):
            fail(node, name, f"must be a MODEL (a ModelPatcher), got {type(value).__name__}")
    elif io_type in _CUSTOM_TYPES:
        cls, what = _CUSTOM_TYPES[io_type]
        if not isinstance(value, cls):
            fail(node, name, f"must be {what}, got {type(value).__name__}")


# ---------------------------------------------------------------- file names


def comfy_folders() -> list[str]:
    """ComfyUI's input, output and models folders (extra model paths included): where a file
    the pack opens may be, also at the end of a symbolic link."""
    import folder_paths
    folders = {folder_paths.get_input_directory(), folder_paths.get_output_directory(), folder_paths.models_dir}
    for kind, (paths, _) in folder_paths.folder_names_and_paths.items():
        if kind != "custom_nodes":
            folders.update(paths)
    return sorted(folders)


def folder_file(node: str, name: str, value: str, roots: list[str], what: str) -> Path:
    """The file ``value`` names in one of ``roots``, resolved (``..`` and symbolic links) and kept
    inside ComfyUI's folders, before anything opens it. A missing file and one outside get the
    same message, so the answer says nothing about files elsewhere."""
    allowed = comfy_folders()
    for root in roots:
        path = files.inside(root, value, allowed)
        if path is not None and path.is_file():
            return path
    fail(node, name, f"is {_shown(value)}, which is not {what}; choose one of the files the list offers (a "
                     "symbolic link to a file outside ComfyUI's input, output and models folders is not followed)")


def annotated_file(value: str) -> tuple[str, str]:
    """(name, root) of a combo value in ComfyUI's ``name [output]`` / ``[input]`` notation."""
    import folder_paths
    for tag, root in ((" [output]", folder_paths.get_output_directory()),
                      (" [input]", folder_paths.get_input_directory())):
        if value.endswith(tag):
            return value[:-len(tag)], root
    return value, folder_paths.get_input_directory()


def output_folder(node: str, name: str, prefix: str, root: str, where: str = "the output folder") -> tuple[str, str]:
    """(folder, file stem) for ``prefix`` (``sub/folders/stem``) under ``root`` (``where`` names it
    in messages): no absolute paths, no ``..``, no NUL, parts a file system accepts, and a folder
    that resolves inside ``root`` (a symbolic link out of it is refused)."""
    text = prefix.strip().replace("\\", "/")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    rule = f"must be a relative file name, optionally under folders, inside {where}"
    if not parts or os.path.isabs(text) or text[1:2] == ":" or ".." in parts:
        fail(node, name, f"is {_shown(prefix)}; it {rule}")
    try:
        files.check_name(text + "_00000_.safetensors")
    except files.FileNameError as e:
        fail(node, name, f"{e}; it {rule}")
    folder = root if len(parts) == 1 else files.inside(root, "/".join(parts[:-1]))
    if folder is None:
        fail(node, name, f"is {_shown(prefix)}; it {rule}")
    return str(folder), parts[-1]
