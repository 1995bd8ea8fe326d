import pytest
import torch

from lib.cpool import bottom_pool, left_pool, right_pool, top_pool
from nets import build_model
from nets.corner_pool import CenterPool
from nets.hourglass import HEATMAP_BIAS

KEYS = {"hm_tl", "hm_br", "hm_ct", "emb_tl", "emb_br", "off_tl", "off_br", "off_ct"}


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch, expected", [("large_hourglass", 210_062_960), ("small_hourglass", 104_844_152)])
def test_parameter_counts_match_the_reference(arch, expected):
    with torch.device("meta"):
        assert count(build_model(arch, 80)) == expected


def test_tiny_is_cpu_sized():
    assert 1_000_000 <= count(build_model("tiny_hourglass", 4)) <= 2_500_000


@pytest.mark.parametrize("arch, stacks", [("large_hourglass", 2), ("small_hourglass", 1)])
def test_stack_count(arch, stacks):
    with torch.device("meta"):
        assert build_model(arch, 3).num_stacks == stacks


def test_outputs_in_train_and_eval_mode():
    torch.manual_seed(0)
    model = build_model("tiny_hourglass", 5)
    x = torch.randn(2, 3, 127, 255)
    outs = model.train()(x)
    assert isinstance(outs, list) and len(outs) == model.num_stacks
    shapes = {"hm": 5, "emb": 1, "off": 2}
    for out in outs:
        assert set(out) == KEYS
        for k, v in out.items():
            assert v.shape == (2, shapes[k.split("_")[0]], 32, 64), k
    last = model.eval()(x)
    assert set(last) == KEYS and last["hm_ct"].shape == (2, 5, 32, 64)


def test_heatmap_bias_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = build_model("tiny_hourglass", 3).train()
    for branches in model.branches:
        for head in (branches.hm_tl, branches.hm_br, branches.hm_ct):
            assert torch.all(head[-1].bias == HEATMAP_BIAS)
        assert not torch.all(branches.off_tl[-1].bias == HEATMAP_BIAS)
    out = model(torch.randn(2, 3, 63, 63))
    sum(v.square().mean() for o in out for v in o.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_center_pool_equals_the_composed_corner_pools():
    torch.manual_seed(0)
    module = CenterPool(dim=8, pool_dim=4).eval()
    x = torch.randn(2, 8, 9, 7)
    a, b = module.conv_col(x), module.conv_row(x)
    expected = module.merge(x, bottom_pool(top_pool(a)) + right_pool(left_pool(b)))
    torch.testing.assert_close(module(x), expected)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown --arch 'huge'"):
        build_model("huge", 80)
