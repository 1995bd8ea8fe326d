"""nets/inference.py: the network prepared for CPU inference computes what the trained network computes.

Reference: the unprepared network in float64. Folding is done in float64 and rounded once to float32, and each
convolution then rounds as the unprepared one does, so both float32 paths sit within a few float32 roundings per
layer of the float64 result: relative to each output's scale, 1e-4 covers ~50 layers of accumulations of up to
600 products at eps 6e-8 with a wide margin, while a wrongly folded batch norm (a swapped mean or a missing eps)
moves outputs by 1e-2 or more. bf16 keeps 8 bits of mantissa (eps 3.9e-3): its bound is 2^-3 of the scale.
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nets import build_model
from nets import inference
from nets.inference import ONEDNN, ONEDNN_BF16, FusedConv, OutputConv, prepare_for_inference, spatial_max

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROOT = Path(__file__).resolve().parents[1]


def trained_looking(seed: int = 0, corner_pool: str = "cascade", center_branch: str = "pool") -> nn.Module:
    """tiny_hourglass with batch-norm statistics and affine parameters far from their initial values."""
    torch.manual_seed(seed)
    model = build_model("tiny_hourglass", 5, corner_pool=corner_pool, center_branch=center_branch).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.3, 3.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def relative_error(out: dict, ref: dict) -> float:
    return max(((out[k].double() - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)


@pytest.mark.parametrize("channels_last", [True, False])
def test_prepared_equals_trained_network_to_float32_rounding(channels_last):
    model = trained_looking()
    image = torch.randn(2, 3, 127, 127)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(image.double())
        prepared = prepare_for_inference(model, channels_last=channels_last)
        out = prepared(image)
    assert set(out) == set(ref)
    assert all(out[k].dtype == torch.float32 and out[k].shape == ref[k].shape for k in ref)
    assert relative_error(out, ref) < 1e-4
    # every batch norm was folded: none is left in the prepared network
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    assert sum(isinstance(m, (FusedConv, OutputConv)) for m in prepared.modules()) == \
        sum(isinstance(m, nn.Conv2d) for m in model.modules())


@pytest.mark.parametrize("corner_pool, center_branch", [("cascade", "pool"), ("plain", "conv"), ("plain", "none")])
def test_every_convolution_reads_channels_last_and_the_maps_come_out_nchw(corner_pool, center_branch):
    """What makes the prepared forward fast (README "CPU inference"): no convolution gets an NCHW input for oneDNN
    to reorder (center pooling's broadcast sum did), and the heads write the NCHW float32 maps that decoding reads,
    so none is copied after the network."""
    prepared = prepare_for_inference(trained_looking(2, corner_pool, center_branch))
    layouts = []
    for m in prepared.modules():
        if isinstance(m, (FusedConv, OutputConv)):
            m.register_forward_pre_hook(lambda _, inputs: layouts.append(
                inputs[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        maps = prepared.network(torch.randn(1, 3, 127, 127).contiguous(memory_format=torch.channels_last))
    assert len(layouts) == sum(isinstance(m, (FusedConv, OutputConv)) for m in prepared.modules()) and all(layouts)
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in maps.values())


@pytest.mark.parametrize("corner_pool, center_branch", [("plain", "none"), ("plain", "conv"), ("cascade", "conv")])
def test_every_variant_is_prepared(corner_pool, center_branch):
    """The ablation variants (README "Variants") are built from the same blocks: all folded, same outputs."""
    model = trained_looking(1, corner_pool, center_branch)
    image = torch.randn(1, 3, 127, 127)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(image.double())
        prepared = prepare_for_inference(model)
        out = prepared(image)
    assert set(out) == set(ref) and relative_error(out, ref) < 1e-4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())


def test_a_wrong_fold_would_be_caught():
    """The tolerance above is tight enough: forgetting eps in one batch norm's fold breaks it."""
    model = trained_looking()
    image = torch.randn(1, 3, 127, 127)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(image.double())
        broken = copy.deepcopy(model)
        broken.stem[0][1].running_var.add_(0.5)  # what a fold with a wrong variance would compute
        assert relative_error(prepare_for_inference(broken)(image), ref) > 1e-3


def test_preparing_leaves_the_trained_network_untouched():
    model = trained_looking().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_for_inference(model)
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    loss = sum(o.float().sum() for out in model(torch.randn(2, 3, 127, 127)) for o in out.values())
    loss.backward()  # still a trainable network with its batch norms
    assert model.stem[0][0].weight.grad is not None


def storage_bytes(tensors) -> int:
    """The bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.mark.skipif(not ONEDNN, reason="weights are packed for oneDNN only")
def test_after_its_first_call_the_prepared_network_holds_the_weights_once():
    """Each FusedConv kept its folded float32 weight beside the oneDNN-packed one it runs: with the model that
    Detector and test.py hold, three copies of the weights (small_hourglass: 400 MiB each). Once packed, only the
    packed one is left: the dense tensors are the biases and the heads' output products (0.2% here)."""
    model = trained_looking()
    prepared = prepare_for_inference(model)
    with torch.no_grad():
        prepared(torch.randn(1, 3, 127, 127))
    fused = [m for m in prepared.modules() if isinstance(m, FusedConv)]
    assert all(m.packed is not None for m in fused)
    assert storage_bytes([*prepared.parameters(), *prepared.buffers()]) < storage_bytes(model.parameters()) / 100


def test_preparing_copies_none_of_the_models_tensors(monkeypatch):
    """Preparing deep-copied the whole model and then replaced each block of the copy, so every weight was held
    once more while preparing (and with freed memory kept, Detector's setting, until the forwards reuse it:
    280 MiB on small_hourglass, README "Weights held"). It reads the model's tensors into the new blocks instead."""
    model = trained_looking()
    copied = []
    for cls in (torch.Tensor, nn.Parameter):
        deepcopy = cls.__deepcopy__
        monkeypatch.setattr(cls, "__deepcopy__", lambda t, memo, deepcopy=deepcopy: copied.append(t.shape) or
                            deepcopy(t, memo))
    prepare_for_inference(model)
    assert copied == []


def fused_conv_and_reference(seed: int = 0) -> tuple[FusedConv, torch.Tensor, torch.Tensor]:
    """A FusedConv of a conv + batch norm far from the identity, an input, and the output in float64."""
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16).eval()
    bn.running_mean.uniform_(-0.3, 0.3)
    bn.running_var.uniform_(0.3, 3.0)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        ref = bn.double()(conv.double()(x.double()))
    return FusedConv(conv.float(), bn.float()), x, ref


