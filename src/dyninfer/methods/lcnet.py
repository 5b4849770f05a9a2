"""LC-Net (Xia, Yin, Dai, Jha, "Fully Dynamic Inference with Deep Neural Networks"): per-input
block skipping (L-Net) and channel skipping (C-Net) on a zoo ResNet.

Per residual block, one global average pool of the block input feeds two FC control nets with
ReLU-1 outputs: the block saliency S_L and one saliency S_C per output channel of the block's
first convolution (3x3 in BasicBlock, 1x1 in Bottleneck). The block computes

    t   = relu1(bn1(conv1(x))) * S_C(x)              # S_C multiplies after the first BN + ReLU
    F   = rest of the residual branch applied to t   # bn2(conv2(t)), or conv2 -> conv3 (bottleneck)
    out = relu(F * S_L(x) + shortcut(x))             # Eq. 2-3

so S_L = 0 makes the block the shortcut alone and S_C = 0 makes a channel (and conv2's slice
reading it) unnecessary. Multiplying after ReLU keeps the product exact for slicing: a channel
with S_C = 0 contributes exactly 0, whatever its BN bias.

Two paths compute this:

* ``LCNet.forward`` -- the masked, differentiable reference used for training and accuracy:
  every block and channel is computed, then multiplied by its saliency.
* ``LCNet.compile()`` -- the inference runtime (:class:`LCRuntime`): BatchNorm folded into the
  convolutions, skipped blocks' branches not run, zero-saliency channels sliced out of conv2's
  inputs (and, sequential, conv1's outputs; parallel computed conv1 in full). Batches are handled by one of :data:`STRATEGIES`.

Modes, the paper's two configurations (what differs is only what runs at inference; both
modes share weights, training and accuracy):

* ``"parallel"``: L-Net and C-Net run beside the block's first convolution, as one fused FC
  (1 + C outputs) on the pooled input. Nothing waits for the gates, so conv1 is computed in full
  for every input, skipped blocks included; the decisions save conv2's work only (its input
  channels that are off, or all of it when the block is skipped; a bottleneck's conv3 too). Gate
  cost ``in * (1 + C)`` MACs per block.
* ``"sequential"``: the gates run first and the block waits for them: the L-Net, then, only if
  S_L > 0, the C-Net. A skipped block runs no convolution, and conv1 computes only the active
  channels. Gate cost ``in + [S_L > 0] * in * C`` MACs per block, one extra dependent step.

(The paper, Sec. 4, reports 0.19 vs 0.06 GFLOPs for the two. Placing the C-Net after the L-Net
and running it only for blocks the L-Net keeps is our reading of the sequential configuration.)

A kept block whose channels are all off has F = a constant (conv2's folded bias; for a
bottleneck, conv3 of its ReLU), precomputed once: no MACs beyond (in parallel mode) conv1.

Per-input cost (:meth:`LCNet.instance_macs`) counts what the runtime executes for that input;
it equals ``dyninfer.cost.macs(runtime.sliced(x), shape)`` (the static network executed for x).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dyninfer import checkpoint as ckpt
from dyninfer import cost, models
from dyninfer.data import ImageSet
from dyninfer.models.resnet import BasicBlock, Bottleneck
from dyninfer.nn.gates import DEFAULT_SLOPE, BlockGate, relu1
from dyninfer.nn.tagged import TaggedNet, fold_batchnorm
from dyninfer.train import TrainConfig, fit

__all__ = [
    "MODES", "STRATEGIES", "LCNet", "LCTrainConfig", "LCRuntime", "LCEvaluation", "MacTable",
    "wrap", "train", "lcnet_loss", "ControlLearningRate", "evaluate", "load", "compile_static",
    "PRETRAINED_LR", "PRETRAINED_CONTROL_LR",
]

MODES = ("parallel", "sequential")
# How a batch is run: "group" = split the batch by exact decision (block + channel set) and run
# each group on its own slice; "union" = one pass over the whole batch with the union of active
# channels (block skipped only if every input skips it); "split" = inputs that skip a block are
# split off, the rest run with the union of their channels; "dense" = everything computed and
# multiplied (what masking would cost; the baseline that saves nothing).
STRATEGIES = ("group", "union", "split", "dense")

# CIFAR-scale fine-tuning defaults for a pre-trained backbone. The paper's ImageNet values are
# 0.005 (backbone) and 1e-5 (control nets); at 1e-5 a freshly initialised gate cannot move its
# bias from 1 to 0 in a few CIFAR epochs, so the control nets get 0.05. The backbone gets 0.02
# to re-adapt to the gates within short schedules (fashion-mnist, 3k images, 2 epochs, L1 = 3:
# 54.2 % top-1 at 46 % MACs with 0.02 vs 52.0 % at 57 % MACs with 0.005).
PRETRAINED_LR = 0.02
PRETRAINED_CONTROL_LR = 0.05


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


# ----------------------------------------------------------------------------- the network


class LCNet(nn.Module):
    """A zoo ResNet with an L-Net and a C-Net per residual block (see the module docstring).

    ``backbone`` is the wrapped ResNet (its own copy); ``gates[i]`` are block i's control nets,
    blocks numbered in execution order. Build with :func:`wrap`.
    """

    picks_per_input = True  # no numbered subnets: dyninfer.export.dense refuses it with a pointer

    def __init__(self, backbone: nn.Module, mode: str = "parallel", slope: float = DEFAULT_SLOPE,
                 init_bias: float = 1.0, init_std: float = 0.1) -> None:
        super().__init__()
        _check_resnet(backbone)
        self.backbone = backbone
        self.mode = _check_mode(mode)
        self.slope = float(slope)
        self.gates = nn.ModuleList(
            BlockGate(_in_channels(b), b.conv1.out_channels, slope, init_bias, init_std)
            for _, b in _blocks(backbone))
        base = ckpt.model_config(backbone)
        if base is not None:
            self.dyninfer_config = {
                "name": f"lcnet/{base['name']}", "num_classes": base.get("num_classes"),
                "expansion": base.get("expansion"), "input_shape": base.get("input_shape"),
                "backbone": base, "mode": self.mode, "slope": self.slope,
            }

    @property
    def blocks(self) -> list[nn.Module]:
        return [b for _, b in _blocks(self.backbone)]

    @property
    def block_names(self) -> list[str]:
        return [name for name, _ in _blocks(self.backbone)]

    def forward(self, x: Tensor, return_saliency: bool = False):
        """Logits (and, with ``return_saliency``, the list of (S_L (N,), S_C (N, C)) per block)."""
        bb = self.backbone
        h = bb.stem(x)
        saliencies = []
        for block, gate in zip(self.blocks, self.gates):
            h, s_l, s_c = _masked_block(block, gate, h)
            saliencies.append((s_l, s_c))
        logits = bb.fc(bb.flatten(bb.pool(h)))
        return (logits, saliencies) if return_saliency else logits

    @torch.no_grad()
    def saliencies(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Inference saliencies (exact ReLU-1, eval mode; the training flag is restored)."""
        with _eval(self):
            return self(x, return_saliency=True)[1]

    def mac_table(self, input_shape: Sequence[int]) -> "MacTable":
        """Per-block MAC coefficients for inputs of ``input_shape`` (C, H, W); cached per shape
        (they depend on the architecture only, never on the weights)."""
        shape = cost.check_input_shape(input_shape)
        cache = self.__dict__.setdefault("_mac_tables", {})
        if shape not in cache:
            cache[shape] = MacTable.of(self, shape)
        return cache[shape]

    @torch.no_grad()
    def instance_macs(self, x: Tensor, mode: str | None = None) -> Tensor:
        """MACs the runtime executes for each input of the batch ``x``: int64 of shape (N,)."""
        table = self.mac_table(tuple(x.shape[1:]))
        return table.instance_macs(self.saliencies(x), mode or self.mode)

    # the common face where it applies: evaluate, save and load like every method (there are no
    # numbered subnets: each input picks its own blocks and channels)
    def evaluate(self, data: ImageSet, batch_size: int = 256, mode: str | None = None) -> "LCEvaluation":
        """Per-input accuracy and executed MACs on ``data`` (:func:`evaluate`)."""
        return evaluate(self, data, batch_size, mode)

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """safetensors + JSON, as :func:`dyninfer.train.fit` writes it (``load`` reads either)."""
        ckpt.save_model(path, self, dict(extra or {}))

    @classmethod
    def load(cls, path: str | Path, mode: str | None = None) -> "LCNet":
        return load(path, mode)

    def compile(self, mode: str | None = None, channels_last: bool = False, slice_cache: int = 32) -> "LCRuntime":
        """The real-skipping inference runtime: a snapshot of the current weights (BN folded)."""
        return LCRuntime(self, mode or self.mode, channels_last, slice_cache)


