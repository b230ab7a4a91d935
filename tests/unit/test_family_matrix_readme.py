"""The README's family matrix block: rewritten in place, everything outside it untouched."""
import pytest

from lab import families, family_matrix


def run(host, status="measured", absent=()):
    cell = {"status": status, "psnr": 40.0 if status == "measured" else None, "detail": "X: input 'model' is a F "
            "model: because. Y.", "checks": {}}
    return {"host": host, "steps": 6, "families": {
        f.name: ({"absent": f"ComfyUI {host} has no {f.config}"} if f.name in absent else
                 {"cells": {k: dict(cell) for k in family_matrix.NODES}}) for f in families.FAMILIES}}


def test_rewrite_replaces_only_the_block_and_is_idempotent(tmp_path):
    readme = tmp_path / "README.md"
    before, after = "# Title\n\nText\nwith lines.\n\n", "\n## Next\n\nMore text.\n"
    readme.write_text(f"{before}{family_matrix.README_BEGIN}\nold\n{family_matrix.README_END}{after}")
    main, old = run("0.33.0"), run("0.3.75", status="refused", absent=("flux2",))
    family_matrix.update_readme(main, old, readme)
    once = readme.read_text()
    family_matrix.update_readme(main, old, readme)
    assert readme.read_text() == once
    assert once.startswith(before + family_matrix.README_BEGIN) and once.endswith(family_matrix.README_END + after)
    rows = family_matrix.readme_rows(family_matrix.readme_block(once))
    assert set(rows) == {f.title for f in families.FAMILIES}
    assert rows["Flux 2 (dev, Klein)"][-1] == "absent"
    assert rows["Wan 2.2 TI2V 5B"][1:5] == ["40.0 dB"] * 4
    assert rows["Wan 2.2 TI2V 5B"][-1].startswith("as above, except Quantize Model (int8) refused")


def test_a_readme_without_the_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    with pytest.raises(RuntimeError, match="families:begin"):
        family_matrix.update_readme(run("0.33.0"), None, readme)
    assert readme.read_text() == "# Title\n"