def conv_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.skipif(not ONEDNN, reason="weights are packed for oneDNN only")
def test_a_packed_fused_conv_still_runs_without_onednn(monkeypatch):
    """The dense weight dropped after packing comes back from the packed one for F.conv2d, unrounded (the
    file's float32 bound; a weight rounded through bf16 would be off by 2^-9)."""
    conv, x, ref = fused_conv_and_reference()
    with torch.no_grad():
        assert conv_error(conv(x), ref) < 1e-4 and conv.weight is None
        monkeypatch.setattr(inference, "ONEDNN", False)
        assert conv_error(conv(x), ref) < 1e-4


@pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN has no bf16 convolutions on this CPU")
def test_a_fused_conv_packed_for_bf16_keeps_its_float32_weight():
    """Packed for bf16 after float32, the float32 weight is kept: repacked from the bf16 one for the next float32
    call, it would have lost its low 16 bits (an error of 2^-9 against the float32 bound)."""
    conv, x, ref = fused_conv_and_reference(1)
    with torch.no_grad():
        conv(x)
        assert conv_error(conv(x.bfloat16()), ref) < 2 ** -3
        assert conv.weight.dtype == torch.float32
        assert conv_error(conv(x), ref) < 1e-4


def test_bf16_path_stays_close_and_returns_float32():
    model = trained_looking()
    image = torch.randn(1, 3, 127, 127)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(image.double())
        out = prepare_for_inference(model, torch.bfloat16)(image)
    assert all(v.dtype == torch.float32 for v in out.values())
    assert relative_error(out, ref) < 2 ** -3


BF16_WITHOUT_AVX512 = """
import copy, torch
from nets.inference import prepare_for_inference
from tests.test_prepared_net import relative_error, trained_looking
assert not torch.ops.mkldnn._is_mkldnn_bf16_supported()
model, image = trained_looking(), torch.randn(1, 3, 127, 127)
with torch.no_grad():
    ref = copy.deepcopy(model).double()(image.double())
    out = prepare_for_inference(model, torch.bfloat16)(image)
assert all(v.dtype == torch.float32 for v in out.values())
print(relative_error(out, ref))
"""


def test_bf16_path_runs_on_a_cpu_without_avx512():
    """ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN treat this CPU as one with AVX2 only (most laptops and desktops),
    where it has no bf16 convolutions: the prepared bf16 network raised RuntimeError ("bf16 path needs the cpu
    support avx_ne_convert or avx512bw, ...") at its first forward, so test.py / demo.py --amp and validation of a
    --amp run failed there. It runs, within the bf16 bound above."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", BF16_WITHOUT_AVX512], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) < 2 ** -3


def test_other_dtypes_are_refused():
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        prepare_for_inference(trained_looking(), torch.float16)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dim", [2, 3])
def test_spatial_max_is_amax_in_either_layout(channels_last, dim):
    """A maximum rounds nothing: equal bit for bit, ties, -inf and NaN included, and in the layout amax keeps."""
    gen = torch.Generator().manual_seed(dim)
    x = torch.randint(-3, 3, (2, 5, 7, 6), generator=gen).float()  # many ties
    x[0, 1, 2] = -float("inf")
    x[1, 2, :, 3] = float("nan")
    x[1, 3] = -float("inf")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = x.amax(dim=dim, keepdim=True)
    out = spatial_max(x, dim)
    assert out.shape == ref.shape
    assert torch.equal(out.nan_to_num(7.0), ref.nan_to_num(7.0)) and torch.equal(out.isnan(), ref.isnan())
    assert out.isnan().any() and (out == -float("inf")).any()


@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_the_pipeline_bench_times_on_the_cpu_the_network_test_py_runs(monkeypatch, amp):
    """bench/bench_pipeline.py timed the unprepared network on the CPU (and autocast it with --amp), while test.py
    runs the prepared one (bf16 with --amp, not autocast)."""
    from bench import bench_pipeline
    from nets.inference import PreparedNetwork

    timed = []

    def time_setting(wrapped, timer, inputs, autocast_amp, repeats, device):
        timed.append((wrapped.model, autocast_amp))
        return 1.0, dict.fromkeys(bench_pipeline.PARTS + ["rest"], 0.25), 0

    monkeypatch.setattr(bench_pipeline, "time_setting", time_setting)
    bench_pipeline.main(bench_pipeline.get_args_parser().parse_args(["--archs", "tiny_hourglass", "--amp", amp]))
    assert len(timed) == 3
    for network, autocast_amp in timed:
        assert isinstance(network, PreparedNetwork) and not autocast_amp
        assert network.dtype == (torch.bfloat16 if amp == "bf16" else torch.float32)
