"""Checkpoints that load but lack what their reader needs are refused with the file's name (each check was
removed as a planted bug without any other test noticing)."""
import pytest
import torch

from utils.checkpoint import load_checkpoint, load_inference_checkpoint, save_checkpoint
from utils.errors import CheckpointError

COMPLETE = {"model": {"w": torch.ones(2)}, "args": {"arch": "tiny_hourglass", "img_size": 127},
            "class_names": ["a"]}


def test_a_dict_without_model_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"optimizer": {}, "epoch": 3})
    with pytest.raises(CheckpointError, match=f"{path} is not a centernet47 checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("drop, message", [("class_names", "'class_names'"), ("args", "'args'"),
                                           ("img_size", "lack 'img_size'"), ("arch", "lack 'arch'")])
def test_an_inference_checkpoint_needs_args_and_class_names(tmp_path, drop, message):
    path = tmp_path / "checkpoint.pt"
    state = {k: dict(v) if isinstance(v, dict) else v for k, v in COMPLETE.items()}
    if drop in state:
        del state[drop]
    else:
        del state["args"][drop]
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match=message) as e:
        load_inference_checkpoint(path)
    assert str(path) in str(e.value)
    save_checkpoint(path, COMPLETE)
    assert load_inference_checkpoint(path)["class_names"] == ["a"]


@pytest.mark.parametrize("name, value", [("img_size", "x"), ("img_size", 127.0), ("arch", 3)])
def test_an_inference_checkpoint_needs_args_of_their_type(tmp_path, name, value):
    """test.py computed with a string img_size and failed with a TypeError far from the file."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {**COMPLETE, "args": {**COMPLETE["args"], name: value}})
    with pytest.raises(CheckpointError, match=f"{path}: checkpoint args hold {name} {value!r}, expected a"):
        load_inference_checkpoint(path)
