"""`build_model(arch, num_classes, grad_checkpoint, corner_pool, center_branch)`: the CenterNet networks by name and
variant; `model_from_checkpoint(state)`: the network a checkpoint holds, built from the constructor arguments stored
in it.

Variants (the paper's ablation): `--method centernet` is cascade corner pooling with a center-pooling branch (the
default, and the only network of checkpoints written before the variants existed), `--method cornernet` is plain
corner pooling without a center branch; `--corner_pool` and `--center_branch`, when given, override the preset."""
import threading

import torch
from torch.nn.modules.module import register_module_parameter_registration_hook

from utils.checkpoint import check_class_names, saved_args
from utils.errors import CheckpointError

from .hourglass import CENTER_BRANCHES, CORNER_POOLS, CenterNet

METHODS = {"centernet": dict(corner_pool="cascade", center_branch="pool"),
           "cornernet": dict(corner_pool="plain", center_branch="none")}

HOURGLASS_DIMS = [256, 256, 384, 384, 384, 512]
HOURGLASS_BLOCKS = [2, 2, 2, 2, 2, 4]

ARCHS = {
    # CenterNet-104: two stacks (210,062,960 parameters with 80 classes, as in pytorch_simple_CenterNet_47).
    "large_hourglass": dict(num_stacks=2, dims=HOURGLASS_DIMS, blocks=HOURGLASS_BLOCKS, stem_dim=128, cnv_dim=256,
                            pool_dim=128, head_dim=256),
    # CenterNet-52: one stack (104,844,152 parameters with 80 classes).
    "small_hourglass": dict(num_stacks=1, dims=HOURGLASS_DIMS, blocks=HOURGLASS_BLOCKS, stem_dim=128, cnv_dim=256,
                            pool_dim=128, head_dim=256),
    # CPU-sized: the same branches (cascade corner pooling, center pooling, all heads), narrower and with a
    # 3-level hourglass, for the built-in data set and the tests. One stack: a second doubles the cost of a
    # training step; the two-stack path is tested on a stripped copy of large_hourglass. At input 127 (the
    # "128" size: maps 32 x 32) it trains at 15-25 images/s on 2 CPU cores (bench/bench_model.py).
    "tiny_hourglass": dict(num_stacks=1, dims=[48, 64, 96, 128], blocks=[1, 1, 1, 2], stem_dim=32, cnv_dim=64,
                           pool_dim=32, head_dim=64),
}


def resolve_variant(method: str | None = None, corner_pool: str | None = None, center_branch: str | None = None
                    ) -> dict[str, str]:
    """{corner_pool, center_branch} of the preset `method` (None: centernet), overridden by those given."""
    method = method or "centernet"
    if method not in METHODS:
        raise ValueError(f"unknown --method {method!r}; expected one of {', '.join(METHODS)}")
    variant = dict(METHODS[method])
    for name, value, allowed in (("corner_pool", corner_pool, CORNER_POOLS), ("center_branch", center_branch,
                                                                              CENTER_BRANCHES)):
        if value is not None:
            if value not in allowed:
                raise ValueError(f"unknown --{name} {value!r}; expected one of {', '.join(allowed)}")
            variant[name] = value
    return variant


def saved_variant(args: dict) -> dict[str, str]:
    """The variant of a run from its saved flags (utils.checkpoint.saved_args); runs from before the variants
    were flags are centernet."""
    return resolve_variant(args.get("method"), args.get("corner_pool"), args.get("center_branch"))


def variant_name(corner_pool: str, center_branch: str) -> str:
    """The preset's name when the variant is one, else `corner_pool+center_branch`, for logs and messages."""
    variant = dict(corner_pool=corner_pool, center_branch=center_branch)
    return next((m for m, v in METHODS.items() if v == variant), f"{corner_pool} corner pooling, center branch "
                f"{center_branch}")


def model_config(arch: str, num_classes: int, corner_pool: str = "cascade", center_branch: str = "pool") -> dict:
    """The constructor arguments of CenterNet for `arch` and the variant (stored in checkpoints as
    `model_config`)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    resolve_variant(None, corner_pool, center_branch)  # refuses unknown names
    return dict(num_classes=num_classes, **ARCHS[arch], corner_pool=corner_pool, center_branch=center_branch)


def build_model(arch: str, num_classes: int, grad_checkpoint: bool = False, corner_pool: str = "cascade",
                center_branch: str = "pool") -> CenterNet:
    """`grad_checkpoint`: recompute the hourglasses' activations in the backward pass (less memory, more time)."""
    return CenterNet(**model_config(arch, num_classes, corner_pool, center_branch), grad_checkpoint=grad_checkpoint)


