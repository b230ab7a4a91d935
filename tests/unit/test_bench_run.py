"""lab/bench/run.py's report plumbing: sections, the projection at the end, and publishing into
docs/ and the README's marked block without touching the rest of the README."""
import types

import pytest

from lab.bench import run as bench_run

INFO = {"date": "2026-01-01 00:00", "quick": True,
        "machine": {"processor": "Test CPU", "cores": 2, "cpus": 1, "platform": "Linux", "torch": "2.x",
                    "cuda": None}}


def _module_with_picture(out):
    (out / "demo").mkdir(parents=True)
    (out / "demo" / "plot.png").write_bytes(b"\x89PNG fake")
    module = types.SimpleNamespace(
        markdown=lambda rows, images: "## demo section\n" + " ".join(f"![p]({i})" for i in images),
        readme=lambda rows, images: "demo table " + " ".join(f"![p]({i})" for i in images))
    rows = [bench_run.normalise({"name": "demo", "speedup": 2.0}, "bench_demo")]
    return [("bench_demo", module, rows, ["demo/plot.png"])], rows


def test_report_has_the_modules_sections_generic_tables_and_the_projection(tmp_path):
    done, rows = _module_with_picture(tmp_path)
    other = bench_run.normalise({"name": "x", "variant": "v", "speedup": 1.5}, "bench_other")
    report, block = bench_run.render(done, rows + [other], INFO, "")
    assert "## demo section" in report and "![p](demo/plot.png)" in report
    assert "## bench_other" in report and "| x |" in report
    assert "Projection to real models on GPUs" in report
    assert "Test CPU, 2 cores" in block and "demo table" in block


def test_publish_fills_only_the_marked_block(tmp_path):
    out, repo = tmp_path / "out", tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    readme = f"# Title\n\nbefore\n\n{bench_run.README_BEGIN}\nold\n{bench_run.README_END}\n\nafter\n"
    (repo / "README.md").write_text(readme)
    done, rows = _module_with_picture(out)
    bench_run.publish(out, done, rows, INFO, repo=repo)
    text = (repo / "README.md").read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "old" not in text and "![p](docs/bench/demo/plot.png)" in text
    assert (repo / "docs" / "bench" / "demo" / "plot.png").read_bytes() == b"\x89PNG fake"
    assert "![p](bench/demo/plot.png)" in (repo / "docs" / "bench.md").read_text()
    # Publishing again replaces the block instead of adding a second one.
    bench_run.publish(out, done, rows, INFO, repo=repo)
    assert (repo / "README.md").read_text().count(bench_run.README_BEGIN) == 1


def test_publish_refuses_a_readme_without_the_markers(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# no markers\n")
    with pytest.raises(RuntimeError, match="bench:begin"):
        bench_run.publish(tmp_path, [], [], INFO, repo=tmp_path)
    assert (tmp_path / "README.md").read_text() == "# no markers\n"
    assert not (tmp_path / "docs" / "bench.md").exists()


def test_only_picks_benchmarks_by_parts_of_their_names():
    every = bench_run.discover()
    assert "bench_stack" in every and "bench_cache" in every
    assert bench_run.discover("stack") == ["bench_stack"]
    assert bench_run.discover("stack, cache") == ["bench_cache", "bench_stack"]
    assert bench_run.discover("nothing-like-it") == []
