"""The VQ nodes in-process on real ComfyUI: latents from a real VAE encode (a random TAESD that
ComfyUI's VAE detection recognises), and Stable Cascade Stage A built by ComfyUI's own VAE class."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(comfy, tmp_path_factory):
    import comfy.sd
    import folder_paths

    from lab import vq_fixtures as fx
    from comfyui_accel.nodes import vq as nv

    # Output, input and codebook folders in a temporary place, never the host ComfyUI's own.
    tmp = tmp_path_factory.mktemp("vq-nodes")
    saved = (folder_paths.get_output_directory(), folder_paths.get_input_directory())
    folder_paths.set_output_directory(str(tmp / "output"))
    folder_paths.set_input_directory(str(tmp / "input"))
    folder_paths.add_model_folder_path(nv.CODEBOOK_FOLDER, str(tmp / "codebooks"), is_default=True)
    with torch.inference_mode():
        taesd = comfy.sd.VAE(sd=fx.taesd_state_dict(seed=0))
        images = fx.smooth_images(4, 96, 96, seed=1)
        latent = {"samples": taesd.encode(images)}
    yield {"nv": nv, "fx": fx, "taesd": taesd, "latent": latent, "images": images, "tmp": tmp}
    folder_paths.set_output_directory(saved[0])
    folder_paths.set_input_directory(saved[1])
    folder_paths.folder_names_and_paths[nv.CODEBOOK_FOLDER][0].remove(str(tmp / "codebooks"))


def run(node, **kwargs):
    with torch.inference_mode():
        return node.execute(**kwargs)


def test_fit_encode_decode_on_real_vae_latents(env):
    from comfyui_accel.metrics import psnr as psnr_db
    nv, latent = env["nv"], env["latent"]
    samples = latent["samples"]
    assert samples.shape == (4, 4, 12, 12)
    fit = run(nv.AccelVQFitCodebook, latent=latent, codebook_size=32, patch_size=1, residual_levels=2,
              iterations=6, seed=0)
    book, report, plot = fit.args
    assert book.vectors.shape == (2, 32, 4) and "utilisation_%" in report and "latent_psnr_db" in report
    assert plot.shape[0] == 1 and plot.shape[-1] == 3
    enc = run(nv.AccelVQEncode, latent=latent, codebook=book, residual_levels=0, vae=env["taesd"])
    tokens, text, _ = enc.args
    assert tokens.indices.shape == (2, 4, 12, 12)
    assert tokens.pixels == 4 * 96 * 96  # from the VAE's own compression factor
    assert "coded_bpp" in text and "bf16 latent" in text
    one = run(nv.AccelVQDecode, tokens=tokens, residual_levels=1).args[0]["samples"]
    two = run(nv.AccelVQDecode, tokens=tokens, residual_levels=0).args[0]["samples"]
    assert one.shape == two.shape == samples.shape
    assert psnr_db(samples, two) > psnr_db(samples, one) > 15
    with torch.inference_mode():
        image = env["taesd"].decode(two)
    assert image.shape == (4, 96, 96, 3)


def test_video_latents_and_pixel_count_without_a_vae(env):
    nv = env["nv"]
    g = torch.Generator().manual_seed(3)
    video = {"samples": torch.randn(1, 16, 3, 8, 8, generator=g)}
    book = run(nv.AccelVQFitCodebook, latent=video, codebook_size=16, patch_size=2, residual_levels=1,
               iterations=3, seed=0).args[0]
    tokens = run(nv.AccelVQEncode, latent=video, codebook=book, residual_levels=0,
                 spatial_compression=8, temporal_compression=4).args[0]
    assert tokens.indices.shape == (1, 1, 3, 4, 4)
    assert tokens.pixels == (1 + 2 * 4) * 64 * 64  # a causal video VAE: 3 latent frames -> 9 frames
    out = run(nv.AccelVQDecode, tokens=tokens, residual_levels=0).args[0]["samples"]
    assert out.shape == video["samples"].shape


def test_shrink_node(env):
    nv, latent = env["nv"], env["latent"]
    big = run(nv.AccelVQFitCodebook, latent=latent, codebook_size=64, patch_size=1, residual_levels=1,
              iterations=4, seed=0).args[0]
    small, report, _ = run(nv.AccelVQShrinkCodebook, codebook=big, codebook_size=8, iterations=5, seed=0,
                           latent=latent).args
    assert small.size == 8 and "from_size: 64" in report


def test_bad_inputs_name_node_and_input(env):
    from comfyui_accel.nodes.common import AccelInputError
    nv, latent = env["nv"], env["latent"]
    with pytest.raises(AccelInputError, match="VQ Fit Codebook [(]AccelVQFitCodebook[)]: input 'codebook_size'.*only 576 vectors"):
        run(nv.AccelVQFitCodebook, latent=latent, codebook_size=1000, patch_size=1, residual_levels=1,
            iterations=2, seed=0)
    wrong = run(nv.AccelVQFitCodebook, latent={"samples": torch.randn(1, 16, 8, 8)}, codebook_size=8,
                patch_size=1, residual_levels=1, iterations=2, seed=0).args[0]
    with pytest.raises(AccelInputError, match="VQ Encode [(]AccelVQEncode[)]: input 'codebook'.*16-channel.*4 channels"):
        run(nv.AccelVQEncode, latent=latent, codebook=wrong, residual_levels=0)
    book = run(nv.AccelVQFitCodebook, latent=latent, codebook_size=8, patch_size=1, residual_levels=1,
               iterations=2, seed=0).args[0]
    with pytest.raises(AccelInputError, match="VQ Encode [(]AccelVQEncode[)]: input 'residual_levels'"):
        run(nv.AccelVQEncode, latent=latent, codebook=book, residual_levels=3)
    with pytest.raises(AccelInputError, match=r"VQGAN Encode \(Stage A\) \(AccelVQGANEncode\): input 'vae'.*Stage A"):
        run(nv.AccelVQGANEncode, image=env["images"], vae=env["taesd"], report_psnr=False)


def test_token_files_through_the_nodes(env):
    import folder_paths

    from comfyui_accel.nodes.common import AccelInputError
    nv, latent = env["nv"], env["latent"]
    book = run(nv.AccelVQFitCodebook, latent=latent, codebook_size=16, patch_size=2, residual_levels=1,
               iterations=4, seed=0).args[0]
    tokens = run(nv.AccelVQEncode, latent=latent, codebook=book, residual_levels=0).args[0]
    with pytest.raises(AccelInputError, match="VQ Save Tokens [(]AccelVQSaveTokens[)]: input 'embed_codebook'.*VQ Save Codebook"):
        run(nv.AccelVQSaveTokens, tokens=tokens, filename_prefix="vq_tokens/t", embed_codebook=False)

    first = run(nv.AccelVQSaveTokens, tokens=tokens, filename_prefix="vq_tokens/t", embed_codebook=True)
    second = run(nv.AccelVQSaveTokens, tokens=tokens, filename_prefix="vq_tokens/t", embed_codebook=True)
    names = [o.ui["vq_tokens"][0]["filename"] for o in (first, second)]
    assert names[0] != names[1]  # never overwritten
    assert "file_bpp" in first.args[0]

    listed = nv._token_files()
    choice = f"vq_tokens/{names[0]} [output]"
    assert choice in listed
    loaded, report = run(nv.AccelVQLoadTokens, token_file=choice).args
    assert torch.equal(loaded.indices, tokens.indices) and "file_bpp" in report
    assert torch.equal(run(nv.AccelVQDecode, tokens=loaded, residual_levels=0).args[0]["samples"],
                       run(nv.AccelVQDecode, tokens=tokens, residual_levels=0).args[0]["samples"])

    other = run(nv.AccelVQFitCodebook, latent=latent, codebook_size=16, patch_size=2, residual_levels=1,
                iterations=4, seed=1).args[0]
    with pytest.raises(AccelInputError, match="VQ Load Tokens [(]AccelVQLoadTokens[)]: input 'codebook'.*another codebook"):
        run(nv.AccelVQLoadTokens, token_file=choice, codebook=other)

    path = folder_paths.get_annotated_filepath(choice)
    data = open(path, "rb").read()
    cut = env["tmp"] / "output" / "vq_tokens" / "cut.vqt"
    cut.write_bytes(data[: len(data) - 40])
    with pytest.raises(AccelInputError, match="VQ Load Tokens [(]AccelVQLoadTokens[)]: input 'token_file'.*(truncated|damaged)"):
        run(nv.AccelVQLoadTokens, token_file="vq_tokens/cut.vqt [output]")

    # By reference: save the codebook, encode with it, save tokens without it, load finds it by name.
    saved_book = run(nv.AccelVQSaveCodebook, codebook=book, filename_prefix="book").args[0]
    assert saved_book.path and saved_book.sha256() == book.sha256()
    tokens2 = run(nv.AccelVQEncode, latent=latent, codebook=saved_book, residual_levels=0).args[0]
    out = run(nv.AccelVQSaveTokens, tokens=tokens2, filename_prefix="vq_tokens/ref", embed_codebook=False)
    small = out.ui["vq_tokens"][0]["filename"]
    assert (env["tmp"] / "output" / "vq_tokens" / small).stat().st_size < len(data)
    loaded2, report2 = run(nv.AccelVQLoadTokens, token_file=f"vq_tokens/{small} [output]").args
    assert loaded2.codebook is not None and loaded2.codebook.sha256() == book.sha256()
    assert f"codebook: models/vq_codebooks/{Path(saved_book.path).name}" in report2
    name = Path(saved_book.path).name
    assert run(nv.AccelVQLoadCodebook, codebook_name=name).args[0].sha256() == book.sha256()


def test_stage_a_vqgan_tokens_match_the_models_own_quantizer(env, tmp_path):
    import comfy.sd

    from comfyui_accel import files
    from comfyui_accel.vq import tokens as tk
    nv, fx = env["nv"], env["fx"]
    with torch.inference_mode():
        vae = comfy.sd.VAE(sd=fx.stage_a_state_dict(seed=0))
    codebook_before = vae.first_stage_model.vquantizer.codebook.weight.detach().clone()
    images = fx.smooth_images(2, 48, 40, seed=5)
    tokens, report, plot = run(nv.AccelVQGANEncode, image=images, vae=vae, report_psnr=True).args
    assert tokens.kind == "vqgan" and tokens.indices.shape == (1, 2, 12, 10)
    assert tokens.pixels == 2 * 48 * 40 and "image_psnr_db" in report
    with torch.inference_mode():
        latent = vae.encode(images)
        # The model's own quantizer (ComfyUI's StageA.vquantizer) picks the same codes.
        _, _, own = vae.first_stage_model.vquantizer(latent.float(), get_losses=False, dim=1)
    assert (own.reshape(-1) == tokens.indices.reshape(-1)).float().mean() >= 0.999
    path = files.write_new(tmp_path, "img", ".vqt", tk.tokens_bytes(tokens, embed_codebook=False)[0])
    loaded, _ = tk.load_tokens(path)
    image = run(nv.AccelVQGANDecode, tokens=loaded, vae=vae).args[0]
    with torch.inference_mode():
        direct = vae.decode(codebook_before[own].permute(0, 3, 1, 2))
    assert image.shape == (2, 48, 40, 3)
    assert torch.allclose(image, direct, atol=1e-4)
    assert torch.equal(vae.first_stage_model.vquantizer.codebook.weight, codebook_before)  # model untouched
    with pytest.raises(Exception, match="VQ Decode [(]AccelVQDecode[)]: input 'tokens'.*VQGAN Decode"):
        run(nv.AccelVQDecode, tokens=loaded, residual_levels=0)
