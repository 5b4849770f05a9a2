"""Tagged networks: every hidden neuron carries the index of the smallest subnet that owns it.

A :class:`TaggedSequential` wraps a flat ``nn.Sequential`` of plain layers (conv/linear with
optional BatchNorm, ReLU, pooling, flatten; the last child is the classifier) and adds, per
hidden layer, an integer ``tag`` per output neuron (1..N, or N+1 for "dropped") and a pruning
mask per weight.  A connectivity rule says which inputs a neuron reads (DESIGN.md, "The one idea
that unifies them"):

* ``causal`` (SteppingNet, any-width): a neuron with tag t reads only inputs with tag <= t, so
  subnet k never depends on a larger subnet and its activations are final for every subnet above
  it; one pass of the largest subnet gives every subnet's logits.
* ``full`` (slimmable, US-Nets, slicing): subnet k uses every neuron with tag <= k and every
  connection among them; stepping up recomputes. With ``switchable_bn=True`` each subnet has its
  own BatchNorm (statistics and affine), chosen by the explicit ``subnet`` argument.

Subnet k is computed by slicing the active rows/columns out of the weights, so work that is not
in the subnet is not done, and BatchNorm statistics are only touched for the active channels.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

_POST_OPS = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)


@dataclass
class HiddenOutputs:
    """What one pass of the largest subnet yields for joint training and importance."""

    logits: list[torch.Tensor]        # logits of subnets 1..N (classifier partial sums)
    preacts: list[torch.Tensor]       # per hidden layer: pre-activation of the active rows
    rows: list[torch.Tensor]          # per hidden layer: channel index of each active row


RULES = ("causal", "full")


class SwitchableBatchNorm(nn.Module):
    """One BatchNorm per subnet (slimmable networks): ``choices[k - 1]`` normalises subnet k.

    Every copy spans all channels of its layer; subnet k reads and updates only its active rows.
    """

    def __init__(self, norm: nn.Module, num_subnets: int):
        super().__init__()
        self.choices = nn.ModuleList(copy.deepcopy(norm) for _ in range(num_subnets))

    def __getitem__(self, subnet: int) -> nn.Module:
        return self.choices[subnet - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - guarded use only
        raise RuntimeError("a SwitchableBatchNorm needs the subnet; TaggedSequential selects the copy")


class TaggedSequential(nn.Module):
    """A flat sequential model with per-neuron subnet tags and a connectivity rule.

    ``rule="causal"`` (default) is the incremental rule; ``rule="full"`` gives subnet k all
    connections among its neurons. ``switchable_bn`` gives each subnet its own BatchNorm copies
    (initialised from the model's). The model's conv/linear layers are shared, not copied.
    """

    def __init__(self, model: nn.Sequential, num_subnets: int, input_shape: Sequence[int], *,
                 rule: str = "causal", switchable_bn: bool = False):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        self.rule = rule
        self.switchable_bn = bool(switchable_bn)
        if not isinstance(model, nn.Sequential):
            raise TypeError(
                f"SteppingNet needs a flat nn.Sequential (lenet-5, lenet-3c1l, vgg-16 in the zoo); "
                f"got {type(model).__name__}"
            )
        if num_subnets < 1:
            raise ValueError(f"num_subnets must be >= 1, got {num_subnets}")
        self.num_subnets = int(num_subnets)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.dyninfer_config = dict(getattr(model, "dyninfer_config", {}) or {})

        children = list(model.children())
        if not children or not isinstance(children[-1], nn.Linear):
            raise ValueError("the model's last child must be the nn.Linear classifier")
        self.layers = nn.ModuleList()   # hidden Conv2d / Linear layers
        self.norms = nn.ModuleList()    # BatchNorm after each hidden layer (or Identity)
        self.posts = nn.ModuleList()    # ReLU / pooling / flatten after each hidden layer
        for child in children[:-1]:
            if isinstance(child, (nn.Conv2d, nn.Linear)):
                if isinstance(child, nn.Conv2d) and child.groups != 1:
                    raise ValueError("grouped convolutions cannot carry per-neuron tags")
                self.layers.append(child)
                self.norms.append(nn.Identity())
                self.posts.append(nn.Sequential())
            elif not self.layers:
                raise ValueError(f"the model must start with Conv2d or Linear, got {type(child).__name__}")
            elif isinstance(child, (nn.BatchNorm2d, nn.BatchNorm1d)):
                if not isinstance(self.norms[-1], nn.Identity) or len(self.posts[-1]) > 0:
                    raise ValueError("BatchNorm must directly follow a Conv2d/Linear layer")
                self.norms[-1] = child
            elif isinstance(child, _POST_OPS):
                self.posts[-1].append(child)
            else:
                raise ValueError(
                    f"layer type {type(child).__name__} is not supported in a tagged network; "
                    f"supported: Conv2d, Linear, BatchNorm, ReLU, MaxPool2d, AvgPool2d, Flatten, Dropout"
                )
        self.classifier = children[-1]

        # Dry run: output positions per layer (MACs) and flatten multiplicity (input tags).
        self.out_positions: list[int] = []
        self.in_repeat: list[int] = []  # how many input features each previous neuron feeds
        with torch.no_grad():
            was_training = model.training
            model.eval()
            x = torch.zeros(1, *self.input_shape)
            repeat = 1
            for layer, norm, post in zip(self.layers, self.norms, self.posts):
                self.in_repeat.append(repeat)
                x = norm(layer(x))
                self.out_positions.append(x[0, 0].numel())
                channels = x.shape[1]
                x = post(x)
                repeat = x[0].numel() // channels if x.dim() == 2 else 1
            self.in_repeat.append(repeat)  # classifier
            model.train(was_training)

        if self.switchable_bn:
            for i, norm in enumerate(self.norms):
                if not isinstance(norm, nn.Identity):
                    self.norms[i] = SwitchableBatchNorm(norm, self.num_subnets)

        for i, layer in enumerate(self.layers):
            self.register_buffer(f"tags_{i}", torch.ones(layer.weight.shape[0], dtype=torch.long))
            self.register_buffer(f"alive_{i}", torch.ones_like(layer.weight, dtype=torch.bool))
        self.register_buffer("alive_cls", torch.ones_like(self.classifier.weight, dtype=torch.bool))

    # ----------------------------------------------------------------- tags and masks
    @property
    def num_hidden(self) -> int:
        return len(self.layers)

    @property
    def incremental(self) -> bool:
        """Whether subnet k's activations are final for every larger subnet (causal rule, shared
        BatchNorm): then one pass gives every subnet's logits and compaction/sessions apply."""
        return self.rule == "causal" and not self.switchable_bn

    def widths(self) -> list[int]:
        """Output neurons of every hidden layer (the largest a subnet can use)."""
        return [int(layer.weight.shape[0]) for layer in self.layers]

    def set_prefix_tags(self, counts: Sequence[Sequence[int]]) -> None:
        """Regular (slimmable-style) tags: subnet k owns the first ``counts[k-1][i]`` neurons of
        hidden layer i; neurons beyond the largest subnet's count get tag N+1 (dropped).

        Counts must be >= 1, non-decreasing in k and at most the layer's width.
        """
        widths = self.widths()
        rows = [list(map(int, c)) for c in counts]
        if len(rows) != self.num_subnets or any(len(c) != self.num_hidden for c in rows):
            raise ValueError(f"counts must be {self.num_subnets} lists (one per subnet) of {self.num_hidden} "
                             f"channel counts (one per hidden layer); got {counts!r}")
        for i, width in enumerate(widths):
            column = [c[i] for c in rows]
            if column[0] < 1 or column[-1] > width or any(a > b for a, b in zip(column, column[1:])):
                raise ValueError(f"layer {i} (width {width}): counts per subnet must be non-decreasing "
                                 f"within 1..{width}; got {column}")
            tags = self.tags(i)
            index = torch.arange(width, device=tags.device)
            bounds = torch.tensor(column, device=tags.device)
            tags.copy_(1 + (index.unsqueeze(1) >= bounds.unsqueeze(0)).sum(1))
            self.alive(i)[:] = True

    def norm_of(self, layer: int, subnet: int) -> nn.Module:
        """The BatchNorm (or Identity) that normalises hidden ``layer`` in ``subnet``."""
        norm = self.norms[layer]
        return norm[subnet] if isinstance(norm, SwitchableBatchNorm) else norm

    @torch.no_grad()
    def reset_bn_statistics(self, subnet: int) -> None:
        """Forget subnet ``subnet``'s BatchNorm running statistics (before recalibration).

        Only meaningful with switchable BatchNorm: a shared BN serves every subnet.
        """
        if not self.switchable_bn:
            raise ValueError("reset_bn_statistics needs switchable_bn=True; a shared BatchNorm serves every subnet")
        k = self._check_subnet(subnet)
        for i in range(self.num_hidden):
            norm = self.norm_of(i, k)
            if getattr(norm, "running_mean", None) is not None:
                norm.reset_running_stats()

    def tags(self, layer: int) -> torch.Tensor:
        return getattr(self, f"tags_{layer}")

    def set_tags(self, layer: int, channels: torch.Tensor, tag: int) -> None:
        """Move ``channels`` of ``layer`` to subnet ``tag`` and revive their pruned weights."""
        if not 1 <= tag <= self.num_subnets + 1:
            raise ValueError(f"tag must be in 1..{self.num_subnets + 1}, got {tag}")
        self.tags(layer)[channels] = tag
        self.alive(layer)[channels] = True

    def alive(self, layer: int) -> torch.Tensor:
        return self.alive_cls if layer == self.num_hidden else getattr(self, f"alive_{layer}")

    def input_tags(self, layer: int) -> torch.Tensor:
        """Tag of each input feature of ``layer`` (the image belongs to every subnet: tag 1)."""
        if layer == 0:
            return torch.ones(self.input_shape[0], dtype=torch.long, device=self.tags(0).device)
        return self.tags(layer - 1).repeat_interleave(self.in_repeat[layer])

    def connectivity(self, layer: int) -> torch.Tensor:
        """(out, in) bool: the causal rule, output with tag t reads inputs with tag <= t.

        Under the full rule every connection is allowed; which ones a subnet uses follows from
        the subnet alone (rows and columns with tag <= k).
        """
        in_tags = self.input_tags(layer)
        if layer == self.num_hidden or self.rule == "full":  # classifier outputs belong to every subnet
            weight = self.classifier.weight if layer == self.num_hidden else self.layers[layer].weight
            return torch.ones(weight.shape[:2], dtype=torch.bool, device=in_tags.device)
        return in_tags.unsqueeze(0) <= self.tags(layer).unsqueeze(1)

    def _mask_slice(self, layer: int, rows: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor:
        """``weight_mask(layer)[rows][:, cols]`` without building the whole mask."""
        alive = self.alive(layer)
        alive = alive[:, cols] if rows is None else alive[rows][:, cols]
        if layer == self.num_hidden or self.rule == "full":
            return alive
        in_tags = self.input_tags(layer)[cols]
        conn = in_tags.unsqueeze(0) <= self.tags(layer)[rows].unsqueeze(1)
        return alive & conn.view(*conn.shape, *([1] * (alive.dim() - 2)))

    def weight_mask(self, layer: int) -> torch.Tensor:
        """Causal rule and pruning together, shaped like the layer's weight."""
        weight = self.classifier.weight if layer == self.num_hidden else self.layers[layer].weight
        conn = self.connectivity(layer)
        return conn.view(*conn.shape, *([1] * (weight.dim() - 2))) & self.alive(layer)

    def prune(self, threshold: float) -> int:
        """Unstructured magnitude pruning: weights with |w| < threshold are masked (not deleted).

        Dense values keep their last value and are revived when their neuron moves or when they
        grow back above the threshold (``straight-through`` training keeps them learning).
        Returns the number of masked weights.
        """
        pruned = 0
        for i in range(self.num_hidden + 1):
            weight = self.classifier.weight if i == self.num_hidden else self.layers[i].weight
            alive = weight.detach().abs() >= threshold
            self.alive(i).copy_(alive)
            pruned += int((~alive).sum())
        return pruned

    def counts(self) -> list[list[int]]:
        """Per hidden layer, the number of neurons with each tag 1..N+1."""
        return [torch.bincount(self.tags(i), minlength=self.num_subnets + 2)[1:].tolist()
                for i in range(self.num_hidden)]

    # ----------------------------------------------------------------- cost
    def subnet_macs(self, input_shape: Sequence[int] | None = None, subnet: int | None = None) -> int:
        """Exact MACs of subnet k: live (causal, unpruned) weights of its rows x output positions.

        Follows the :func:`dyninfer.cost.macs` protocol; pruned weights cost nothing.
        """
        if input_shape is not None and tuple(input_shape) != self.input_shape:
            raise ValueError(f"this network was built for input shape {self.input_shape}, got {tuple(input_shape)}")
        k = self._check_subnet(self.num_subnets if subnet is None else subnet)
        total = 0
        for i in range(self.num_hidden + 1):
            cols = torch.nonzero(self.input_tags(i) <= k).squeeze(1)
            if i == self.num_hidden:
                total += int(self._mask_slice(i, None, cols).sum())
            elif self.rule == "causal":  # columns with tag > k are masked already in rows <= k
                total += int(self.weight_mask(i)[self.tags(i) <= k].sum()) * self.out_positions[i]
            else:
                rows = torch.nonzero(self.tags(i) <= k).squeeze(1)
                total += int(self._mask_slice(i, rows, cols).sum()) * self.out_positions[i]
        return total

    def macs_per_subnet(self) -> list[int]:
        return [self.subnet_macs(subnet=k) for k in range(1, self.num_subnets + 1)]

    # ----------------------------------------------------------------- forward
    def _check_subnet(self, subnet: int) -> int:
        if isinstance(subnet, bool) or not isinstance(subnet, int) or not 1 <= subnet <= self.num_subnets:
            raise ValueError(f"subnet must be an int in 1..{self.num_subnets}, got {subnet!r}")
        return subnet

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected input of shape (batch, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )

    def _effective_weight(self, layer: int, straight_through: bool, rows: torch.Tensor | None,
                          cols: torch.Tensor) -> torch.Tensor:
        """The weight block of ``rows`` (None: all) x ``cols`` with the rule and pruning applied."""
        weight = self.classifier.weight if layer == self.num_hidden else self.layers[layer].weight
        if self.rule == "full":  # slice first: the block is all a subnet touches
            weight = weight[:, cols] if rows is None else weight[rows][:, cols]
            mask = self._mask_slice(layer, rows, cols)
            if straight_through and self.training:
                return weight - (weight * ~mask).detach()
            return weight * mask
        mask = self.weight_mask(layer)
        if straight_through and self.training:
            # value: masked weight; gradient: reaches every causally allowed dense weight, so
            # pruned weights keep learning until they are revived.
            conn = self.connectivity(layer)
            conn = conn.view(*conn.shape, *([1] * (weight.dim() - 2)))
            weight = weight * conn - (weight * (conn & ~mask)).detach()
        else:
            weight = weight * mask
        return weight[:, cols] if rows is None else weight[rows][:, cols]

    def _hidden(self, x: torch.Tensor, subnet: int, straight_through: bool, keep: bool):
        """Run hidden layers of ``subnet``; returns features, their input columns, preacts, rows."""
        cols = torch.arange(x.shape[1], device=x.device)
        preacts, row_list = [], []
        for i, (layer, norm, post) in enumerate(zip(self.layers, self.norms, self.posts)):
            rows = torch.nonzero(self.tags(i) <= subnet).squeeze(1)
            weight = self._effective_weight(i, straight_through, rows, cols)
            bias = layer.bias[rows] if layer.bias is not None else None
            if isinstance(layer, nn.Conv2d):
                z = F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation)
            else:
                z = F.linear(x, weight, bias)
            z = self._norm(self.norm_of(i, subnet), z, rows)
            if keep:
                preacts.append(z)
                row_list.append(rows)
            x = post(z)
            repeat = self.in_repeat[i + 1]
            cols = (rows.unsqueeze(1) * repeat + torch.arange(repeat, device=rows.device)).reshape(-1)
        return x, cols, preacts, row_list

    @staticmethod
    def _norm(norm: nn.Module, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """BatchNorm restricted to ``rows``; running statistics updated only for those rows."""
        if isinstance(norm, nn.Identity):
            return z
        use_batch = norm.training or norm.running_mean is None
        mean = norm.running_mean[rows] if norm.running_mean is not None else None
        var = norm.running_var[rows] if norm.running_var is not None else None
        weight = norm.weight[rows] if norm.weight is not None else None
        bias = norm.bias[rows] if norm.bias is not None else None
        momentum = 0.1 if norm.momentum is None else norm.momentum
        out = F.batch_norm(z, mean, var, weight, bias, use_batch, momentum, norm.eps)
        if norm.training and norm.running_mean is not None:
            with torch.no_grad():
                norm.running_mean[rows] = mean
                norm.running_var[rows] = var
        return out

    def forward(self, x: torch.Tensor, subnet: int | None = None, *, straight_through: bool = False) -> torch.Tensor:
        """Logits of subnet ``subnet`` (1-based; default the largest), computed from scratch."""
        k = self._check_subnet(self.num_subnets if subnet is None else subnet)
        self._check_input(x)
        features, cols, _, _ = self._hidden(x, k, straight_through, keep=False)
        weight = self._effective_weight(self.num_hidden, straight_through, None, cols)
        return F.linear(features, weight, self.classifier.bias)

    def forward_all(self, x: torch.Tensor, *, straight_through: bool = False, keep_preacts: bool = False) -> HiddenOutputs:
        """One pass of the largest subnet gives every subnet's logits.

        Under the causal rule hidden activations do not depend on the subnet, so subnet k's
        logits are the bias plus the classifier's partial sum over features with tag <= k.
        Otherwise (full rule, switchable BN) every subnet is run on its own: N passes.
        """
        self._check_input(x)
        n = self.num_subnets
        if not self.incremental:
            if keep_preacts:
                raise ValueError("keep_preacts needs the causal rule with shared BatchNorm "
                                 f"(this network: rule={self.rule!r}, switchable_bn={self.switchable_bn})")
            return HiddenOutputs([self(x, k, straight_through=straight_through) for k in range(1, n + 1)], [], [])
        features, cols, preacts, rows = self._hidden(x, n, straight_through, keep=keep_preacts)
        weight = self._effective_weight(self.num_hidden, straight_through, None, cols)
        feature_tags = self.input_tags(self.num_hidden)[cols]
        logits, running = [], self.classifier.bias
        for k in range(1, n + 1):
            sel = torch.nonzero(feature_tags == k).squeeze(1)
            part = F.linear(features[:, sel], weight[:, sel])
            running = part + running if running is not None else part
            logits.append(running)
        return HiddenOutputs(logits, preacts, rows)

    # ----------------------------------------------------------------- gradient shaping
    def param_tags(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """(parameter, tag per slice, dim) for every parameter: which subnet owns each slice.

        Hidden weights, biases and BN affine parameters belong to their output neuron's tag; the
        classifier's weight columns to their input feature's tag, its bias to subnet 1.
        """
        owned = []
        for i, (layer, norm) in enumerate(zip(self.layers, self.norms)):
            tags = self.tags(i)
            for p in (layer.weight, layer.bias, getattr(norm, "weight", None), getattr(norm, "bias", None)):
                if p is not None:
                    owned.append((p, tags, 0))
            if isinstance(norm, SwitchableBatchNorm):  # copy k serves subnet k only (N+1: unused rows)
                for k, copy_k in enumerate(norm.choices, start=1):
                    own = torch.where(tags <= k, torch.full_like(tags, k), torch.full_like(tags, self.num_subnets + 1))
                    for p in (copy_k.weight, copy_k.bias):
                        if p is not None:
                            owned.append((p, own, 0))
        owned.append((self.classifier.weight, self.input_tags(self.num_hidden), 1))
        if self.classifier.bias is not None:
            owned.append((self.classifier.bias, torch.ones(1, dtype=torch.long, device=self.classifier.bias.device), 0))
        return owned

    @torch.no_grad()
    def shape_gradients(self, factor: Callable[[torch.Tensor], torch.Tensor],
                        decay: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        weight_decay: float = 0.0) -> None:
        """grad <- factor(tag) * grad + weight_decay * decay(tag) * param, slice by slice.

        The one mechanism behind weight-update suppression in both training schedules.
        """
        for p, tags, dim in self.param_tags():
            if p.grad is None:
                continue
            shape = [1] * p.dim()
            shape[dim] = -1
            f = factor(tags.to(p.dtype)).view(shape) if tags.numel() > 1 else factor(tags.to(p.dtype))
            p.grad.mul_(f)
            if weight_decay and p.dim() > 1:  # decay weights, not biases or BN parameters
                d = decay(tags.to(p.dtype)).view(shape) if decay is not None else 1.0
                p.grad.add_(p * d, alpha=weight_decay)

    # ----------------------------------------------------------------- dense export
    @torch.no_grad()
    def dense(self, subnet: int | None = None, *, fold_bn: bool = True) -> nn.Sequential:
        """Subnet k as a plain ``nn.Sequential`` of its exact shapes (any rule; eval statistics).

        The once-for-all ``get_active_subnet(preserve_weight=True)`` step: sliced, masked
        weights are copied into static layers, the subnet's BatchNorm folded in when
        ``fold_bn``. Under the causal rule masked (upper-block) weights stay as zeros.
        """
        k = self._check_subnet(self.num_subnets if subnet is None else subnet)
        modules: list[nn.Module] = []
        cols = torch.arange(self.input_shape[0], device=self.tags(0).device)
        for i, (layer, post) in enumerate(zip(self.layers, self.posts)):
            rows = torch.nonzero(self.tags(i) <= k).squeeze(1)
            weight = layer.weight[rows][:, cols] * self._mask_slice(i, rows, cols)
            bias = layer.bias[rows] if layer.bias is not None else None
            if isinstance(layer, nn.Conv2d):
                dense = nn.Conv2d(len(cols), len(rows), layer.kernel_size, layer.stride, layer.padding,
                                  layer.dilation, bias=bias is not None or fold_bn)
            else:
                dense = nn.Linear(len(cols), len(rows), bias=bias is not None or fold_bn)
            dense = dense.to(weight.device, weight.dtype)
            norm = self.norm_of(i, k)
            bn = None
            if isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d)):
                bn = type(norm)(len(rows), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                                track_running_stats=norm.track_running_stats).to(weight.device)
                for name in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(norm, name) is not None:
                        getattr(bn, name).copy_(getattr(norm, name)[rows])
            if fold_bn and bn is not None and bn.running_var is not None:
                weight, bias = fold_batchnorm(weight, bias, bn)
                bn = None
            dense.weight.copy_(weight)
            if dense.bias is not None:
                dense.bias.copy_(bias if bias is not None else torch.zeros(len(rows)))
            modules.append(dense)
            if bn is not None:
                modules.append(bn)
            modules.extend(copy.deepcopy(m) for m in post if not isinstance(m, nn.Dropout))
            repeat = self.in_repeat[i + 1]
            cols = (rows.unsqueeze(1) * repeat + torch.arange(repeat, device=rows.device)).reshape(-1)
        weight = self.classifier.weight[:, cols] * self._mask_slice(self.num_hidden, None, cols)
        classifier = nn.Linear(len(cols), weight.shape[0], bias=self.classifier.bias is not None).to(weight.device)
        classifier.weight.copy_(weight)
        if self.classifier.bias is not None:
            classifier.bias.copy_(self.classifier.bias)
        modules.append(classifier)
        return nn.Sequential(*modules).eval()


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a conv/linear followed by ``norm`` (eval statistics) as one layer."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = norm.bias if norm.bias is not None else torch.zeros_like(scale)
    bias = bias if bias is not None else torch.zeros_like(scale)
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), (bias - norm.running_mean) * scale + shift


@torch.no_grad()
def fold_sequential(model: nn.Sequential) -> nn.Sequential:
    """A copy of a flat Sequential with every BatchNorm that follows a Conv2d/Linear folded in."""
    children = list(model.children())
    out: list[nn.Module] = []
    i = 0
    while i < len(children):
        child = children[i]
        nxt = children[i + 1] if i + 1 < len(children) else None
        if (isinstance(child, (nn.Conv2d, nn.Linear)) and isinstance(nxt, (nn.BatchNorm1d, nn.BatchNorm2d))
                and nxt.running_var is not None):  # BN without running statistics cannot be folded
            layer = copy.deepcopy(child)
            weight, bias = fold_batchnorm(child.weight, child.bias, nxt)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros_like(bias))
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
            out.append(layer)
            i += 2
            continue
        if not isinstance(child, nn.Dropout):
            out.append(copy.deepcopy(child))
        i += 1
    return nn.Sequential(*out).eval()
