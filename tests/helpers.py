"""Helpers shared by test modules."""

import torch

from dyninfer.nn.tagged import TaggedSequential


def random_tags(net: TaggedSequential, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for i in range(net.num_hidden):
        tags = torch.randint(1, net.num_subnets + 2, net.tags(i).shape, generator=g)
        tags[0] = 1  # subnet 1 keeps a neuron in every layer
        net.tags(i).copy_(tags)