def _in_channels(block: nn.Module) -> int:
    return block.conv1.in_channels


def _blocks(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"stages.{i}.{j}", b) for i, stage in enumerate(backbone.stages) for j, b in enumerate(stage)]


def _check_resnet(model: nn.Module) -> None:
    missing = [a for a in ("stem", "stages", "pool", "flatten", "fc") if not hasattr(model, a)]
    if missing:
        raise ValueError(f"LC-Net wraps a zoo ResNet (stem, stages, pool, flatten, fc); "
                         f"{type(model).__name__} has no {', '.join(missing)} -- use e.g. "
                         "dyninfer.models.create('resnet-20')")
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no residual blocks to gate")
    for name, b in blocks:
        if not isinstance(b, (BasicBlock, Bottleneck)):
            raise ValueError(f"block {name} is a {type(b).__name__}; LC-Net gates BasicBlock and Bottleneck")


def _masked_block(block: nn.Module, gate: BlockGate, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One gated block, everything computed and multiplied (Eq. 2-3); differentiable."""
    s_l, s_c = gate(h.mean((2, 3)))  # the one pooling both control nets share
    t = block.relu1(block.bn1(block.conv1(h))) * s_c[:, :, None, None]
    if isinstance(block, Bottleneck):
        r = block.bn3(block.conv3(block.relu2(block.bn2(block.conv2(t)))))
    else:
        r = block.bn2(block.conv2(t))
    return block.relu(r * s_l[:, None, None, None] + block.shortcut(h)), s_l, s_c


class _eval:
    """Context manager: eval mode for every submodule, each flag restored afterwards."""

    def __init__(self, module: nn.Module) -> None:
        self.flags = [(m, m.training) for m in module.modules()]
        self.module = module

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag


def wrap(model: nn.Module, mode: str = "parallel", slope: float = DEFAULT_SLOPE,
         init_bias: float = 1.0, init_std: float = 0.1) -> LCNet:
    """Add L-Nets and C-Nets to a copy of zoo ResNet ``model`` (basic or bottleneck blocks).

    ``slope`` is the leaky ReLU-1 slope used in training; the control nets start with bias
    ``init_bias`` and weights ~N(0, ``init_std``) (see :class:`~dyninfer.nn.gates.BlockGate`).
    """
    return LCNet(copy.deepcopy(model), mode, slope, init_bias, init_std)


# ----------------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class MacTable:
    """MACs of one input as a function of its decisions (from the tagged core's per-layer count).

    Per active channel of block i, conv1 costs ``conv1_per_channel[i]`` (its outputs) and conv2
    ``conv2_per_channel[i]`` (its inputs); a bottleneck's conv3 costs ``fixed[i]`` once any
    channel is active; with none, the branch is a precomputed constant. ``shortcut[i]``
    (projection convs) is always paid; ``base`` is stem + classifier. Sequential mode pays conv1
    for active channels of kept blocks only; parallel mode pays all of conv1 in every block.
    """

    base: int
    fixed: tuple[int, ...]
    conv1_per_channel: tuple[int, ...]
    conv2_per_channel: tuple[int, ...]
    shortcut: tuple[int, ...]
    in_features: tuple[int, ...]
    channels: tuple[int, ...]
    backbone: int  # MACs of the static backbone

    @classmethod
    def of(cls, net: LCNet, input_shape: Sequence[int]) -> "MacTable":
        """Per-layer MACs from the tagged core's count (the one every tagged method reports), of
        the backbone as one subnet: live weights x output positions of each conv and the fc."""
        tagged = TaggedNet(net.backbone, 1, tuple(input_shape))
        name_of = {id(m): name for name, m in net.backbone.named_modules()}
        layers = list(tagged.layers) + [tagged.classifier]
        by_name = {name_of[id(layer)]: tagged.layer_macs_per_subnet(i)[0] for i, layer in enumerate(layers)}
        total = tagged.subnet_macs()
        fixed, conv1, conv2, shortcut = [], [], [], []
        used = 0
        for name, b in _blocks(net.backbone):
            c = b.conv1.out_channels
            for layer, column in (("conv1", conv1), ("conv2", conv2)):
                macs = by_name[f"{name}.{layer}"]
                if macs % c:
                    raise AssertionError(f"{name}.{layer}: MACs {macs} are not linear in {c} channels")
                column.append(macs // c)
            fixed.append(by_name.get(f"{name}.conv3", 0))
            shortcut.append(by_name.get(f"{name}.shortcut.0", 0))
            used += (conv1[-1] + conv2[-1]) * c + fixed[-1] + shortcut[-1]
        blocks = net.blocks
        return cls(total - used, tuple(fixed), tuple(conv1), tuple(conv2), tuple(shortcut),
                   tuple(_in_channels(b) for b in blocks), tuple(b.conv1.out_channels for b in blocks), total)

    def gate_macs(self, i: int, kept: Tensor, mode: str) -> Tensor:
        """MACs of block i's control nets for each input (``kept``: bool (N,))."""
        n_in, c = self.in_features[i], self.channels[i]
        if _check_mode(mode) == "parallel":
            return torch.full(kept.shape, n_in * (1 + c), dtype=torch.int64)
        return n_in + kept.to(torch.int64) * (n_in * c)

    def instance_macs(self, saliencies: Sequence[tuple[Tensor, Tensor]], mode: str) -> Tensor:
        """Per-input MACs (int64 (N,)) from inference saliencies [(S_L, S_C) per block]."""
        if len(saliencies) != len(self.channels):
            raise ValueError(f"expected saliencies for {len(self.channels)} blocks, got {len(saliencies)}")
        parallel = _check_mode(mode) == "parallel"
        n = saliencies[0][0].shape[0]
        total = torch.full((n,), self.base, dtype=torch.int64)
        for i, (s_l, s_c) in enumerate(saliencies):
            kept = (s_l > 0).cpu()
            active = torch.where(kept, (s_c > 0).sum(1).cpu().to(torch.int64), 0)
            if parallel:  # conv1 in full beside the gates; the decisions save conv2 (and conv3)
                conv1 = self.conv1_per_channel[i] * self.channels[i]
                branch = torch.where(active > 0, self.fixed[i] + self.conv2_per_channel[i] * active, 0) + conv1
            else:
                per_channel = self.conv1_per_channel[i] + self.conv2_per_channel[i]
                branch = torch.where(active > 0, self.fixed[i] + per_channel * active, 0)
            total += self.shortcut[i] + self.gate_macs(i, kept, mode) + branch
        return total

    def batch_macs(self, saliencies: Sequence[tuple[Tensor, Tensor]], mode: str, strategy: str = "group") -> int:
        """MACs the runtime executes for one batch with these saliencies under ``strategy``.

        "group" runs each input's own decision (the sum of :meth:`instance_macs`); "union" runs
        every input with the union of the kept inputs' channels; "split" runs the kept inputs
        with their union; "dense" computes every block and channel (all gates included).
        Shortcuts, parallel mode's conv1 and the gates run for the whole batch.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        parallel = _check_mode(mode) == "parallel"
        n = saliencies[0][0].shape[0]
        total = n * self.base
        for i, (s_l, s_c) in enumerate(saliencies):
            kept = (s_l > 0).cpu()
            active = (s_c > 0).cpu() & kept[:, None]
            c, c1 = self.channels[i], self.conv1_per_channel[i]
            per = self.conv2_per_channel[i] + (0 if parallel else c1)

            def branch(inputs: int, channels: int) -> int:
                return inputs * (self.fixed[i] + per * channels) if channels else 0

            total += n * self.shortcut[i] + (n * c1 * c if parallel else 0)
            if strategy == "dense":
                total += n * self.in_features[i] * (1 + c) + branch(n, c)
                continue
            total += int(self.gate_macs(i, kept, mode).sum())
            if not kept.any():
                continue
            if strategy == "union":
                total += branch(n, int(active.any(0).sum()))
            elif strategy == "split":
                total += branch(int(kept.sum()), int(active[kept].any(0).sum()))
            else:
                total += sum(branch(1, int(k)) for k in active[kept].sum(1))
        return total

    def full_macs(self, mode: str = "parallel") -> int:
        """Every block and channel on, gates included: the most one input can cost."""
        ones = torch.ones(1, dtype=torch.bool)
        return self.base + sum(int(self.gate_macs(i, ones, mode)) + self.shortcut[i] + self.fixed[i]
                               + (self.conv1_per_channel[i] + self.conv2_per_channel[i]) * self.channels[i]
                               for i in range(len(self.channels)))


# ----------------------------------------------------------------------------- runtime


@dataclass
class _Conv:
    """A convolution with BatchNorm folded in."""

    weight: Tensor
    bias: Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]

    def __call__(self, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        return F.conv2d(x, self.weight if weight is None else weight, self.bias if bias is None else bias,
                        self.stride, self.padding)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> _Conv:
    if conv.groups != 1 or conv.dilation != (1, 1):
        raise ValueError("only plain convolutions (groups=1, dilation=1) can be folded")
    if bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded (track_running_stats=False)")
    w, bias = fold_batchnorm(conv.weight, conv.bias, bn)  # the one fold every compaction uses
    return _Conv(w.detach().clone().contiguous(), bias.detach().clone(), tuple(conv.stride), tuple(conv.padding))


@dataclass
class _BlockPlan:
    kind: str  # "basic" | "bottleneck"
    conv1: _Conv
    conv2: _Conv
    conv3: _Conv | None
    shortcut: _Conv | None
    const: Tensor  # the branch's output when no channel is active (before S_L)
    channels: int
    gate: tuple[Tensor, Tensor] | None = None  # fused (1 + C, in) weight and bias: row 0 = L-Net
    # views into the fused gate
    wl: Tensor | None = field(default=None, repr=False)
    bl: Tensor | None = field(default=None, repr=False)
    wc: Tensor | None = field(default=None, repr=False)
    bc: Tensor | None = field(default=None, repr=False)


def _plan_block(block: nn.Module, gate: BlockGate | None) -> _BlockPlan:
    kind = "bottleneck" if isinstance(block, Bottleneck) else "basic"
    conv1, conv2 = _fold(block.conv1, block.bn1), _fold(block.conv2, block.bn2)
    conv3 = _fold(block.conv3, block.bn3) if kind == "bottleneck" else None
    shortcut = _fold(block.shortcut[0], block.shortcut[1]) if len(block.shortcut) else None
    with torch.no_grad():
        if conv3 is None:
            const = conv2.bias.clone()  # conv2 of all-zero inputs
        else:  # 1x1 conv3 of the constant map relu(conv2 bias)
            const = conv3.weight[:, :, 0, 0] @ conv2.bias.relu() + conv3.bias
    plan = _BlockPlan(kind, conv1, conv2, conv3, shortcut, const, block.conv1.out_channels)
    if gate is not None:
        w = torch.cat([gate.lnet.weight, gate.cnet.weight]).detach().clone().contiguous()
        b = torch.cat([gate.lnet.bias, gate.cnet.bias]).detach().clone()
        plan.gate = (w, b)
        plan.wl, plan.bl, plan.wc, plan.bc = w[:1], b[:1], w[1:], b[1:]
    return plan


class LCRuntime:
    """Inference with real skipping, built by :meth:`LCNet.compile` (or :func:`compile_static`).

    A snapshot: BN is folded into copies of the weights, so later training of the LCNet does
    not reach it (compile again). ``runtime(x, strategy=...)`` returns logits equal (up to float
    rounding) to ``net.eval()(x)``. At batch 1 a block with S_L = 0 runs no conv2 (sequential:
    no convolution at all) and only the active channels' slice of conv2 (sequential: of conv1 too)
    is used; decisions are read once per block
    as Python floats. Sliced weights are kept contiguous in a per-block LRU cache of
    ``slice_cache`` channel sets (0 disables it), since the same sets recur across inputs.
    """

    def __init__(self, net: nn.Module, mode: str, channels_last: bool = False, slice_cache: int = 32) -> None:
        static = not isinstance(net, LCNet)
        backbone = net if static else net.backbone
        _check_resnet(backbone)
        self.mode = "static" if static else _check_mode(mode)
        self.channels_last = bool(channels_last)
        if isinstance(slice_cache, bool) or not isinstance(slice_cache, int) or slice_cache < 0:
            raise ValueError(f"slice_cache must be an int >= 0, got {slice_cache!r}")
        self.slice_cache = slice_cache
        stem_conv, stem_bn = backbone.stem[0], backbone.stem[1]
        self.stem = _fold(stem_conv, stem_bn)
        gates = [None] * len(_blocks(backbone)) if static else list(net.gates)
        self.plans = [_plan_block(b, g) for (_, b), g in zip(_blocks(backbone), gates)]
        self.fc_weight = backbone.fc.weight.detach().clone()
        self.fc_bias = None if backbone.fc.bias is None else backbone.fc.bias.detach().clone()
        self._cache: list[OrderedDict] = [OrderedDict() for _ in self.plans]
        self.cache_hits = self.cache_misses = 0

    # -- public ---------------------------------------------------------------------------

    def __call__(self, x: Tensor, strategy: str = "group") -> Tensor:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"expected an (N, C, H, W) batch, got {getattr(x, 'shape', type(x).__name__)}")
        with torch.inference_mode():
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            h = self.stem(x).relu_()
            for i, plan in enumerate(self.plans):
                if self.mode == "static":
                    h = self._static_block(plan, h)
                elif x.shape[0] == 1 and strategy != "dense":
                    h = self._block_one(i, plan, h)
                else:
                    h = self._block(i, plan, h, strategy)
            return F.linear(h.mean((2, 3)), self.fc_weight, self.fc_bias)

    def sliced(self, x: Tensor) -> nn.Module:
        """The static network this runtime executes for the single input ``x`` (1, C, H, W).

        Skipped blocks have no branch convolutions but (parallel) conv1 in full, kept blocks have
        conv2 (sequential: and conv1) sliced to the active channels, and the control nets that run are included, so ``dyninfer.cost.macs`` of it is
        the input's true cost. Run on ``x`` it returns ``runtime(x)``; on other inputs it keeps
        x's decisions.
        """
        if self.mode == "static":
            raise ValueError("a static runtime has no per-input decisions to slice")
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[0] != 1:
            raise ValueError(f"sliced() takes one input of shape (1, C, H, W), got {getattr(x, 'shape', None)}")
        decisions = []
        with torch.inference_mode():
            h = self.stem(x).relu_()
            for i, plan in enumerate(self.plans):
                kept, idx, _, _ = self._decide_one(plan, h.mean((2, 3)))
                decisions.append(idx if kept else None)
                h = self._block_one(i, plan, h)
        # built outside inference mode, so the module also works with autograd
        device = self.fc_weight.device
        blocks = [_SlicedBlock(plan, self.mode, None if idx is None else torch.tensor(idx, dtype=torch.int64,
                                                                                     device=device))
                  for plan, idx in zip(self.plans, decisions)]
        return _SlicedNet(self.stem, blocks, self.fc_weight, self.fc_bias).eval()

    # -- batch 1 ----------------------------------------------------------------------------

    def _decide_one(self, plan: _BlockPlan, p: Tensor) -> tuple[bool, list[int], list[float], float]:
        """(kept, active channel ids, their S_C, S_L) for one input, as Python values."""
        if self.mode == "parallel":
            z = F.linear(p, *plan.gate)[0].tolist()
            z_l, z_c = z[0], z[1:]
            if not z_l > 0:
                return False, [], [], 0.0
        else:
            z_l = F.linear(p, plan.wl, plan.bl)[0, 0].item()
            if not z_l > 0:
                return False, [], [], 0.0
            z_c = F.linear(p, plan.wc, plan.bc)[0].tolist()
        idx = [j for j, v in enumerate(z_c) if v > 0]  # ReLU-1 is 0 exactly where z <= 0
        return True, idx, [min(z_c[j], 1.0) for j in idx], min(z_l, 1.0)

    def _block_one(self, i: int, plan: _BlockPlan, h: Tensor) -> Tensor:
        full = plan.conv1(h).relu_() if self.mode == "parallel" else None  # beside the gates
        kept, idx, s_c, s_l = self._decide_one(plan, h.mean((2, 3)))
        sc = h if plan.shortcut is None else plan.shortcut(h)
        if not kept:  # out = relu(shortcut(h)); h is a ReLU output, so the identity needs no ReLU
            return h if plan.shortcut is None else sc.relu_()
        if not idx:
            r = plan.const.view(1, -1, 1, 1)
        else:
            w1, b1, w2 = self._weights(i, plan, idx)
            t = plan.conv1(h, w1, b1).relu_() if full is None else _channels(full, idx)
            if min(s_c) < 1.0:
                t.mul_(torch.tensor(s_c, dtype=t.dtype, device=t.device).view(1, -1, 1, 1))
            r = plan.conv2(t, w2) if plan.conv3 is None else plan.conv3(plan.conv2(t, w2).relu_())
        out = r.add(sc) if s_l == 1.0 else torch.add(sc, r, alpha=s_l)
        return out.relu_()

    def _weights(self, i: int, plan: _BlockPlan, idx: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """conv1's rows, conv1's bias and conv2's input columns for channels ``idx`` (parallel
        mode: conv1 whole, since it already ran in full)."""
        c1, c2 = plan.conv1, plan.conv2
        if len(idx) == plan.channels:
            return c1.weight, c1.bias, c2.weight
        key = tuple(idx)
        cache = self._cache[i]
        hit = cache.get(key)
        if hit is not None:
            self.cache_hits += 1
            cache.move_to_end(key)
            return hit
        self.cache_misses += 1
        ids = torch.tensor(idx, dtype=torch.int64, device=c1.weight.device)
        if self.mode == "parallel":  # conv1 ran in full beside the gates: only conv2's columns are used
            sliced = (c1.weight, c1.bias, c2.weight.index_select(1, ids))
        else:
            sliced = (c1.weight.index_select(0, ids), c1.bias.index_select(0, ids), c2.weight.index_select(1, ids))
        if self.slice_cache:
            cache[key] = sliced
            if len(cache) > self.slice_cache:
                cache.popitem(last=False)
        return sliced

    # -- batches ----------------------------------------------------------------------------

    def _residual(self, i: int, plan: _BlockPlan, h: Tensor, idx: Tensor | None, s: Tensor, out_shape,
                  full: Tensor | None = None) -> Tensor:
        """The branch F for inputs ``h`` using channels ``idx`` (None: all) scaled by ``s``;
        ``full`` is conv1's output for all channels when it was computed already (parallel)."""
        if idx is not None and idx.numel() == 0:
            return plan.const.view(1, -1, 1, 1).expand(h.shape[0], *out_shape[1:]).clone()
        if idx is None:
            w1, b1, w2 = plan.conv1.weight, plan.conv1.bias, plan.conv2.weight
        else:
            w1, b1, w2 = self._weights(i, plan, idx.tolist())
        if full is None:
            t = plan.conv1(h, w1, b1).relu_()
        else:
            t = full if idx is None or idx.numel() == plan.channels else full.index_select(1, idx)
        t = t.mul_(s[:, :, None, None])  # t is this call's own tensor (``full`` is not read again)
        if plan.conv3 is None:
            return plan.conv2(t, w2)
        return plan.conv3(plan.conv2(t, w2).relu_())

    @staticmethod
    def _combine(r: Tensor, s_l: Tensor, sc: Tensor) -> Tensor:
        return r.mul_(s_l.view(-1, 1, 1, 1)).add_(sc).relu_()

    def _block(self, i: int, plan: _BlockPlan, h: Tensor, strategy: str) -> Tensor:
        n = h.shape[0]
        p = h.mean((2, 3))
        if self.mode == "parallel":
            g = F.linear(p, *plan.gate).clamp_(0, 1)
            s_l, s_c = g[:, 0], g[:, 1:]
        else:
            s_l, s_c = F.linear(p, plan.wl, plan.bl).clamp_(0, 1)[:, 0], None
        full = plan.conv1(h).relu_() if self.mode == "parallel" else None  # beside the gates
        sc = h if plan.shortcut is None else plan.shortcut(h)
        if strategy == "dense":
            s_c = F.linear(p, plan.wc, plan.bc).clamp_(0, 1) if s_c is None else s_c
            return self._combine(self._residual(i, plan, h, None, s_c, sc.shape, full), s_l, sc)
        keep = s_l > 0
        kept = keep.nonzero().flatten()
        if kept.numel() == 0:
            return h if plan.shortcut is None else sc.relu_()
        if s_c is None:  # sequential: the C-Net runs for kept inputs only
            s_c = p.new_zeros(n, plan.channels)
            s_c[kept] = F.linear(p.index_select(0, kept), plan.wc, plan.bc).clamp_(0, 1)
        active = (s_c > 0) & keep[:, None]
        if strategy == "union":
            idx = active.any(0).nonzero().flatten()
            return self._combine(self._residual(i, plan, h, idx, s_c[:, idx], sc.shape, full), s_l, sc)
        if strategy == "split":
            groups = [(kept, active.index_select(0, kept).any(0).nonzero().flatten())]
        else:  # group: one pass per distinct decision
            keys, inverse = torch.unique(active.index_select(0, kept), dim=0, return_inverse=True)
            groups = [(kept[inverse == u], keys[u].nonzero().flatten()) for u in range(keys.shape[0])]
        if len(groups) == 1 and groups[0][0].numel() == n:
            idx = groups[0][1]
            return self._combine(self._residual(i, plan, h, idx, s_c[:, idx], sc.shape, full), s_l, sc)
        out = h.clone() if plan.shortcut is None else sc.relu()
        for members, idx in groups:
            hm, scm = h.index_select(0, members), sc.index_select(0, members)
            s = s_c.index_select(0, members).index_select(1, idx)
            fm = None if full is None else full.index_select(0, members)
            r = self._residual(i, plan, hm, idx, s, scm.shape, fm)
            out.index_copy_(0, members, self._combine(r, s_l.index_select(0, members), scm))
        return out

    @staticmethod
    def _static_block(plan: _BlockPlan, h: Tensor) -> Tensor:
        sc = h if plan.shortcut is None else plan.shortcut(h)
        t = plan.conv1(h).relu_()
        r = plan.conv2(t) if plan.conv3 is None else plan.conv3(plan.conv2(t).relu_())
        return r.add_(sc).relu_()


def _channels(t: Tensor, idx: list[int]) -> Tensor:
    """Channels ``idx`` of ``t`` (N, C, H, W): a view when they are all of them."""
    if len(idx) == t.shape[1]:
        return t
    return t.index_select(1, torch.tensor(idx, dtype=torch.int64, device=t.device))


def compile_static(model: nn.Module, channels_last: bool = False) -> LCRuntime:
    """The plain backbone through the same folded-BN runtime code: the fair latency baseline."""
    return LCRuntime(model, "static", channels_last)


def _conv_module(conv: _Conv, weight: Tensor, bias: Tensor) -> nn.Conv2d:
    out_ch, in_ch, kh, kw = weight.shape
    m = torch.nn.utils.skip_init(nn.Conv2d, in_ch, out_ch, (kh, kw), stride=conv.stride, padding=conv.padding,
                                 device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        m.weight.copy_(weight)
        m.bias.copy_(bias)
    return m


def _linear_module(weight: Tensor, bias: Tensor) -> nn.Linear:
    m = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        m.weight.copy_(weight)
        m.bias.copy_(bias)
    return m


class _SlicedBlock(nn.Module):
    """One block of the network executed for one input (decisions frozen)."""

    def __init__(self, plan: _BlockPlan, mode: str, idx: Tensor | None) -> None:
        super().__init__()
        self.mode, self.kept, self.bottleneck = mode, idx is not None, plan.conv3 is not None
        if mode == "parallel":
            self.gate = _linear_module(*plan.gate)
        else:
            self.lnet = _linear_module(plan.wl, plan.bl)
            if self.kept:
                self.cnet = _linear_module(plan.wc, plan.bc)
        self.shortcut = None if plan.shortcut is None else _conv_module(plan.shortcut, plan.shortcut.weight,
                                                                       plan.shortcut.bias)
        self.register_buffer("idx", idx if idx is not None else torch.zeros(0, dtype=torch.int64))
        self.register_buffer("const", plan.const.clone())
        self.conv1 = self.conv2 = self.conv3 = None
        c1, c2 = plan.conv1, plan.conv2
        if mode == "parallel":  # conv1 runs in full beside the gates, whatever they decide
            self.conv1 = _conv_module(c1, c1.weight, c1.bias)
        if self.kept and idx.numel():
            if mode != "parallel":
                self.conv1 = _conv_module(c1, c1.weight[idx], c1.bias[idx])
            self.conv2 = _conv_module(c2, c2.weight[:, idx], c2.bias)
            if plan.conv3 is not None:
                self.conv3 = _conv_module(plan.conv3, plan.conv3.weight, plan.conv3.bias)

    def forward(self, h: Tensor) -> Tensor:
        p = h.mean((2, 3))
        if self.mode == "parallel":
            g = relu1(self.gate(p))
            s_l, s_c = g[:, 0], g[:, 1:]
        else:
            s_l = relu1(self.lnet(p))[:, 0]
            s_c = relu1(self.cnet(p)) if self.kept else None
        full = F.relu(self.conv1(h)) if self.mode == "parallel" else None
        sc = h if self.shortcut is None else self.shortcut(h)
        if not self.kept:
            return sc if self.shortcut is None else F.relu(sc)
        if self.conv2 is None:
            r = self.const.view(1, -1, 1, 1).expand_as(sc)
        else:
            t = full[:, self.idx] if full is not None else F.relu(self.conv1(h))
            t = t * s_c[:, self.idx, None, None]
            r = self.conv2(t) if self.conv3 is None else self.conv3(F.relu(self.conv2(t)))
        return F.relu(r * s_l[:, None, None, None] + sc)


class _SlicedNet(nn.Module):
    def __init__(self, stem: _Conv, blocks: list[_SlicedBlock], fc_weight: Tensor, fc_bias: Tensor | None) -> None:
        super().__init__()
        self.stem = _conv_module(stem, stem.weight, stem.bias)
        self.blocks = nn.Sequential(*blocks)
        self.fc = _linear_module(fc_weight, fc_bias if fc_bias is not None else torch.zeros(fc_weight.shape[0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class LCTrainConfig:
    """How to train an LCNet (SGD Nesterov, as in the paper).

    Loss = cross-entropy + ``l1_layer`` * mean|S_L| + ``l1_channel`` * mean|S_C|, each mean
    taken over inputs, then over blocks (and channels), so a strength means the same at any
    depth or width. ``lr`` is the backbone's rate, ``control_lr`` the control nets' (None: same
    as ``lr``). Defaults are for training jointly from scratch at CIFAR scale; for a
    pre-trained backbone use ``lr=PRETRAINED_LR, control_lr=PRETRAINED_CONTROL_LR``.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    control_lr: float | None = None
    l1_layer: float = 1.0
    l1_channel: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    augment: bool = True
    seed: int = 0
    eval_batch_size: int = 512
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("l1_layer", "l1_channel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"LCTrainConfig.{name} must be a number >= 0, got {v!r}")
        if self.control_lr is not None:
            v = self.control_lr
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"LCTrainConfig.control_lr must be a number > 0 or None, got {v!r}")
        self.train_config()  # validates the rest

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, optimizer="sgd", lr=self.lr,
                           momentum=self.momentum, nesterov=True, weight_decay=self.weight_decay,
                           schedule=self.schedule, augment=self.augment, seed=self.seed,
                           eval_batch_size=self.eval_batch_size, progress=self.progress)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LCTrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LCTrainConfig fields {unknown}; accepted: {sorted(known)}")
        return cls(**d)


def lcnet_loss(l1_layer: float, l1_channel: float):
    """``loss_fn`` for :func:`dyninfer.train.fit`: cross-entropy + L1 on the saliencies."""

    def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        logits, saliencies = model(x, return_saliency=True)
        ce = F.cross_entropy(logits, y)
        s_l = torch.stack([s.abs().mean() for s, _ in saliencies]).mean()
        s_c = torch.stack([c.abs().mean() for _, c in saliencies]).mean()
        loss = ce + l1_layer * s_l + l1_channel * s_c
        return {"loss": loss, "logits": logits, "ce": ce.detach(), "saliency_layer": s_l.detach(),
                "saliency_channel": s_c.detach()}

    return loss_fn


class ControlLearningRate:
    """Gives the control nets ``ratio`` x the backbone's learning rate inside one SGD optimizer.

    After backward, each control-net gradient g becomes ``ratio * g + (ratio - 1) * wd * p``, so
    SGD's step (which adds ``wd * p`` and accumulates momentum linearly) moves those parameters
    exactly as an SGD group with lr ``ratio * lr`` would -- and checkpoints/resume stay as in fit.
    """

    def __init__(self, ratio: float, weight_decay: float) -> None:
        self.ratio, self.weight_decay = float(ratio), float(weight_decay)

    def on_after_backward(self, state) -> None:
        for p in state.model.gates.parameters():
            if p.grad is not None:
                p.grad.mul_(self.ratio).add_(p.detach(), alpha=(self.ratio - 1.0) * self.weight_decay)


def train(net: LCNet, train_set: ImageSet, config: LCTrainConfig | None = None, *,
          test: ImageSet | None = None, out: str | Path | None = None, resume: bool = True,
          callbacks: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Train ``net`` (backbone and control nets jointly) with :func:`dyninfer.train.fit`.

    From scratch: a freshly created backbone and the default config. On a pre-trained backbone:
    wrap the trained model and use the pre-trained learning rates. Returns fit's history (with
    ``train_ce``, ``train_saliency_layer`` and ``train_saliency_channel`` per epoch).
    """
    if not isinstance(net, LCNet):
        raise TypeError(f"net must be an LCNet (see lcnet.wrap), got {type(net).__name__}")
    config = config or LCTrainConfig()
    cbs = list(callbacks)
    if config.control_lr is not None and config.control_lr != config.lr:
        cbs.append(ControlLearningRate(config.control_lr / config.lr, config.weight_decay))
    return fit(net, train_set, config.train_config(), test=test, out=out,
               loss_fn=lcnet_loss(config.l1_layer, config.l1_channel), callbacks=cbs, resume=resume)


# ----------------------------------------------------------------------------- evaluation


@dataclass
class LCEvaluation:
    """Accuracy and per-input cost of an LCNet on a data set (inference saliencies)."""

    top1: float
    macs: Tensor          # int64 (N,): MACs executed for each input in ``mode``
    labels: Tensor        # int64 (N,)
    correct: Tensor       # bool (N,)
    backbone_macs: int    # the static backbone
    full_macs: int        # every block and channel on, gates included
    keep_rate: list[float]          # per block: fraction of inputs running it
    channel_rate: list[Tensor]      # per block: (classes, C) fraction of a class's inputs computing a channel
    block_names: list[str]
    mode: str
    macs_by_mode: dict[str, Tensor] = field(default_factory=dict)  # both schedules, same decisions

    def mac_fractions(self, mode: str | None = None) -> Tensor:
        macs = self.macs if mode is None else self.macs_by_mode[_check_mode(mode)]
        return macs.double() / self.backbone_macs

    def summary(self) -> dict[str, Any]:
        f = self.mac_fractions()
        return {
            "top1": self.top1, "n": int(self.macs.numel()), "mode": self.mode,
            "mean_macs": float(self.macs.double().mean()), "backbone_macs": self.backbone_macs,
            "full_macs": self.full_macs, "mac_fraction_mean": float(f.mean()),
            "mac_fraction_min": float(f.min()), "mac_fraction_median": float(f.median()),
            "mac_fraction_max": float(f.max()),
            "mac_fraction_mean_by_mode": {m: float(self.mac_fractions(m).mean()) for m in self.macs_by_mode},
            "keep_rate": {n: r for n, r in zip(self.block_names, self.keep_rate)},
            "channel_rate": {n: float(c.mean()) for n, c in zip(self.block_names, self.channel_rate)},
        }


@torch.no_grad()
def evaluate(net: LCNet, data: ImageSet, batch_size: int = 256, mode: str | None = None) -> LCEvaluation:
    """Top-1 accuracy (masked reference path, eval mode) and per-input MACs in ``mode``."""
    if len(data) == 0:
        raise ValueError(f"cannot evaluate on an empty data set ({data.name!r})")
    mode = _check_mode(mode or net.mode)
    table = net.mac_table(data.input_shape)
    k = data.num_classes
    macs: dict[str, list[Tensor]] = {m: [] for m in MODES}
    correct = []
    keep = torch.zeros(len(net.gates))
    channels = [torch.zeros(k, g.channels) for g in net.gates]
    per_class = torch.zeros(k)
    device = next(net.parameters()).device
    with _eval(net):
        for x, y in data.batches(batch_size):
            logits, sal = net(x.to(device), return_saliency=True)
            sal = [(s_l.cpu(), s_c.cpu()) for s_l, s_c in sal]
            for m in MODES:
                macs[m].append(table.instance_macs(sal, m))
            correct.append(logits.argmax(1).cpu() == y)
            onehot = F.one_hot(y, k).float()
            per_class += onehot.sum(0)
            for i, (s_l, s_c) in enumerate(sal):
                kept = s_l > 0
                keep[i] += kept.sum()
                channels[i] += onehot.T @ ((s_c > 0) & kept[:, None]).float()
    correct_t = torch.cat(correct)
    n = len(data)
    by_mode = {m: torch.cat(v) for m, v in macs.items()}
    return LCEvaluation(
        top1=float(correct_t.float().mean()), macs=by_mode[mode], labels=data.labels.clone(),
        correct=correct_t, backbone_macs=table.backbone, full_macs=table.full_macs(mode),
        keep_rate=(keep / n).tolist(), channel_rate=[c / per_class.clamp_min(1)[:, None] for c in channels],
        block_names=net.block_names, mode=mode, macs_by_mode=by_mode)


# ----------------------------------------------------------------------------- persistence


def load(path: str | Path, mode: str | None = None) -> LCNet:
    """An LCNet saved by :func:`dyninfer.train.fit` / ``checkpoint.save_model`` at ``path``."""

    _, meta = ckpt.load(path)
    cfg = meta.get("model")
    if not isinstance(cfg, Mapping) or not str(cfg.get("name", "")).startswith("lcnet/") or "backbone" not in cfg:
        raise ckpt.CheckpointMismatchError(
            f"{str(ckpt.paths(path)[0])!r} is not an LC-Net checkpoint (model {None if cfg is None else cfg.get('name')!r})")
    base = dict(cfg["backbone"])
    name = base.pop("name")
    backbone = models.create(name, **base)
    net = LCNet(backbone, mode or cfg.get("mode", "parallel"), cfg.get("slope", DEFAULT_SLOPE))
    ckpt.load_model(path, net)
    return net
