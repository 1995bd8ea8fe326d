"""The metadata of an .onnx file is json anyone can edit: each entry engine/onnx_backend.py and engine/detector.py
read is checked, and a bad one is a CheckpointError naming the file and the entry, on a hand-built graph (a
second each, where an export takes many)."""
import json
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from engine import Detector
from engine.onnx_backend import METADATA_KEY, OnnxModel
from utils.errors import ArgumentError, CheckpointError

OUTPUTS = ["hm_tl", "hm_br", "emb_tl", "emb_br", "off_tl", "off_br"]
CLASSES = ["cat", "dog", "fox"]  # one per channel of the image, which each output is
METADATA = {"arch": "tiny_hourglass", "class_names": CLASSES, "category_ids": [1, 2, 3], "img_size": 127,
            "size_unit": 32, "dynamic": True, "max_size": 511, "outputs": OUTPUTS, "corner_pool": "plain",
            "center_branch": "none"}


def onnx_file(path: Path, metadata: dict | str) -> Path:
    """A graph with an `image` input and the outputs of a network without a center branch (each the image as it
    is), holding `metadata` (a dict written as json, or the text itself)."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in OUTPUTS]
    nodes = [helper.make_node("Identity", ["image"], [name]) for name in OUTPUTS]
    model = helper.make_model(helper.make_graph(nodes, "centernet47", [image], outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata if isinstance(metadata, str) else json.dumps(metadata)
    onnx.save(model, path)
    return path


def test_a_well_formed_file_loads_and_runs(tmp_path):
    model = OnnxModel(onnx_file(tmp_path / "good.onnx", METADATA), torch.device("cpu"))
    assert (model.class_names, model.category_ids, model.max_size, model.output_keys) == (CLASSES, [1, 2, 3], 511,
                                                                                          tuple(OUTPUTS))
    assert list(model(torch.zeros(1, 3, 127, 127))) == OUTPUTS


@pytest.mark.parametrize("name, metadata, message", [
    ("nested", "[" * 100000 + "]" * 100000, "not json: RecursionError"),  # was a RecursionError traceback
    ("infinite", {**METADATA, "max_size": float("inf")}, "'max_size' is inf, expected a whole number"),  # OverflowError
    ("zero_unit", {**METADATA, "size_unit": 0}, "'size_unit' is 0, expected a whole number of at least 1"),
    ("ids_5", {**METADATA, "category_ids": 5}, "'category_ids' is 5, expected a list of whole numbers"),  # TypeError
    ("ids_x", {**METADATA, "category_ids": ["x", 2, 3]}, r"'category_ids' is \['x', 2, 3\], expected a list of whole"),
    ("ids_huge", {**METADATA, "category_ids": [1, 2, 2**64]}, "'category_ids' is \\[1, 2, 18446744073709551616\\], "
     "expected a list of whole numbers that fit 64 bits"),  # OverflowError at the first image
    ("ids_twice", {**METADATA, "category_ids": [1, 2, 2]}, r"'category_ids' is \[1, 2, 2\], expected a list of whole "
     "numbers that fit 64 bits, none twice"),  # two classes merged in the COCO results
    ("names_int", {**METADATA, "class_names": 7}, "'class_names' is 7, expected a list of strings"),
    ("dynamic_text", {**METADATA, "dynamic": "false"}, "'dynamic' is 'false', expected true or false"),
    ("no_outputs", {k: v for k, v in METADATA.items() if k != "outputs"}, "no 'outputs'"),
])
def test_malformed_metadata_names_the_file_and_the_entry(tmp_path, name, metadata, message):
    path = onnx_file(tmp_path / f"{name}.onnx", metadata)
    with pytest.raises(CheckpointError, match=f"{name}.onnx: its '{METADATA_KEY}' metadata is malformed \\({message}"):
        OnnxModel(path, torch.device("cpu"))


def test_metadata_naming_outputs_the_graph_lacks_is_refused(tmp_path):
    """Each named output is fetched from the graph on every call: one it lacks failed in onnxruntime's run."""
    path = onnx_file(tmp_path / "extra.onnx", {**METADATA, "outputs": OUTPUTS + ["hm_ct"]})
    with pytest.raises(CheckpointError, match=r"extra.onnx: its 'centernet47' metadata names outputs \['hm_ct'\] "
                                              "that the network does not have"):
        OnnxModel(path, torch.device("cpu"))


def test_a_detector_refuses_category_ids_that_are_not_whole_numbers_or_given_twice(tmp_path):
    model = OnnxModel(onnx_file(tmp_path / "good.onnx", METADATA), torch.device("cpu"))
    # a ValueError from int(), an OverflowError at the first image, two classes merged by to_coco
    for ids in (["x", 2, 3], [1, 2, 2**64], [1, 2, 2]):
        with pytest.raises(ArgumentError, match=r"category_ids: expected one whole number per class \(3\), each "
                                                f"within 64 bits and none twice, got \\{ids!r}"):
            Detector(model, CLASSES, torch.device("cpu"), category_ids=ids)


def test_a_dynamic_file_smaller_than_every_test_input_is_refused_before_any_work(tmp_path):
    """Every test input is padded to at least 127 x 127: a file exported for at most 63 pixels fits no image."""
    model = OnnxModel(onnx_file(tmp_path / "small.onnx", {**METADATA, "max_size": 63}), torch.device("cpu"))
    with pytest.raises(ArgumentError, match="small.onnx was exported with --max_size 63, below the smallest test "
                                            r"input \(127\): export it again with a larger --max_size"):
        model.require_dynamic("images of any size")
