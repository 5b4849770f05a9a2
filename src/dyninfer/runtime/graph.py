"""Compaction of a causal tagged network that is not a plain stack (residual blocks).

The same idea as :class:`~dyninfer.runtime.compaction.CompactNet`, over the program of stages:
every tag group's channels are sorted by tag, every layer's weights permuted to match (rows by
its group, columns by the group it reads), BatchNorm folded, and for every step s the dense block
computing the new rows of tag s from all inputs with tag <= s stored once.

A step runs the program once over *new channels only*: a layer applies its step block to the
cached prefix of its input (old channels plus the ones this step just made); post ops, flattens
and residual adds are per channel, so they see only the new channels; the classifier adds the new
features' partial sum to the kept logits. Nothing computed earlier is recomputed, the shortcut's
cached activations included.
"""

from __future__ import annotations

import copy
import hashlib
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from dyninfer.checks import check_input, check_subnet
from dyninfer.runtime.session import Session
from dyninfer.nn.tagged import TaggedNet, fold_batchnorm


class CompactGraph(nn.Module):
    """Inference form of a causal residual tagged network: ``forward(x, subnet)`` from scratch
    (dense prefix blocks) and ``start(x)`` for incremental sessions."""

    def __init__(self, net: TaggedNet, *, channels_last: bool | None = None):
        super().__init__()
        if not net.incremental:
            raise ValueError(f"compaction into step blocks needs the causal rule with shared BatchNorm; this network "
                             f"has rule={net.rule!r}, switchable_bn={net.switchable_bn} (export its subnets with "
                             f"net.dense(k))")
        self._source = [net]  # a list, so the tagged net is not registered as a submodule
        self.num_subnets = n = net.num_subnets
        self.input_shape = tuple(net.input_shape)
        self.program = list(net.program)
        self.node_repeat = list(net.node_repeat)
        self._macs = net.macs_per_subnet()
        has_conv = any(isinstance(layer, nn.Conv2d) for layer in net.layers)
        self.channels_last = has_conv if channels_last is None else bool(channels_last and has_conv)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format

        orders, bounds = [], []  # per tag group: channel order (by tag) and rows with tag <= s
        for g in range(net.num_groups):
            tags = net.tags(g)
            if not bool((tags == 1).any()):
                raise ValueError(f"subnet 1 must keep at least one channel of every tag group; group {g} "
                                 f"(layers {net.group_layers(g)}) has none")
            orders.append(torch.cat([torch.nonzero(tags == s).squeeze(1) for s in range(1, n + 1)]))
            bounds.append([int((tags <= s).sum()) for s in range(n + 1)])
        self.group_bounds = bounds

        def features(layer: int) -> tuple[torch.Tensor, list[int]]:  # input order and bounds per step of a layer
            source, repeat = net.layer_source[layer], net.in_repeat[layer]
            if source < 0:
                c = net.input_shape[0] * repeat
                return torch.arange(c), [0] + [c] * n
            order = (orders[source].unsqueeze(1) * repeat + torch.arange(repeat)).reshape(-1)
            return order, [b * repeat for b in bounds[source]]

        self.layer_kind, self.conv_args = [], []
        self.step_w, self.step_b, self.prefix_w, self.prefix_b = [], [], [], []
        density_num = density_den = 0
        with torch.no_grad():
            for i, layer in enumerate(net.layers):
                g = net.layer_group[i]
                weight = layer.weight * net.weight_mask(i)
                bias = layer.bias if layer.bias is not None else torch.zeros(weight.shape[0])
                norm = net.norms[i]
                if isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    if norm.running_var is None:
                        raise ValueError(f"layer {i}'s BatchNorm keeps no running statistics, so it cannot be "
                                         f"folded into the inference form (export it with net.dense(k))")
                    weight, bias = fold_batchnorm(weight, bias, norm)
                in_order, in_bounds = features(i)
                weight = weight[orders[g]][:, in_order]
                bias = bias[orders[g]]
                rb = bounds[g]
                conv = isinstance(layer, nn.Conv2d)
                self.layer_kind.append("conv" if conv else "linear")
                if conv:
                    padding = layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)
                    self.conv_args.append((tuple(layer.stride), padding, tuple(layer.dilation)))
                else:
                    self.conv_args.append(())

                def prep(w: torch.Tensor) -> torch.Tensor:
                    return torch.empty_like(w, memory_format=fmt).copy_(w) if w.dim() == 4 else w.contiguous()

                self.step_w.append([prep(weight[rb[s - 1]:rb[s], :in_bounds[s]]) for s in range(1, n + 1)])
                self.step_b.append([bias[rb[s - 1]:rb[s]].contiguous() for s in range(1, n + 1)])
                self.prefix_w.append([prep(weight[:rb[s], :in_bounds[s]]) for s in range(1, n + 1)])
                self.prefix_b.append([bias[:rb[s]].contiguous() for s in range(1, n + 1)])
                for block in self.step_w[-1]:
                    density_num += int((block != 0).sum())
                    density_den += block.numel()
            in_order, in_bounds = features(net.num_hidden)
            cls = (net.classifier.weight * net.weight_mask(net.num_hidden))[:, in_order]
            self.cls_steps_t = [cls[:, in_bounds[s - 1]:in_bounds[s]].t().contiguous() for s in range(1, n + 1)]
            self.cls_prefix = [cls[:, :in_bounds[s]].contiguous() for s in range(1, n + 1)]
            self.cls_bias = net.classifier.bias.detach().clone() if net.classifier.bias is not None else None
        self.maps = [m for m in net.maps]
        # depth exits: the node each reads and its head's columns in the node's group order, per step
        self.node_group = list(net.node_group)
        self.exit_nodes = list(net.exit_nodes)
        self.exit_steps_t, self.exit_bias = [], []
        with torch.no_grad():
            for d, j in enumerate(net.exit_nodes):
                g = net.node_group[j]
                head = net.exits[d]
                w = head.weight[:, orders[g]]
                b = bounds[g]
                self.exit_steps_t.append([w[:, b[s - 1]:b[s]].t().contiguous() for s in range(1, n + 1)])
                self.exit_bias.append(head.bias.detach().clone())
        self._density = density_num / max(density_den, 1)
        # nodes whose outputs a later layer reads in full: the only ones a session caches
        self._cached = sorted({node.args[0] for node in self.program if node.op == "layer"})
        # per node, the inputs whose last reader it is: a from-scratch pass frees them right there
        last_use: dict[int, int] = {}
        for j, node in enumerate(self.program):
            for a in node.args:
                last_use[a] = j
        self._frees = [[a for a in set(node.args) if last_use[a] == j] for j, node in enumerate(self.program)]
        self.eval()

    # ------------------------------------------------------------------ the common runtime face
    def with_options(self, *, channels_last: bool | None = None, cache: str | None = None) -> "CompactGraph":
        """The same net compacted for another memory format (``cache`` is the chain runtime's option;
        a residual session always concatenates new channels onto its cache)."""
        return CompactGraph(self._source[0], channels_last=self.channels_last if channels_last is None
                            else channels_last)

    def channels_per_step(self) -> list[list[int]]:
        """New channels of every tag group at each step."""
        return [[b - a for a, b in zip(bounds, bounds[1:])] for bounds in self.group_bounds]

    @torch.no_grad()
    def dense(self, subnet: int) -> fx.GraphModule:
        """Subnet k as a plain torch module (NCHW): the prefix blocks in Conv2d/Linear layers with
        BatchNorm folded, wired like the program; no dyninfer needed to run it."""
        k = self._check_subnet(subnet)
        root, graph, env = nn.Module(), fx.Graph(), []
        for node in self.program:
            if node.op == "input":
                env.append(graph.placeholder("x"))
            elif node.op == "layer":
                i = node.index
                weight, bias = self.prefix_w[i][k - 1].contiguous(), self.prefix_b[i][k - 1]
                if self.layer_kind[i] == "conv":
                    stride, padding, dilation = self.conv_args[i]
                    layer = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), stride, padding,
                                      dilation)
                else:
                    layer = nn.Linear(weight.shape[1], weight.shape[0])
                layer.weight.copy_(weight)
                layer.bias.copy_(bias)
                root.add_module(f"layer{i}", layer)
                env.append(graph.call_module(f"layer{i}", (env[node.args[0]],)))
            elif node.op == "add":
                env.append(graph.call_function(operator.add, (env[node.args[0]], env[node.args[1]])))
            elif node.op == "flatten":
                env.append(graph.call_function(torch.flatten, (env[node.args[0]], 1)))
            elif node.op == "map":
                module = self.maps[node.index]
                if isinstance(module, (nn.Dropout, nn.Identity)):
                    env.append(env[node.args[0]])
                else:
                    root.add_module(f"op{node.index}", copy.deepcopy(module))
                    env.append(graph.call_module(f"op{node.index}", (env[node.args[0]],)))
            else:  # classifier
                weight = self.cls_prefix[k - 1]
                classifier = nn.Linear(weight.shape[1], weight.shape[0], bias=self.cls_bias is not None)
                classifier.weight.copy_(weight)
                if self.cls_bias is not None:
                    classifier.bias.copy_(self.cls_bias)
                root.add_module("classifier", classifier)
                graph.output(graph.call_module("classifier", (env[node.args[0]],)))
                break
        return fx.GraphModule(root, graph).eval()

    def macs(self) -> list[int]:
        """Exact MACs of each subnet along the incremental path (live weights x output positions)."""
        return list(self._macs)

    def step_macs(self) -> list[int]:
        m = self._macs
        return [m[0]] + [b - a for a, b in zip(m, m[1:])]

    def block_density(self) -> list[float]:
        return [self._density]

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.input_shape, self.num_subnets, self.channels_last, self.program)).encode())
        for ws in self.prefix_w:
            h.update(ws[-1].detach().contiguous().numpy().tobytes())
        h.update(self.cls_prefix[-1].detach().contiguous().numpy().tobytes())
        return h.hexdigest()

    def state_tensors(self, state: dict) -> list[torch.Tensor]:
        """What a session's cache holds (for its memory figure)."""
        return [state["input"], *state["cache"].values()]

    def _check_subnet(self, subnet) -> int:
        return check_subnet(subnet, self.num_subnets)

    def _check_input(self, x: torch.Tensor) -> None:
        check_input(x, self.input_shape)

    def _layer(self, i: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.layer_kind[i] == "conv":
            stride, padding, dilation = self.conv_args[i]
            return F.conv2d(x, weight, bias, stride, padding, dilation)
        return F.linear(x, weight, bias)

    def _map(self, node, x: torch.Tensor) -> torch.Tensor:
        module = self.maps[node.index]
        if node.op == "flatten":
            return x.flatten(1)
        if isinstance(module, (nn.Dropout, nn.Identity)):
            return x
        if isinstance(module, nn.ReLU):
            return torch.relu(x)
        return module(x)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, subnet: int | None = None) -> torch.Tensor:
        """Subnet k from scratch with dense prefix blocks (one op per stage)."""
        k = self._check_subnet(subnet)
        self._check_input(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        vals: list[torch.Tensor | None] = []
        for j, node in enumerate(self.program):
            if node.op == "input":
                vals.append(x)
            elif node.op == "layer":
                vals.append(self._layer(node.index, vals[node.args[0]], self.prefix_w[node.index][k - 1],
                                        self.prefix_b[node.index][k - 1]))
            elif node.op == "add":
                vals.append(vals[node.args[0]] + vals[node.args[1]])
            elif node.op == "classifier":
                return F.linear(vals[node.args[0]], self.cls_prefix[k - 1], self.cls_bias)
            else:
                vals.append(self._map(node, vals[node.args[0]]))
            for a in self._frees[j]:  # nothing later reads it: let the allocator reuse its memory
                vals[a] = None
        raise AssertionError("a program ends with its classifier")

    def start_grid(self, x: torch.Tensor, depth: int | None = None, width: int = 1) -> "GridSession":
        """A session over (depth, width): ``deeper()`` and ``wider()`` compute only what is new."""
        return GridSession(self, x, depth, width)

    def start(self, x: torch.Tensor, subnet: int = 1):
        """Incremental session at ``subnet`` (see :class:`dyninfer.runtime.session.Session`)."""
        return Session(self, x, subnet)

    # ------------------------------------------------------------------ incremental steps
    def _new_state(self, x: torch.Tensor) -> dict:
        """Per-session cache: the input and, per node that a layer reads, the channels so far."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return {"input": x, "cache": {}}

    @torch.no_grad()
    def _step(self, state: dict, s: int, logits: torch.Tensor | None) -> torch.Tensor:
        """Step ``s`` (0-based: subnet s+1's new channels), computing only new channels; new logits."""
        cache = state["cache"]
        new: list[torch.Tensor | None] = []
        for j, node in enumerate(self.program):
            if node.op == "input":
                value = state["input"] if s == 0 else None  # the image is tag 1: all of it at step 0
            elif node.op == "layer":
                i, src = node.index, node.args[0]
                weight = self.step_w[i][s]
                inp = cache.get(src)
                value = None if weight.shape[0] == 0 or inp is None else self._layer(i, inp, weight, self.step_b[i][s])
            elif node.op == "add":
                a, b = (new[k] for k in node.args)
                value = None if a is None else a + b
            elif node.op == "classifier":
                features = new[node.args[0]]
                if features is None:  # no new features: subnet s+1 answers like subnet s
                    if logits is not None:
                        return logits
                    base = self.cls_bias if self.cls_bias is not None else torch.zeros(())
                    return base.expand(state["input"].shape[0], self.cls_prefix[0].shape[0]).clone()
                if logits is None:
                    if self.cls_bias is None:
                        return torch.mm(features, self.cls_steps_t[s])
                    return torch.addmm(self.cls_bias, features, self.cls_steps_t[s])
                return torch.addmm(logits, features, self.cls_steps_t[s])
            else:
                value = None if new[node.args[0]] is None else self._map(node, new[node.args[0]])
            new.append(value)
            if value is not None and j in self._cached:
                cache[j] = value if j not in cache else torch.cat([cache[j], value], dim=1)
        raise AssertionError("a program ends with its classifier")


class GridSession:
    """Anytime inference along both axes of a causal network with exits (doubly nested).

    The cache holds, per program node, the channels of groups 1..have[node] computed so far (sorted
    by tag, contiguous). ``wider()`` computes group c+1 of every node up to the current depth;
    ``deeper()`` the next depth's nodes at groups 1..c. Each (node, group) cell is computed once,
    from cached inputs, with the step block of that group, so any path through the grid costs
    the cells it reaches and nothing twice. Logits at (depth, width) are the head's partial sums.
    """

    def __init__(self, cnet: CompactGraph, x: torch.Tensor, depth: int | None, width: int):
        cnet._check_input(x)
        self.net = cnet
        self.num_depths = len(cnet.exit_nodes) + 1
        self.depth = self.num_depths if depth is None else depth
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or not 1 <= self.depth <= self.num_depths:
            raise ValueError(f"depth must be an int in 1..{self.num_depths}, got {depth!r}")
        self.width = check_subnet(width, cnet.num_subnets)
        self._x = x.contiguous(memory_format=torch.channels_last) if cnet.channels_last else x
        n = len(cnet.program)
        self._have = [0] * n
        self._cache: list[torch.Tensor | None] = [None] * n
        self._logits: dict[tuple[int, int], torch.Tensor] = {}
        self._ensure_cell(self.depth, self.width)

    # ------------------------------------------------------------------ moves
    @property
    def logits(self) -> torch.Tensor:
        return self._logits[(self.depth, self.width)]

    def wider(self) -> torch.Tensor:
        if self.width >= self.net.num_subnets:
            raise RuntimeError(f"already at the widest ({self.net.num_subnets} groups)")
        self.width += 1
        self._ensure_cell(self.depth, self.width)
        return self.logits

    def deeper(self) -> torch.Tensor:
        if self.depth >= self.num_depths:
            raise RuntimeError(f"already at the deepest ({self.num_depths} depths)")
        self.depth += 1
        self._ensure_cell(self.depth, self.width)
        return self.logits

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these inputs (indices into the current batch): the rest stopped early, so
        later cells are computed for the remaining ones alone."""
        self._x = self._x[rows]
        self._cache = [None if t is None else t[rows] for t in self._cache]
        self._logits = {k: v[rows] for k, v in self._logits.items()}

    # ------------------------------------------------------------------ cells
    def _bounds(self, j: int) -> list[int]:
        """Feature bounds of node j per group (channels x positions after a flatten)."""
        g, repeat = self.net.node_group[j], self.net.node_repeat[j]
        if g < 0:
            c = self.net.input_shape[0] * repeat
            return [0] + [c] * self.net.num_subnets
        return [b * repeat for b in self.net.group_bounds[g]]

    def _group(self, j: int, t: int) -> torch.Tensor | None:
        """Group t's channels at node j (computing what is missing); None when the group is empty."""
        self._ensure(j, t)
        b = self._bounds(j)
        if b[t] == b[t - 1]:
            return None
        return self._cache[j][:, b[t - 1]:b[t]]

    @torch.no_grad()
    def _ensure(self, j: int, s: int) -> None:
        net, node = self.net, self.net.program[j]
        while self._have[j] < s:
            t = self._have[j] + 1
            if node.op == "input":
                new = self._x if t == 1 else None
            elif node.op == "layer":
                i, src = node.index, node.args[0]
                self._ensure(src, t)
                weight = net.step_w[i][t - 1]
                inp = self._cache[src]
                new = None if weight.shape[0] == 0 else net._layer(i, inp[:, :self._bounds(src)[t]].contiguous(
                    memory_format=torch.channels_last) if inp.dim() == 4 and net.channels_last else
                    inp[:, :self._bounds(src)[t]], weight, net.step_b[i][t - 1])
            elif node.op == "add":
                a, b = (self._group(k, t) for k in node.args)
                new = None if a is None else a + b
            else:  # map / flatten
                part = self._group(node.args[0], t)
                new = None if part is None else net._map(node, part)
            if new is not None:
                self._cache[j] = new if self._cache[j] is None else torch.cat([self._cache[j], new], dim=1)
            self._have[j] = t

    @torch.no_grad()
    def _ensure_cell(self, depth: int, width: int) -> None:
        """Logits of (depth, width), from (depth, width - 1)'s plus group ``width``'s share."""
        if (depth, width) in self._logits:
            return
        if width > 1:
            self._ensure_cell(depth, width - 1)
        net = self.net
        if depth < self.num_depths:
            j = net.exit_nodes[depth - 1]
            part = self._group(j, width)
            features = None if part is None else (part.mean(dim=(2, 3)) if part.dim() == 4 else part)
            weight, bias = net.exit_steps_t[depth - 1][width - 1], net.exit_bias[depth - 1]
        else:
            src = net.program[-1].args[0] if net.program[-1].op == "classifier" else None
            src = next(node.args[0] for node in net.program if node.op == "classifier") if src is None else src
            part = self._group(src, width)
            features = part
            weight, bias = net.cls_steps_t[width - 1], net.cls_bias
        previous = self._logits.get((depth, width - 1))
        batch = self._x.shape[0]
        if features is None:
            logits = previous if previous is not None else (bias if bias is not None else torch.zeros(
                weight.shape[1])).expand(batch, -1).clone()
        elif previous is not None:
            logits = torch.addmm(previous, features, weight)
        else:
            logits = torch.addmm(bias, features, weight) if bias is not None else features @ weight
        self._logits[(depth, width)] = logits
