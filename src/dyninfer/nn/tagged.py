"""Tagged networks: every hidden channel carries the index of the smallest subnet that owns it.

A :class:`TaggedNet` reads a model as a program of stages (:mod:`dyninfer.nn.program`: conv /
linear with optional BatchNorm, post ops, flatten, residual adds, the classifier last) and adds,
per **tag group** (the channels a layer writes; a residual add ties the groups it joins), an
integer ``tag`` per channel (1..N, or N+1 for "dropped"), and a pruning mask per weight. A
connectivity rule says which inputs a channel reads (DESIGN.md, "The one idea that unifies them"):

* ``causal`` (SteppingNet, any-width): a channel with tag t reads only inputs with tag <= t, so
  subnet k never depends on a larger subnet and its activations are final for every subnet above
  it; one pass of the largest subnet gives every subnet's logits.
* ``full`` (slimmable, US-Nets, slicing): subnet k uses every channel with tag <= k and every
  connection among them; stepping up recomputes. With ``switchable_bn=True`` each subnet has its
  own BatchNorm (statistics and affine), chosen by the explicit ``subnet`` argument.

Subnet k is computed by slicing the active rows/columns out of the weights, so work that is not
in the subnet is not done, and BatchNorm statistics are only touched for the active channels.
Both sides of a residual add have the same tags, hence the same active rows, so they add directly.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.fx as fx

from dyninfer.checks import check_input, check_subnet
from dyninfer.nn.program import trace



@dataclass
class HiddenOutputs:
    """What one pass of the largest subnet yields for joint training and importance."""

    logits: list[torch.Tensor]        # logits of subnets 1..N (classifier partial sums)
    preacts: list[torch.Tensor]       # per hidden layer: pre-activation of the active rows
    rows: list[torch.Tensor]          # per hidden layer: channel index of each active row


RULES = ("causal", "full")



def positions(keep: torch.Tensor) -> torch.Tensor | slice:
    """Indices where the 1-D bool ``keep`` holds: a ``slice`` when they form one range (channels
    in tag order, :meth:`TaggedNet.order_by_tag`), so the weights, BatchNorm buffers and features
    a subnet uses are views rather than gathered copies (and their gradients are not scattered
    back); an index tensor otherwise."""
    idx = torch.nonzero(keep).squeeze(1)
    n = idx.numel()
    if n == 0:
        return slice(0, 0)
    first = int(idx[0])
    return slice(first, first + n) if int(idx[-1]) - first == n - 1 else idx


def as_index(rows: torch.Tensor | slice, device: torch.device | None = None) -> torch.Tensor:
    """``rows`` (from :func:`positions`) as an index tensor."""
    if isinstance(rows, slice):
        return torch.arange(rows.start, rows.stop, device=device)
    return rows


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


class TaggedNet(nn.Module):
    """A tagged network over a program of stages (:mod:`dyninfer.nn.program`): plain stacks and
    residual networks alike, converted from any supported ``nn.Module`` with ``torch.fx``.

    Every hidden layer writes into one **tag group**: the channels it produces. A residual add
    ties the groups of the two tensors it adds, so all layers that write into one residual
    stream share one tags buffer (``tags(g)``), and a move, a prefix width or a per-layer width
    is the same on both sides of the add. In a plain stack group i is layer i.

    ``rule="causal"`` (default) is the incremental rule; ``rule="full"`` gives subnet k all
    connections among its neurons. ``switchable_bn`` gives each subnet its own BatchNorm copies
    (initialised from the model's). The model's conv/linear layers are shared, not copied.
    """

    def __init__(self, model: nn.Module, num_subnets: int, input_shape: Sequence[int], *,
                 rule: str = "causal", switchable_bn: bool = False):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if isinstance(num_subnets, bool) or not isinstance(num_subnets, int) or num_subnets < 1:
            raise ValueError(f"num_subnets must be an int >= 1, got {num_subnets!r}")
        self.rule = rule
        self.switchable_bn = bool(switchable_bn)
        self.num_subnets = int(num_subnets)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.dyninfer_config = dict(getattr(model, "dyninfer_config", {}) or {})

        program = trace(model)
        if not program.layers:
            raise ValueError("a tagged network needs at least one hidden Conv2d/Linear before the classifier")
        self.program = program.nodes
        self.layers = nn.ModuleList(program.layers)   # hidden Conv2d / Linear layers
        self.norms = nn.ModuleList(program.norms)     # BatchNorm after each hidden layer (or Identity)
        self.maps = nn.ModuleList(program.maps)       # post ops: ReLU, pooling, flatten, dropout
        self.classifier = program.classifier
        self._link(model)

        if self.switchable_bn:
            for i, norm in enumerate(self.norms):
                if not isinstance(norm, nn.Identity):
                    self.norms[i] = SwitchableBatchNorm(norm, self.num_subnets)
        for g in range(self.num_groups):
            self.register_buffer(f"tags_{g}", torch.ones(self.group_widths[g], dtype=torch.long))
        for i, layer in enumerate(self.layers):
            self.register_buffer(f"alive_{i}", torch.ones_like(layer.weight, dtype=torch.bool))
        self.register_buffer("alive_cls", torch.ones_like(self.classifier.weight, dtype=torch.bool))
        self.exits = nn.ModuleList()      # heads at earlier depths (add_exit); the classifier is the last
        self.exit_nodes: list[int] = []   # the program node each head reads, in program order

    # ----------------------------------------------------------------- structure
    def _link(self, model: nn.Module) -> None:
        """Tag groups (residual adds tie them), input groups, flatten multiplicities and output
        positions of every layer, from the program and one dry run."""
        nodes = self.program
        parent = list(range(len(self.layers)))

        def find(g: int) -> int:
            while parent[g] != g:
                parent[g] = parent[parent[g]]
                g = parent[g]
            return g

        raw = [-1] * len(nodes)          # provisional group of each node's channels (-1: the image)
        for j, node in enumerate(nodes):
            if node.op == "layer":
                raw[j] = node.index
            elif node.op in ("map", "flatten"):
                raw[j] = raw[node.args[0]]
            elif node.op == "add":
                a, b = (raw[k] for k in node.args)
                if a < 0 or b < 0:
                    raise ValueError(f"the residual add at fx node {node.name!r} reads the input image directly; "
                                     f"a tagged add needs both sides computed by layers")
                parent[find(a)] = find(b)
                raw[j] = b
        roots, self.layer_group = {}, []
        for i in range(len(self.layers)):  # number groups by their first writer
            self.layer_group.append(roots.setdefault(find(i), len(roots)))
        self.num_groups = len(roots)
        self.node_group = [-1 if r < 0 else self.layer_group[find(r)] for r in raw]

        # Dry run (eval, zeros): shapes for positions, flatten multiplicity and group widths.
        shapes: list[tuple[int, ...]] = []
        with torch.no_grad():
            was_training = model.training
            model.eval()
            try:
                vals: list[torch.Tensor] = []
                for node in nodes:
                    if node.op == "input":
                        weight = self.layers[0].weight if len(self.layers) else self.classifier.weight
                        out = torch.zeros(1, *self.input_shape, dtype=weight.dtype, device=weight.device)
                    elif node.op == "layer":
                        out = self.norms[node.index](self.layers[node.index](vals[node.args[0]]))
                    elif node.op in ("map", "flatten"):
                        out = self.maps[node.index](vals[node.args[0]])
                    elif node.op == "add":
                        a, b = (vals[k] for k in node.args)
                        if a.shape != b.shape:
                            raise ValueError(f"the residual add at fx node {node.name!r} joins shapes "
                                             f"{tuple(a.shape[1:])} and {tuple(b.shape[1:])}")
                        out = a + b
                    else:  # classifier
                        out = self.classifier(vals[node.args[0]])
                    vals.append(out)
                    shapes.append(tuple(out.shape[1:]))
            except (RuntimeError, ValueError) as error:
                if isinstance(error, ValueError) and "residual add" in str(error):
                    raise
                raise ValueError(f"the model does not run on inputs of shape {self.input_shape}: {error}") from None
            finally:
                model.train(was_training)
        self.node_dims = [len(shape) + 1 for shape in shapes]  # 4: feature maps, 2: flat features
        self.node_repeat = []   # positions per channel of each node's features (after a flatten)
        for j, node in enumerate(nodes):
            if node.op == "flatten":
                src = shapes[node.args[0]]
                self.node_repeat.append(self.node_repeat[node.args[0]] * (src[1] * src[2] if len(src) == 3 else 1))
            elif node.op == "add":
                a, b = (self.node_repeat[k] for k in node.args)
                if a != b:
                    raise ValueError(f"the residual add at fx node {node.name!r} joins features of different "
                                     f"layouts (one side flattened); a tagged add joins like with like")
                self.node_repeat.append(a)
            elif node.op == "map":
                self.node_repeat.append(self.node_repeat[node.args[0]])
            else:
                self.node_repeat.append(1)
        self.layer_node = [0] * len(self.layers)
        for j, node in enumerate(nodes):
            if node.op == "layer":
                self.layer_node[node.index] = j
            if node.op == "classifier":
                self.classifier_node = j
        # per layer (classifier last): the group it reads (-1: the image) and its flatten multiplicity
        reads = [nodes[j].args[0] for j in self.layer_node] + [nodes[self.classifier_node].args[0]]
        self.layer_source = [self.node_group[r] for r in reads]
        self.in_repeat = [self.node_repeat[r] for r in reads]
        self.out_positions = [shapes[j][1] * shapes[j][2] if len(shapes[j]) == 3 else 1 for j in self.layer_node]
        self.group_widths = [0] * self.num_groups
        for i, layer in enumerate(self.layers):
            self.group_widths[self.layer_group[i]] = int(layer.weight.shape[0])
        self.chain = (not any(node.op == "add" for node in nodes)
                      and self.layer_group == list(range(len(self.layers)))
                      and self.layer_source == list(range(-1, len(self.layers))))
        if self.chain:  # the post ops after each layer, for the chain-specialised runtime and export
            posts: list[list[nn.Module]] = [[] for _ in self.layers]
            owner = -1
            for node in nodes:
                if node.op == "layer":
                    owner = node.index
                elif node.op in ("map", "flatten"):
                    if owner < 0:
                        raise ValueError("the model must start with Conv2d or Linear, got "
                                         f"{type(self.maps[node.index]).__name__}")
                    posts[owner].append(self.maps[node.index])
            self.posts = [nn.Sequential(*p) for p in posts]

    @property
    def num_hidden(self) -> int:
        return len(self.layers)

    @property
    def incremental(self) -> bool:
        """Whether subnet k's activations are final for every larger subnet (causal rule, shared
        BatchNorm): then one pass gives every subnet's logits and compaction/sessions apply."""
        return self.rule == "causal" and not self.switchable_bn

    def widths(self) -> list[int]:
        """Channels of every tag group (the largest a subnet can use)."""
        return list(self.group_widths)

    def group_layers(self, group: int) -> list[int]:
        """Hidden layers that write into tag group ``group`` (several when a residual add ties them)."""
        return [i for i, g in enumerate(self.layer_group) if g == group]

    def group_readers(self, group: int) -> list[int]:
        """Layers (classifier = ``num_hidden``) whose input is tag group ``group``."""
        return [i for i, g in enumerate(self.layer_source) if g == group]

    # ----------------------------------------------------------------- tags and masks
    def set_prefix_tags(self, counts: Sequence[Sequence[int]],
                        order: Sequence[torch.Tensor] | None = None) -> None:
        """Nested tags by count: subnet k owns the first ``counts[k-1][g]`` channels of tag group g;
        channels beyond the largest subnet's count get tag N+1 (dropped).

        "First" is channel index order (slimmable-style prefixes) or, with ``order[g]`` (a
        permutation, e.g. channels by importance), that order. Counts must be >= 1,
        non-decreasing in k and at most the group's width.
        """
        widths = self.widths()
        rows = [list(map(int, c)) for c in counts]
        if len(rows) != self.num_subnets or any(len(c) != self.num_groups for c in rows):
            raise ValueError(f"counts must be {self.num_subnets} lists (one per subnet) of {self.num_groups} "
                             f"channel counts (one per tag group); got {counts!r}")
        if order is not None and (len(order) != self.num_groups or any(
                sorted(map(int, o)) != list(range(w)) for o, w in zip(order, widths))):
            raise ValueError("order must hold one permutation of each tag group's channels")
        for g, width in enumerate(widths):
            column = [c[g] for c in rows]
            if column[0] < 1 or column[-1] > width or any(a > b for a, b in zip(column, column[1:])):
                raise ValueError(f"tag group {g} (width {width}): counts per subnet must be non-decreasing "
                                 f"within 1..{width}; got {column}")
            tags = self.tags(g)
            rank = torch.arange(width, device=tags.device)
            bounds = torch.tensor(column, device=tags.device)
            by_rank = 1 + (rank.unsqueeze(1) >= bounds.unsqueeze(0)).sum(1)
            if order is None:
                tags.copy_(by_rank)
            else:
                tags[torch.as_tensor(order[g], device=tags.device).long()] = by_rank
            for i in self.group_layers(g):
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

    def tags(self, group: int) -> torch.Tensor:
        """Tag of every channel of tag group ``group`` (in a plain stack: of hidden layer ``group``)."""
        return getattr(self, f"tags_{group}")

    def layer_tags(self, layer: int) -> torch.Tensor:
        """Tag of every output channel of hidden ``layer`` (its group's tags)."""
        return self.tags(self.layer_group[layer])

    def set_tags(self, group: int, channels: torch.Tensor, tag: int) -> None:
        """Move ``channels`` of tag group ``group`` to subnet ``tag`` and revive their pruned weights
        in every layer that writes them."""
        if not 1 <= tag <= self.num_subnets + 1:
            raise ValueError(f"tag must be in 1..{self.num_subnets + 1}, got {tag}")
        self.tags(group)[channels] = tag
        for i in self.group_layers(group):
            self.alive(i)[channels] = True

    @torch.no_grad()
    def order_by_tag(self) -> list[torch.Tensor]:
        """Permute every tag group's channels so that their tags ascend (dropped channels last, ties
        in their order): what each channel computes, its tag and pruning mask, and every subnet's
        outputs and MACs stay the same. Subnet k's channels are then a range of every layer, which
        :func:`positions` turns into views: a training step slices instead of gathering and
        scattering (SteppingNet's retraining, whose tags no longer change, orders its net first).

        Parameters change in place: build an optimizer after this, not before (its state would be
        in the old order). Returns each group's permutation (new position -> old channel).
        """
        perms = []
        for g in range(self.num_groups):
            tags = self.tags(g)
            perm = torch.sort(tags, stable=True).indices
            perms.append(perm)
            if torch.equal(perm, torch.arange(len(perm), device=perm.device)):
                continue
            tags.copy_(tags[perm])
            for i in self.group_layers(g):
                norm = self.norms[i]
                bns = list(norm.choices) if isinstance(norm, SwitchableBatchNorm) else [norm]
                rows_of = [self.layers[i].weight, self.layers[i].bias, self.alive(i)]
                for bn in bns:
                    rows_of += [getattr(bn, name, None) for name in ("weight", "bias", "running_mean", "running_var")]
                for t in rows_of:
                    if t is not None:
                        t.copy_(t[perm])
            for r in self.group_readers(g):
                repeat = self.in_repeat[r]
                cols = (perm.unsqueeze(1) * repeat + torch.arange(repeat, device=perm.device)).reshape(-1)
                for t in (self._weight(r), self.alive(r)):
                    t.copy_(t[:, cols])
            for head, node in zip(self.exits, self.exit_nodes):
                if self.node_group[node] == g:
                    head.weight.copy_(head.weight[:, perm])
        return perms

    def alive(self, layer: int) -> torch.Tensor:
        return self.alive_cls if layer == self.num_hidden else getattr(self, f"alive_{layer}")

    def _weight(self, layer: int) -> torch.Tensor:
        return self.classifier.weight if layer == self.num_hidden else self.layers[layer].weight

    def input_tags(self, layer: int) -> torch.Tensor:
        """Tag of each input feature of ``layer`` (the image belongs to every subnet: tag 1)."""
        source = self.layer_source[layer]
        if source < 0:
            return torch.ones(self.input_shape[0] * self.in_repeat[layer], dtype=torch.long, device=self.alive_cls.device)
        return self.tags(source).repeat_interleave(self.in_repeat[layer])

    def connectivity(self, layer: int) -> torch.Tensor:
        """(out, in) bool: the causal rule, output with tag t reads inputs with tag <= t.

        Under the full rule every connection is allowed; which ones a subnet uses follows from
        the subnet alone (rows and columns with tag <= k).
        """
        in_tags = self.input_tags(layer)
        if layer == self.num_hidden or self.rule == "full":  # classifier outputs belong to every subnet
            return torch.ones(self._weight(layer).shape[:2], dtype=torch.bool, device=in_tags.device)
        return in_tags.unsqueeze(0) <= self.layer_tags(layer).unsqueeze(1)

    def _conn_slice(self, layer: int, rows: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor:
        """``connectivity(layer)[rows][:, cols]``, shaped to broadcast over the weight's kernel."""
        in_tags = self.input_tags(layer)[cols]
        out_tags = self.layer_tags(layer) if rows is None else self.layer_tags(layer)[rows]
        conn = in_tags.unsqueeze(0) <= out_tags.unsqueeze(1)
        return conn.view(*conn.shape, *([1] * (self._weight(layer).dim() - 2)))

    def _mask_slice(self, layer: int, rows: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor:
        """``weight_mask(layer)[rows][:, cols]`` without building the whole mask."""
        alive = self.alive(layer)
        alive = alive[:, cols] if rows is None else alive[rows][:, cols]
        if layer == self.num_hidden or self.rule == "full":
            return alive
        return alive & self._conn_slice(layer, rows, cols)

    def weight_mask(self, layer: int) -> torch.Tensor:
        """Causal rule and pruning together, shaped like the layer's weight."""
        weight = self._weight(layer)
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
            alive = self._weight(i).detach().abs() >= threshold
            self.alive(i).copy_(alive)
            pruned += int((~alive).sum())
        return pruned

    @torch.no_grad()
    def _uses(self) -> list[torch.Tensor]:
        """Per reader layer (classifier last): (out, in-feature) bool of its live, allowed weights."""
        uses = []
        for i in range(self.num_hidden + 1):
            mask = self.weight_mask(i)
            uses.append(mask.flatten(2).any(2) if mask.dim() > 2 else mask)
        return uses

    def reachable(self) -> list[torch.Tensor]:
        """Per tag group, which channels can influence the logits of a subnet that contains them.

        A channel with tag t reaches the logits if a live weight the rule allows carries it into
        the classifier, or into a reachable channel (tag t..N) of a layer that reads it. One that
        does not (e.g. just moved to tag t while its readers all have tags < t) has dL/dr = 0 in
        every subnet by construction: it is unmeasured, not unimportant. Computed as a fixpoint,
        since a residual stream's readers may feed the stream again.
        """
        n = self.num_subnets
        uses = self._uses()
        reach = [torch.zeros(w, dtype=torch.bool, device=self.tags(g).device)
                 for g, w in enumerate(self.group_widths)]
        changed = True
        while changed:
            changed = False
            for g in range(self.num_groups):
                found = reach[g].clone()
                for i in self.group_readers(g):
                    use = uses[i]
                    if i < self.num_hidden:
                        use = use[reach[self.layer_group[i]] & (self.layer_tags(i) <= n)]
                    found |= use.any(0).view(-1, self.in_repeat[i]).any(1)
                found &= self.tags(g) <= n
                if not torch.equal(found, reach[g]):
                    reach[g], changed = found, True
        return reach

    def serving(self) -> list[torch.Tensor]:
        """Per tag group, the smallest subnet whose logits each channel can influence (N + 1: none).

        The classifier reads a feature of tag t in subnet t and every larger one; a channel read by
        live, allowed weights serves the smallest subnet any of its readers serves (a reader's
        tag is >= the channel's under the causal rule). A channel of tag t that serves only
        subnets > t costs subnet t MACs without changing its logits. Computed as a fixpoint, like
        :meth:`reachable`.
        """
        n = self.num_subnets
        none = n + 1
        uses = self._uses()
        level = [torch.full((w,), none, dtype=torch.long, device=self.tags(g).device)
                 for g, w in enumerate(self.group_widths)]
        changed = True
        while changed:
            changed = False
            for g in range(self.num_groups):
                found = level[g].clone()
                tags = self.tags(g)
                for i in self.group_readers(g):
                    use = uses[i]
                    if i == self.num_hidden:  # the classifier: feature of tag t counts from subnet t on
                        reader = torch.zeros(use.shape[0], dtype=torch.long, device=found.device)
                    else:
                        reader = torch.where(self.layer_tags(i) <= n, level[self.layer_group[i]],
                                             torch.full_like(level[self.layer_group[i]], none))
                    per_feature = torch.where(use, reader.unsqueeze(1), torch.full_like(use, none, dtype=torch.long))
                    best = per_feature.min(0).values.view(-1, self.in_repeat[i]).min(1).values
                    found = torch.minimum(found, torch.maximum(best, tags))
                found = torch.where(tags <= n, found, torch.full_like(found, none))
                if not torch.equal(found, level[g]):
                    level[g], changed = found, True
        return level

    def counts(self) -> list[list[int]]:
        """Per tag group, the number of channels with each tag 1..N+1."""
        return [torch.bincount(self.tags(g), minlength=self.num_subnets + 2)[1:].tolist()
                for g in range(self.num_groups)]

    # ----------------------------------------------------------------- cost
    def subnet_macs(self, input_shape: Sequence[int] | None = None, subnet: int | None = None,
                    depth: int | None = None) -> int:
        """Exact MACs of subnet k (at ``depth``, default the classifier): live (causal, unpruned)
        weights of its rows x output positions, in the layers that depth needs, plus its head.

        Follows the :func:`dyninfer.cost.macs` protocol; pruned weights cost nothing.
        """
        if input_shape is not None and tuple(input_shape) != self.input_shape:
            raise ValueError(f"this network was built for input shape {self.input_shape}, got {tuple(input_shape)}")
        k = self._check_subnet(self.num_subnets if subnet is None else subnet)
        d = self._check_depth(depth)
        if d < self.num_depths:
            needed = self._ancestors(self.exit_nodes[d - 1])
            head = int((self._exit_tags(d) <= k).sum()) * self.exits[d - 1].weight.shape[0]
            return head + sum(self._layer_macs(i, k) for i in range(self.num_hidden) if self.layer_node[i] in needed)
        return sum(self._layer_macs(i, k) for i in range(self.num_hidden + 1))

    def _layer_macs(self, i: int, k: int) -> int:
        """MACs of hidden layer ``i`` (classifier: ``num_hidden``) in subnet ``k``."""
        cols = torch.nonzero(self.input_tags(i) <= k).squeeze(1)
        if i == self.num_hidden:
            return int(self._mask_slice(i, None, cols).sum())
        if self.rule == "causal":  # columns with tag > k are masked already in rows <= k
            return int(self.weight_mask(i)[self.layer_tags(i) <= k].sum()) * self.out_positions[i]
        rows = torch.nonzero(self.layer_tags(i) <= k).squeeze(1)
        return int(self._mask_slice(i, rows, cols).sum()) * self.out_positions[i]

    def layer_macs_per_subnet(self, i: int) -> list[int]:
        """``_layer_macs(i, k)`` for every subnet k at once (one mask, summed per tag)."""
        n = self.num_subnets
        if i < self.num_hidden and self.rule != "causal":
            return [self._layer_macs(i, k) for k in range(1, n + 1)]
        if i == self.num_hidden:  # classifier: live weights of the columns with tag <= k
            per, tags, positions = self.alive(i).sum(0), self.input_tags(i), 1
        else:  # causal: columns with tag > k are masked already in rows <= k
            per, tags, positions = self.weight_mask(i).flatten(1).sum(1), self.layer_tags(i), self.out_positions[i]
        by_tag = torch.bincount(tags, weights=per.to(torch.float64), minlength=n + 2)[1:n + 1]
        return [int(v) * positions for v in by_tag.cumsum(0).round().long().tolist()]

    def macs_per_subnet(self) -> list[int]:
        """``subnet_macs(subnet=k)`` for k = 1..N (at the classifier)."""
        rows = [self.layer_macs_per_subnet(i) for i in range(self.num_hidden + 1)]
        return [sum(r[k] for r in rows) for k in range(self.num_subnets)]

    # ----------------------------------------------------------------- forward
    def _check_subnet(self, subnet) -> int:
        return check_subnet(subnet, self.num_subnets)

    def _check_input(self, x: torch.Tensor) -> None:
        check_input(x, self.input_shape)

    def _effective_weight(self, layer: int, straight_through: bool, rows: torch.Tensor | None,
                          cols: torch.Tensor) -> torch.Tensor:
        """The weight block of ``rows`` (None: all) x ``cols`` with the rule and pruning applied.

        The block is sliced first and masked after: nothing outside it reaches the subnet's
        output or receives a gradient, so masking the whole (width-expanded) weight would only
        cost time.
        """
        weight = self._weight(layer)
        weight = weight[:, cols] if rows is None else weight[rows][:, cols]
        mask = self._mask_slice(layer, rows, cols)
        if not (straight_through and self.training):
            return weight * mask
        if self.rule == "full" or layer == self.num_hidden:  # every connection of the block is allowed
            return weight - (weight * ~mask).detach()
        # value: masked weight; gradient: reaches every causally allowed weight, so pruned
        # weights keep learning until they are revived.
        conn = self._conn_slice(layer, rows, cols)
        return weight * conn - (weight * (conn & ~mask)).detach()

    def _hidden(self, x: torch.Tensor, subnet: int, straight_through: bool, keep: bool, stop: int | None = None,
                taps: dict | None = None):
        """Run the program for ``subnet`` up to the classifier (or only what node ``stop`` needs);
        returns the features there, their columns, and (``keep``) every hidden layer's
        pre-activation and active rows. ``taps`` (node -> None) is filled with (value, columns)."""
        vals: list[torch.Tensor | None] = []
        active: list[torch.Tensor] = []  # per node: indices of its group's features present
        preacts: list[torch.Tensor] = [None] * self.num_hidden  # type: ignore[list-item]
        row_list: list[torch.Tensor] = [None] * self.num_hidden  # type: ignore[list-item]
        needed = self._ancestors(stop) if stop is not None else None
        for j, node in enumerate(self.program):
            src = node.args[0] if node.args else None
            if needed is not None and j not in needed:
                vals.append(None)
                active.append(None)  # type: ignore[arg-type]
                continue
            if node.op == "input":
                out, cols = x, slice(0, x.shape[1])
            elif node.op == "layer":
                i = node.index
                layer = self.layers[i]
                rows = positions(self.layer_tags(i) <= subnet)
                weight = self._effective_weight(i, straight_through, rows, active[src])
                bias = layer.bias[rows] if layer.bias is not None else None
                if isinstance(layer, nn.Conv2d):
                    out = F.conv2d(vals[src], weight, bias, layer.stride, layer.padding, layer.dilation)
                else:
                    out = F.linear(vals[src], weight, bias)
                out = self._norm(self.norm_of(i, subnet), out, rows)
                if keep:
                    preacts[i], row_list[i] = out, as_index(rows, out.device)
                cols = rows
            elif node.op == "map":
                out, cols = self.maps[node.index](vals[src]), active[src]
            elif node.op == "flatten":
                out = vals[src].flatten(1)
                repeat = self.node_repeat[j] // self.node_repeat[src]
                base = active[src]
                if isinstance(base, slice):
                    cols = slice(base.start * repeat, base.stop * repeat)
                else:
                    cols = (base.unsqueeze(1) * repeat + torch.arange(repeat, device=base.device)).reshape(-1)
            elif node.op == "add":
                out, cols = vals[node.args[0]] + vals[node.args[1]], active[node.args[0]]
            else:  # classifier
                return vals[src], active[src], preacts, row_list
            vals.append(out)
            active.append(cols)
            if taps is not None and j in taps:
                taps[j] = (out, cols)
            if j == stop:
                return out, cols, preacts, row_list
        raise AssertionError("a program ends with its classifier")

    def _ancestors(self, node: int) -> frozenset[int]:
        """Program nodes that node ``node`` depends on, itself included (the program never changes
        after construction, so each node's set is computed once)."""
        cache = self.__dict__.setdefault("_ancestor_sets", {})
        if node not in cache:
            cache[node] = frozenset(self._walk_back(node))
        return cache[node]

    def _walk_back(self, node: int) -> set[int]:
        seen, todo = set(), [node]
        while todo:
            j = todo.pop()
            if j not in seen:
                seen.add(j)
                todo.extend(self.program[j].args)
        return seen

    # ----------------------------------------------------------------- depth exits
    @property
    def num_depths(self) -> int:
        """Depth locations: every exit, then the classifier."""
        return len(self.exits) + 1

    def exit_candidates(self) -> list[int]:
        """Nodes an exit can read: outputs of residual adds and of post ops after a layer (4-D features)."""
        return [j for j, node in enumerate(self.program) if node.op in ("add", "map") and j != self.classifier_node]

    def add_exit(self, after: int, num_classes: int | None = None) -> int:
        """A classifier head on program node ``after``: global average pooling, then a Linear over
        its channels whose outputs belong to every subnet (partial sums by tag, like the
        classifier). Returns its depth (1-based, in program order)."""
        if not isinstance(after, int) or not 0 < after < self.classifier_node or after in self.exit_nodes:
            raise ValueError(f"an exit reads a program node in 1..{self.classifier_node - 1} that has none yet, "
                             f"got {after!r}")
        if self.node_group[after] < 0 or self.node_repeat[after] != 1 or self.node_dims[after] != 4:
            raise ValueError(f"program node {after} ({self.program[after].op} {self.program[after].name!r}) is not "
                             f"a tagged feature map an exit can pool")
        width = self.group_widths[self.node_group[after]]
        head = nn.Linear(width, num_classes or self.classifier.weight.shape[0]).to(self.classifier.weight.device)
        order = sorted(self.exit_nodes + [after])
        position = order.index(after)
        self.exit_nodes.insert(position, after)
        self.exits.insert(position, head)
        return position + 1

    def _check_depth(self, depth) -> int:
        d = self.num_depths if depth is None else depth
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= self.num_depths:
            raise ValueError(f"depth must be an int in 1..{self.num_depths}, got {depth!r}")
        return d

    @staticmethod
    def _pool(value: torch.Tensor) -> torch.Tensor:
        return value.mean(dim=(2, 3)) if value.dim() == 4 else value

    def _exit_tags(self, d: int) -> torch.Tensor:
        return self.tags(self.node_group[self.exit_nodes[d - 1]])

    def forward_grid(self, x: torch.Tensor, *, straight_through: bool = False) -> list[list[torch.Tensor]]:
        """``logits[d-1][k-1]`` of every (depth d, subnet k) from one pass of the largest subnet: each
        exit's head (and the classifier) as partial sums over the features with tag <= k."""
        if not self.incremental:
            raise ValueError("forward_grid needs the causal rule with shared BatchNorm")
        self._check_input(x)
        n = self.num_subnets
        taps: dict = {j: None for j in self.exit_nodes}
        features, cols, _, _ = self._hidden(x, n, straight_through, keep=False, taps=taps)
        grid = []
        for d, j in enumerate(self.exit_nodes, start=1):
            value, rows = taps[j]
            grid.append(self._partial_sums(self._pool(value), self._exit_tags(d)[rows], self.exits[d - 1].weight[:, rows],
                                           self.exits[d - 1].bias))
        weight = self._effective_weight(self.num_hidden, straight_through, None, cols)
        grid.append(self._partial_sums(features, self.input_tags(self.num_hidden)[cols], weight, self.classifier.bias))
        return grid

    def _partial_sums(self, features: torch.Tensor, tags: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> list[torch.Tensor]:
        logits, running = [], bias
        for k in range(1, self.num_subnets + 1):
            sel = positions(tags == k)
            part = F.linear(features[:, sel], weight[:, sel])
            running = part + running if running is not None else part
            logits.append(running)
        return logits

    @staticmethod
    def _norm(norm: nn.Module, z: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        """BatchNorm restricted to ``rows``; running statistics updated only for those rows, with
        the norm's own momentum (``None``: cumulative average) and batch counter."""
        if isinstance(norm, nn.Identity):
            return z
        tracking = norm.training and norm.running_mean is not None
        momentum = 0.0
        if tracking:
            norm.num_batches_tracked.add_(1)
            momentum = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
        use_batch = norm.training or norm.running_mean is None
        mean = norm.running_mean[rows] if norm.running_mean is not None else None
        var = norm.running_var[rows] if norm.running_var is not None else None
        weight = norm.weight[rows] if norm.weight is not None else None
        bias = norm.bias[rows] if norm.bias is not None else None
        out = F.batch_norm(z, mean, var, weight, bias, use_batch, momentum, norm.eps)
        if tracking and not isinstance(rows, slice):  # a slice's buffers are views, updated in place
            with torch.no_grad():
                norm.running_mean[rows] = mean
                norm.running_var[rows] = var
        return out

    def forward(self, x: torch.Tensor, subnet: int | None = None, *, depth: int | None = None,
                straight_through: bool = False) -> torch.Tensor:
        """Logits of subnet ``subnet`` (1-based; default the largest) at ``depth`` (default: the
        classifier), computed from scratch; an earlier depth runs only the stages its exit needs."""
        k = self._check_subnet(self.num_subnets if subnet is None else subnet)
        d = self._check_depth(depth)
        self._check_input(x)
        if d < self.num_depths:
            value, rows, _, _ = self._hidden(x, k, straight_through, keep=False, stop=self.exit_nodes[d - 1])
            head = self.exits[d - 1]
            return F.linear(self._pool(value), head.weight[:, rows], head.bias)
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
        logits = self._partial_sums(features, self.input_tags(self.num_hidden)[cols], weight, self.classifier.bias)
        return HiddenOutputs(logits, preacts if keep_preacts else [], rows if keep_preacts else [])

    # ----------------------------------------------------------------- gradient shaping
    def param_tags(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """(parameter, tag per slice, dim) for every parameter: which subnet owns each slice.

        Hidden weights, biases and BN affine parameters belong to their output channel's tag; the
        classifier's weight columns to their input feature's tag, its bias to subnet 1.
        """
        owned = []
        for i, (layer, norm) in enumerate(zip(self.layers, self.norms)):
            tags = self.layer_tags(i)
            for p in (layer.weight, layer.bias, getattr(norm, "weight", None), getattr(norm, "bias", None)):
                if p is not None:
                    owned.append((p, tags, 0))
            if isinstance(norm, SwitchableBatchNorm):  # copy k serves subnet k only (N+1: unused rows)
                for k, copy_k in enumerate(norm.choices, start=1):
                    own = torch.where(tags <= k, torch.full_like(tags, k), torch.full_like(tags, self.num_subnets + 1))
                    for p in (copy_k.weight, copy_k.bias):
                        if p is not None:
                            owned.append((p, own, 0))
        for d, head in enumerate(self.exits, start=1):
            owned.append((head.weight, self._exit_tags(d), 1))
            if head.bias is not None:
                owned.append((head.bias, torch.ones(1, dtype=torch.long, device=head.bias.device), 0))
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
    def _dense_layer(self, i: int, k: int, cols: torch.Tensor, fold_bn: bool) -> tuple[list[nn.Module], torch.Tensor]:
        """Hidden layer ``i`` of subnet k as plain modules ([conv/linear] or [.., BatchNorm]) and its rows."""
        layer = self.layers[i]
        rows = torch.nonzero(self.layer_tags(i) <= k).squeeze(1)
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
        dense.weight.requires_grad_(layer.weight.requires_grad)  # a frozen layer (a zero pad) stays frozen
        if dense.bias is not None:
            dense.bias.copy_(bias if bias is not None else torch.zeros(len(rows)))
        return ([dense] if bn is None else [dense, bn]), rows

    @torch.no_grad()
    def _dense_classifier(self, cols: torch.Tensor) -> nn.Linear:
        weight = self.classifier.weight[:, cols] * self._mask_slice(self.num_hidden, None, cols)
        classifier = nn.Linear(len(cols), weight.shape[0], bias=self.classifier.bias is not None).to(weight.device)
        classifier.weight.copy_(weight)
        if self.classifier.bias is not None:
            classifier.bias.copy_(self.classifier.bias)
        return classifier

    @torch.no_grad()
    def dense(self, subnet: int | None = None, *, depth: int | None = None, fold_bn: bool = True) -> nn.Module:
        """Subnet k as a plain torch module of its exact shapes (any rule; eval statistics).

        The once-for-all ``get_active_subnet(preserve_weight=True)`` step: sliced, masked
        weights are copied into static layers, the subnet's BatchNorm folded in when
        ``fold_bn``. Under the causal rule masked (upper-block) weights stay as zeros. A plain
        stack gives an ``nn.Sequential``; a residual network an ``fx.GraphModule`` (plain torch:
        scriptable and exportable, no dyninfer needed to run it).
        """
        k = self._check_subnet(self.num_subnets if subnet is None else subnet)
        d = self._check_depth(depth)
        if d < self.num_depths:
            return self._dense_graph(k, fold_bn, exit_depth=d)
        if self.chain:
            modules: list[nn.Module] = []
            cols = torch.arange(self.input_shape[0], device=self.alive_cls.device)
            for i, post in enumerate(self.posts):
                layer_modules, rows = self._dense_layer(i, k, cols, fold_bn)
                modules.extend(layer_modules)
                modules.extend(copy.deepcopy(m) for m in post if not isinstance(m, nn.Dropout))
                repeat = self.in_repeat[i + 1]
                cols = (rows.unsqueeze(1) * repeat + torch.arange(repeat, device=rows.device)).reshape(-1)
            modules.append(self._dense_classifier(cols))
            return nn.Sequential(*modules).eval()
        return self._dense_graph(k, fold_bn)

    def _dense_graph(self, k: int, fold_bn: bool, exit_depth: int | None = None) -> fx.GraphModule:
        root, graph = nn.Module(), fx.Graph()
        env: list = []
        active: list[torch.Tensor] = []
        stop = self.exit_nodes[exit_depth - 1] if exit_depth is not None else None
        needed = self._ancestors(stop) if stop is not None else None
        for j, node in enumerate(self.program):
            src = node.args[0] if node.args else None
            if needed is not None and j not in needed:
                env.append(None)
                active.append(None)  # type: ignore[arg-type]
                continue
            if node.op == "input":
                env.append(graph.placeholder("x"))
                active.append(torch.arange(self.input_shape[0], device=self.alive_cls.device))
                continue
            if node.op == "layer":
                modules, cols = self._dense_layer(node.index, k, active[src], fold_bn)
                value = env[src]
                for m, suffix in zip(modules, ("", "_bn")):
                    name = f"layer{node.index}{suffix}"
                    root.add_module(name, m)
                    value = graph.call_module(name, (value,))
            elif node.op == "map":
                module = self.maps[node.index]
                cols = active[src]
                if isinstance(module, (nn.Dropout, nn.Identity)):
                    value = env[src]
                else:
                    name = f"op{node.index}"
                    root.add_module(name, copy.deepcopy(module))
                    value = graph.call_module(name, (env[src],))
            elif node.op == "flatten":
                value = graph.call_function(torch.flatten, (env[src], 1))
                repeat = self.node_repeat[j] // self.node_repeat[src]
                cols = (active[src].unsqueeze(1) * repeat + torch.arange(repeat, device=active[src].device)).reshape(-1)
            elif node.op == "add":
                value = graph.call_function(operator.add, (env[node.args[0]], env[node.args[1]]))
                cols = active[node.args[0]]
            else:  # classifier
                root.add_module("classifier", self._dense_classifier(active[src]))
                graph.output(graph.call_module("classifier", (env[src],)))
                break
            env.append(value)
            active.append(cols)
            if j == stop:  # an exit: pool, then its head over the subnet's channels
                head = self.exits[exit_depth - 1]
                exit_head = nn.Linear(len(cols), head.weight.shape[0]).to(head.weight.device)
                exit_head.weight.copy_(head.weight[:, cols])
                exit_head.bias.copy_(head.bias)
                root.add_module("pool", nn.AdaptiveAvgPool2d(1))
                root.add_module("classifier", exit_head)
                pooled = graph.call_function(torch.flatten, (graph.call_module("pool", (value,)), 1))
                graph.output(graph.call_module("classifier", (pooled,)))
                break
        return fx.GraphModule(root, graph).eval()


class TaggedSequential(TaggedNet):
    """The tagged core over a flat ``nn.Sequential`` (kept name; any supported model works with
    :class:`TaggedNet`)."""

    def __init__(self, model: nn.Sequential, num_subnets: int, input_shape: Sequence[int], **options):
        if not isinstance(model, nn.Sequential):
            raise TypeError(f"TaggedSequential needs a flat nn.Sequential; got {type(model).__name__} "
                            f"(use TaggedNet for residual networks and other models)")
        super().__init__(model, num_subnets, input_shape, **options)


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


@torch.no_grad()
def fold_module(model: nn.Module, input_shape: Sequence[int] | None = None) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm after a Conv2d/Linear folded in (the one
    BN fold, through the tagged core): a flat Sequential stays one; a residual network becomes an
    ``fx.GraphModule``. A model the core cannot read is copied unfolded."""
    if isinstance(model, nn.Sequential):
        return fold_sequential(model)
    shape = input_shape or (getattr(model, "dyninfer_config", None) or {}).get("input_shape")
    if shape is None:
        return copy.deepcopy(model).eval()
    try:
        return TaggedNet(copy.deepcopy(model), 1, tuple(shape)).dense(1, fold_bn=True)
    except (ValueError, TypeError):
        return copy.deepcopy(model).eval()
