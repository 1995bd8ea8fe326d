"""The networks: parameter counts of the reference, output keys and shapes in both modes, heatmap bias,
gradients, center pooling against the composed corner pools, input-size errors."""
import pytest
import torch

from lib.cpool import bottom_pool, left_pool, right_pool, top_pool
from nets import ARCHS, build_model
from nets.corner_pool import CenterPool
from nets.hourglass import HEATMAP_BIAS, CenterNet

KEYS = {"hm_tl", "hm_br", "hm_ct", "emb_tl", "emb_br", "off_tl", "off_br", "off_ct"}


def expected_shapes(n: int, num_classes: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
    channels = {"hm": num_classes, "emb": 1, "off": 2}
    return {k: (n, channels[k.split("_")[0]], h, w) for k in KEYS}


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def stripped_large(num_classes: int) -> CenterNet:
    """large_hourglass's layers (2 stacks, 5 levels, same block counts) at a few channels each."""
    return CenterNet(num_classes=num_classes, num_stacks=2, dims=[8, 8, 12, 12, 12, 16],
                     blocks=ARCHS["large_hourglass"]["blocks"], stem_dim=8, cnv_dim=8, pool_dim=4, head_dim=8)


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
    for out in outs:
        assert {k: tuple(v.shape) for k, v in out.items()} == expected_shapes(2, 5, 32, 64)
    last = model.eval()(x)
    assert {k: tuple(v.shape) for k, v in last.items()} == expected_shapes(2, 5, 32, 64)


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


@pytest.mark.parametrize("ties", [False, True])
def test_center_pool_equals_the_composed_corner_pools(ties):
    torch.manual_seed(0)
    module = CenterPool(dim=8, pool_dim=4).eval()
    x = torch.randn(2, 8, 9, 7)
    a, b = module.conv_col(x), module.conv_row(x)
    if ties:  # few distinct values: many tied maxima in each row and column
        a, b = a.round(), b.round()
    pooled = a.amax(dim=2, keepdim=True) + b.amax(dim=3, keepdim=True)
    # Maxima select without rounding, so both sides add the same two floats: equal bit for bit on any CPU.
    torch.testing.assert_close(pooled.expand(-1, -1, 9, 7), bottom_pool(top_pool(a)) + right_pool(left_pool(b)),
                               rtol=0, atol=0)
    expected = module.merge(x, bottom_pool(top_pool(module.conv_col(x))) + right_pool(left_pool(module.conv_row(x))))
    torch.testing.assert_close(module(x), expected)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown --arch 'huge'"):
        build_model("huge", 80)


def test_stripped_large_has_the_layers_of_large_hourglass():
    with torch.device("meta"):
        large = build_model("large_hourglass", 80).state_dict()
    assert list(stripped_large(80).state_dict()) == list(large)


def test_two_stacks_train_and_eval_outputs():
    torch.manual_seed(0)
    model = stripped_large(3)
    x = torch.randn(2, 3, 127, 255)
    outs = model.train()(x)
    assert isinstance(outs, list) and len(outs) == 2
    for out in outs:
        assert {k: tuple(v.shape) for k, v in out.items()} == expected_shapes(2, 3, 32, 64)
    # Eval mode gives the last stack only, and the same numbers as the training path with the same BN statistics.
    model.eval()
    last = model(x)
    assert isinstance(last, dict) and set(last) == KEYS
    model.training = True  # the top module only: list output, BN layers stay in eval mode
    both = model(x)
    for k in KEYS:  # the same operations on the same input in this process: equal bit for bit
        torch.testing.assert_close(last[k], both[1][k], rtol=0, atol=0)
        assert not torch.equal(both[0][k], both[1][k]), k


def test_gradients_reach_every_parameter_of_two_stacks():
    torch.manual_seed(0)
    model = stripped_large(2).train()
    out = model(torch.randn(2, 3, 127, 127))
    sum(v.square().mean() for o in out for v in o.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


@pytest.mark.parametrize("size", [(128, 127), (127, 100), (95, 127)])
def test_input_size_not_of_the_form_128k_minus_1_is_a_clear_error(size):
    model = stripped_large(2).eval()
    with pytest.raises(ValueError, match=r"form k \* 128 - 1 .* got %d x %d" % size):
        model(torch.zeros(1, 3, *size))
