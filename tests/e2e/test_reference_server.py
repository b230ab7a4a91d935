"""The trained reference Wan through a real server: stock UNETLoader, KSampler, decoded frames saved."""
import numpy as np
import pytest
from PIL import Image

from lab import reference

pytestmark = pytest.mark.e2e


def test_reference_wan_samples_pictures_through_the_server(comfy_server):
    reference.write_reference("ref_wan21", comfy_server.models_dir)
    spec = reference.reference_spec("ref_wan21")
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": spec.filename, "weight_dtype": "default"}},
        "2": {"class_type": "AccelTestReferencePrompt",
              "inputs": {"model": "ref_wan21", "caption": "red circle moving right", "batch": 1}},
        "3": {"class_type": "AccelTestReferencePrompt", "inputs": {"model": "ref_wan21", "caption": "", "batch": 1}},
        # The stock node's /8 spatial and 4k+1 frames give the patch latent of 32x32 pixels, 4 frames.
        "4": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": spec.width * 4, "height": spec.height * 4, "length": 4 * (spec.length - 1) + 1,
                         "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 11, "steps": 6, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "AccelTestPatchDecode", "inputs": {"samples": ["5", 0], "model": "ref_wan21"}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "e2e_ref_wan"}},
    }
    entry = comfy_server.run(prompt)
    files = comfy_server.output_files(entry, "7")
    assert len(files) == spec.length
    frames = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in files]
    assert all(f.shape == (spec.height, spec.width, 3) for f in frames)
    assert all(f.std() > 0.03 for f in frames)          # pictures, not a flat colour
    # the caption asks for red: some pixels are clearly red
    reddish = [((f[..., 0] > 0.5) & (f[..., 2] < 0.35) & (f[..., 1] < 0.35)).mean() for f in frames]
    assert max(reddish) > 0.02, reddish


def test_a_bad_caption_is_a_clear_error(comfy_server):
    from lab.host import PromptError
    prompt = {
        "2": {"class_type": "AccelTestReferencePrompt",
              "inputs": {"model": "ref_wan21", "caption": "purple circle", "batch": 1}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    with pytest.raises(PromptError, match="purple"):
        comfy_server.run(prompt)
