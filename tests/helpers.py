"""Helpers shared by test modules."""

import torch

from dyninfer.nn.tagged import TaggedNet


def random_tags(net: TaggedNet, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for i in range(net.num_groups):
        tags = torch.randint(1, net.num_subnets + 2, net.tags(i).shape, generator=g)
        tags[0] = 1  # subnet 1 keeps a neuron in every tag group
        net.tags(i).copy_(tags)
