"""The workflow file format, without a server: how a frontend reads ``widgets_values`` (the
converter mirrors it) and how the generator writes one file that every supported ComfyUI reads.

The node schemas below are the /object_info entries of the two hosts, cut down to what matters:
0.3.75's SaveVideo has plain combos, 0.33's a DynamicCombo ``format`` whose option brings a
``codec`` DynamicCombo (whose "h264" brings an optional ``encoding`` one, whose "re-encode" brings
``crf`` and ``color_space``) plus a hidden optional top-level ``codec``; 0.33's CreateVideo gained
an optional ``bit_depth``; its PreviewAny gained a STRING output.
"""
from __future__ import annotations

from lab import workflows
from lab.make_workflows import Graph

DC = workflows.DYNAMIC_COMBO
ENCODING = [DC, {"options": [{"key": "auto", "inputs": {"required": {}}},
                             {"key": "re-encode", "inputs": {"required": {
                                 "crf": ["FLOAT", {"default": 23.0}],
                                 "color_space": [["auto", "sRGB", "HDR"], {"default": "auto"}]}}}]}]
CODEC = [DC, {"options": [{"key": "auto", "inputs": {"required": {}}},
                          {"key": "h264", "inputs": {"required": {}, "optional": {"encoding": ENCODING}}}]}]
FORMAT = [DC, {"options": [{"key": key, "inputs": {"required": {"codec": CODEC}}} for key in ("auto", "mp4")]}]

HOST_0_3_75 = {
    "SaveVideo": {"input": {"required": {"video": ["VIDEO"], "filename_prefix": ["STRING", {"default": "video/ComfyUI"}],
                                         "format": [["auto", "mp4"], {"default": "auto"}],
                                         "codec": [["auto", "h264"], {"default": "auto"}]}},
                  "input_order": {"required": ["video", "filename_prefix", "format", "codec"]},
                  "output": [], "output_name": [], "output_node": True},
    "CreateVideo": {"input": {"required": {"images": ["IMAGE"], "fps": ["FLOAT", {"default": 30.0}]},
                              "optional": {"audio": ["AUDIO"]}},
                    "input_order": {"required": ["images", "fps"], "optional": ["audio"]},
                    "output": ["VIDEO"], "output_name": ["VIDEO"]},
    "PreviewAny": {"input": {"required": {"source": ["*"]}}, "input_order": {"required": ["source"]},
                   "output": [], "output_name": [], "output_node": True},
    # One of ours: the same on every host, so its optional values are written too.
    "AccelReportStub": {"input": {"required": {"seed": ["INT", {"default": 0}]},
                                  "optional": {"scale": ["INT", {"default": 8}]}},
                        "input_order": {"required": ["seed"], "optional": ["scale"]},
                        "output": ["STRING", "IMAGE"], "output_name": ["report", "plot"],
                        "python_module": "custom_nodes.ComfyUI-Accel"},
}
HOST_0_33 = {
    "SaveVideo": {"input": {"required": {"video": ["VIDEO"], "filename_prefix": ["STRING", {"default": "video/ComfyUI"}],
                                         "format": FORMAT},
                            "optional": {"codec": [CODEC[0], {**CODEC[1], "hidden": True}]}},
                  "input_order": {"required": ["video", "filename_prefix", "format"], "optional": ["codec"]},
                  "output": ["VIDEO"], "output_name": ["video"], "output_node": True},
    "CreateVideo": {"input": {"required": {"images": ["IMAGE"], "fps": ["FLOAT", {"default": 30.0}]},
                              "optional": {"audio": ["AUDIO"], "bit_depth": ["INT", {"default": 8}]}},
                    "input_order": {"required": ["images", "fps"], "optional": ["audio", "bit_depth"]},
                    "output": ["VIDEO"], "output_name": ["VIDEO"]},
    "PreviewAny": {"input": {"required": {"source": ["*"]}}, "input_order": {"required": ["source"]},
                   "output": ["STRING"], "output_name": ["STRING"], "output_node": True},
    "AccelReportStub": HOST_0_3_75["AccelReportStub"],
}


def test_a_dynamic_combo_is_followed_by_its_options_inputs():
    # What frontend 1.49.6 queued for these values (checked in the browser, tests/e2e/test_browser.py).
    values = ["v/x", "mp4", "h264", "re-encode", 18.0, "sRGB", "auto"]
    assert workflows.widget_inputs(HOST_0_33["SaveVideo"], values) == {
        "filename_prefix": "v/x", "format": "mp4", "format.codec": "h264", "format.codec.encoding": "re-encode",
        "format.codec.encoding.crf": 18.0, "format.codec.encoding.color_space": "sRGB", "codec": "auto"}


def test_missing_values_take_the_defaults_and_extra_values_are_ignored():
    assert workflows.widget_inputs(HOST_0_33["SaveVideo"], ["v/x"]) == {
        "filename_prefix": "v/x", "format": "auto", "format.codec": "auto", "codec": "auto"}
    assert workflows.widget_inputs(HOST_0_33["CreateVideo"], [16.0]) == {"fps": 16.0, "bit_depth": 8}
    assert workflows.widget_inputs(HOST_0_3_75["CreateVideo"], [16.0, 10]) == {"fps": 16.0}


def test_input_names_include_the_options_inputs():
    names = workflows.input_names(HOST_0_33["SaveVideo"])
    assert {"format", "format.codec", "format.codec.encoding", "format.codec.encoding.crf", "codec"} <= names
    assert "codec.encoding" in names and "crf" not in names


def _video_workflow(object_info: dict) -> dict:
    g = Graph(object_info, "format-test")
    report = g.add("AccelReportStub", 0, seed=3)
    video = g.add("CreateVideo", 1, fps=16.0)
    save = g.add("SaveVideo", 2, filename_prefix="video/x")
    preview = g.add("PreviewAny", 2)
    g.connect(video, 0, save, "video")
    g.connect(report, 0, preview, "source")
    return g.to_json()


def test_the_generator_writes_one_file_for_both_hosts():
    old, new = _video_workflow(HOST_0_3_75), _video_workflow(HOST_0_33)
    assert old == new
    nodes = {n["type"]: n for n in old["nodes"]}
    # What ComfyUI's own templates hold for these nodes (text_to_video_wan, on both hosts).
    assert nodes["CreateVideo"]["widgets_values"] == [16.0]
    assert nodes["SaveVideo"]["widgets_values"] == ["video/x", "auto", "auto"]
    assert nodes["SaveVideo"]["outputs"] == [] and nodes["PreviewAny"]["outputs"] == []
    assert nodes["AccelReportStub"]["widgets_values"] == [3, "fixed", 8]
    assert [o["name"] for o in nodes["AccelReportStub"]["outputs"]] == ["report"]    # "plot" is not linked
    # ...and each host reads it as its frontend does.
    assert workflows.widget_inputs(HOST_0_33["SaveVideo"], nodes["SaveVideo"]["widgets_values"]) == {
        "filename_prefix": "video/x", "format": "auto", "format.codec": "auto", "codec": "auto"}
    assert workflows.widget_inputs(HOST_0_3_75["SaveVideo"], nodes["SaveVideo"]["widgets_values"]) == {
        "filename_prefix": "video/x", "format": "auto", "codec": "auto"}


def test_values_the_workflow_sets_are_kept_even_when_optional():
    g = Graph(HOST_0_33, "bit-depth")
    g.add("CreateVideo", 0, fps=16.0, bit_depth=10)
    assert g.to_json()["nodes"][0]["widgets_values"] == [16.0, 10]
