"""Test-only ComfyUI nodes: random conditioning, in-process fixture models, empty latents.

Loaded only by the test server (``lab.host.ComfyServer`` links this folder into
``custom_nodes/``), never shipped as part of the pack's node list. They stand in for
what a test machine does not have: text encoders, and model files for families whose
stock detection refuses a small model (see ``lab/fixtures.py``).
"""
from __future__ import annotations

import json

from comfy_api.latest import ComfyExtension, io, ui

from lab.measure import model_weight_bytes

from lab import fixtures, reference

CATEGORY = "accel/testing"
FAMILY_NAMES = list(fixtures.FAMILIES)
IN_PROCESS = [name for name, spec in fixtures.FAMILIES.items() if not spec.loadable]
REFERENCE_NAMES = list(reference.MODELS)


class AccelTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AccelTestConditioning",
            display_name="Test Conditioning (random)",
            category=CATEGORY,
            description="A random CONDITIONING shaped like the family's text encoder output (test only).",
            inputs=[
                io.Combo.Input("family", options=FAMILY_NAMES, default="wan21"),
                io.Combo.Input("size", options=list(fixtures.SIZES), default="tiny"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.Int.Input("batch", default=1, min=1, max=64),
                io.Int.Input("tokens", default=0, min=0, max=4096,
                             tooltip="Text tokens; 0 takes the fixture's default for this size."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, family, size, seed, batch, tokens) -> io.NodeOutput:
        return io.NodeOutput(fixtures.make_conditioning(family, size, batch=batch, seed=seed, tokens=tokens or None))


class AccelTestFluxLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AccelTestFluxLoader",
            display_name="Test Fixture Model Loader",
            category=CATEGORY,
            description=("Builds a small random-weight fixture model in-process: the families the stock "
                         f"loaders refuse when small ({', '.join(IN_PROCESS)}), and the others too; or a "
                         f"trained reference model ({', '.join(REFERENCE_NAMES)}; size, seed and outliers "
                         "do not apply to those) (test only)."),
            inputs=[
                io.Combo.Input("family", options=FAMILY_NAMES + REFERENCE_NAMES, default="flux"),
                io.Combo.Input("size", options=list(fixtures.SIZES), default="tiny"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.Boolean.Input("outliers", default=False,
                                 tooltip="Plant activation-outlier channels in the feed-forward layers."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, family, size, seed, outliers) -> io.NodeOutput:
        if family in reference.MODELS:
            return io.NodeOutput(reference.load_reference(family))
        return io.NodeOutput(fixtures.load_model(family, size, seed=seed, outliers=outliers))


class AccelTestReferencePrompt(io.ComfyNode):
    """The text encoder of the trained reference models: a caption over their small vocabulary."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AccelTestReferencePrompt",
            display_name="Test Reference Prompt",
            category=CATEGORY,
            description=("CONDITIONING for a trained reference model from a caption such as \"red circle\" "
                         "or \"blue square moving right\"; an empty caption is the negative prompt (test only)."),
            inputs=[
                io.Combo.Input("model", options=REFERENCE_NAMES, default=REFERENCE_NAMES[0]),
                io.String.Input("caption", default="red circle moving right",
                                tooltip="Words from: " + ", ".join(reference.data.VOCABULARY) + "."),
                io.Int.Input("batch", default=1, min=1, max=64),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def validate_inputs(cls, model, caption, batch):
        try:
            reference.embed_captions([caption])
        except ValueError as e:
            return f"AccelTestReferencePrompt: caption: {e}"
        return True

    @classmethod
    def execute(cls, model, caption, batch) -> io.NodeOutput:
        return io.NodeOutput(reference.make_conditioning(model, caption, batch=batch))


class AccelTestPatchDecode(io.ComfyNode):
    """The reference models' stand-in VAE: latent -> pixels with the fixed patch autoencoder."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AccelTestPatchDecode",
            display_name="Test Patch Decode",
            category=CATEGORY,
            description="Decodes a reference model's latent to IMAGE frames with the fixed patch autoencoder (test only).",
            inputs=[
                io.Latent.Input("samples"),
                io.Combo.Input("model", options=REFERENCE_NAMES, default=REFERENCE_NAMES[0],
                               tooltip="Which reference model made the latent (its latent format)."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples, model) -> io.NodeOutput:
        pixels = reference.decode(model, samples["samples"])
        return io.NodeOutput(reference.autoencoder.to_comfy_image(pixels))


class AccelTestEmptyLatent(io.ComfyNode):
    """For families whose stock empty-latent node needs a VAE (Wan 2.2 5B), or any family."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AccelTestEmptyLatent",
            display_name="Test Empty Latent",
            category=CATEGORY,
            description="Zeros shaped like the family's latent for this pixel size (test only).",
            inputs=[
                io.Combo.Input("family", options=FAMILY_NAMES, default="wan22_5b"),
                io.Int.Input("width", default=256, min=16, max=8192, step=16),
                io.Int.Input("height", default=256, min=16, max=8192, step=16),
                io.Int.Input("length", default=9, min=1, max=1024, tooltip="Pixel frames (video families)."),
                io.Int.Input("batch_size", default=1, min=1, max=64),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, family, width, height, length, batch_size) -> io.NodeOutput:
        import torch
        shape = fixtures.latent_shape(family, width, height, length, batch_size)
        return io.NodeOutput({"samples": torch.zeros(shape)})


class AccelTestModelInfo(io.ComfyNode):
    """Shows the weight bytes of a MODEL as it will run (our swapped layers counted)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AccelTestModelInfo",
            display_name="Test Model Info",
            category=CATEGORY,
            description="Shows the MODEL's diffusion-model weight bytes as JSON text (test only).",
            inputs=[io.Model.Input("model")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        info = {"weight_bytes": model_weight_bytes(model), "class": type(model.model).__name__}
        return io.NodeOutput(ui=ui.PreviewText(json.dumps(info)))


class AccelFixtureExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [AccelTestConditioning, AccelTestFluxLoader, AccelTestEmptyLatent, AccelTestModelInfo,
                AccelTestReferencePrompt, AccelTestPatchDecode]


async def comfy_entrypoint() -> AccelFixtureExtension:
    return AccelFixtureExtension()