def model_from_checkpoint(state: dict, path) -> CenterNet:
    """The network of a checkpoint (see utils/checkpoint.py) with its weights loaded. Checkpoints without
    `model_config` (older ones, and official weights converted before it was stored) are built from `args.arch`,
    the variant of `args` (`saved_variant`) and `class_names`; a `model_config` without the variant keys is
    centernet's.
    A checkpoint whose `class_names` are not the network's classes, or whose weights do not fit the network it
    names, is a CheckpointError naming both numbers, or the first key that does not fit; so is a `model_config` that
    does not build a network, and a weight holding NaN or infinity (which would make every output NaN). The weights
    are compared with the network built on the meta device first (`network_on_meta`), so that a config far larger
    than its weights allocates nothing."""
    if "class_names" in state:
        check_class_names(state, path)
    config = state.get("model_config")
    if config is None:
        arch = saved_args(state).get("arch")
        if arch not in ARCHS or "class_names" not in state:
            raise CheckpointError(f"{path}: the checkpoint has no 'model_config' and no known args.arch "
                                  f"({arch!r}) with 'class_names'")
        try:
            config = model_config(arch, len(state["class_names"]), **saved_variant(saved_args(state)))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: its model_config is a {type(config).__name__}, not a dict of network arguments")
    if "class_names" in state and len(state["class_names"]) != config.get("num_classes"):
        raise CheckpointError(f"{path}: 'class_names' lists {len(state['class_names'])} classes, but the network "
                              f"has {config.get('num_classes')!r} class outputs")
    if not isinstance(state["model"], dict):
        raise CheckpointError(f"{path}: its 'model' is a {type(state['model']).__name__}, not a state dict")
    problem = first_misfit(network_on_meta(config, state["model"], path).state_dict(), state["model"])
    if problem:
        raise CheckpointError(f"{path}: the weights do not fit the network they name: {problem}")
    refuse_non_finite(state["model"], path)
    model = CenterNet(**config)  # now known to be the size of the weights already in memory
    model.load_state_dict(state["model"])
    return model


def network_on_meta(config: dict, weights: dict, path) -> CenterNet:
    """The network of a checkpoint's `config` on the meta device, whose tensors take no memory, to compare with
    the `weights` before the real one is built. A crafted config (a million stacks, say) would still build modules
    until memory runs out, so the build stops once it has registered more parameters than `weights` holds tensors:
    the network the weights fit never has more. A config that does not build is a CheckpointError too."""
    limit, builder, registered = len(weights), threading.get_ident(), 0

    def count(module, name, param):
        nonlocal registered
        if threading.get_ident() != builder:  # the hook is global: other threads' modules are not this network's
            return
        registered += 1
        if registered > limit:
            raise CheckpointError(f"{path}: its model_config builds a network with more parameters than the "
                                  f"{limit} tensors of its weights")

    handle = register_module_parameter_registration_hook(count)
    try:
        with torch.device("meta"):
            return CenterNet(**config)
    except CheckpointError:
        raise
    # An unknown key, a value of another type, a list too short (IndexError), a negative or overflowing size
    # (RuntimeError from torch), dims so long that the recursive hourglass exceeds Python's recursion limit.
    except (TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its model_config does not build a network: {type(e).__name__}: "
                              f"{str(e)[:200]}") from None
    finally:
        handle.remove()


def first_misfit(expected: dict, weights: dict) -> str | None:
    """The first key of a state dict `weights` that is missing, extra, of another shape than in `expected`, without
    dense values (a meta or sparse tensor), or not floating point where `expected` is."""
    for key, tensor in expected.items():
        if key not in weights:
            return f"{key} (shape {tuple(tensor.shape)}) is missing from the checkpoint"
        if not isinstance(weights[key], torch.Tensor):
            return f"{key} is a {type(weights[key]).__name__} in the checkpoint, not a tensor"
        if weights[key].shape != tensor.shape:
            return f"{key} has shape {tuple(weights[key].shape)} in the checkpoint, {tuple(tensor.shape)} in the network"
        if weights[key].is_meta or weights[key].layout != torch.strided:  # no values, or not dense ones
            kind = "meta (a shape without values)" if weights[key].is_meta else str(weights[key].layout)
            return f"{key} is a {kind} tensor in the checkpoint, not a dense tensor of values"
        if tensor.is_floating_point() and not weights[key].is_floating_point():  # copying would truncate or drop
            return f"{key} is {weights[key].dtype} in the checkpoint, floating point in the network"
    extra = next((key for key in weights if key not in expected), None)
    return f"{extra} is in the checkpoint but not in the network" if extra else None


def refuse_non_finite(weights: dict, source) -> None:
    """A CheckpointError naming `source` (the file, as the caller names it) and the first tensor of `weights` that
    holds NaN or infinity: a network with such a weight outputs NaN everywhere, and fine-tuning from it stops at
    its first loss."""
    problem = first_non_finite(weights)
    if problem:
        raise CheckpointError(f"{source}: {problem}, so its outputs would not be finite: its training diverged "
                              "(take an earlier checkpoint), or the file was changed")


def first_non_finite(weights: dict) -> str | None:
    """The first floating-point tensor of a state dict `weights` holding NaN or infinity, with their count."""
    for key, tensor in weights.items():
        # A sum is finite when every term is (a 25th of torch.isfinite's time on the CPU); one that is not may
        # also be an overflow of finite terms, which the count tells apart. Summed in float32 at least, without a
        # copy of a 16-bit tensor.
        if not tensor.is_floating_point() or \
                tensor.sum(dtype=torch.promote_types(tensor.dtype, torch.float32)).isfinite():
            continue
        count = int((~torch.isfinite(tensor)).sum())
        if count:
            return f"its weight {key} holds {count} NaN or infinite values of {tensor.numel()}"
    return None
