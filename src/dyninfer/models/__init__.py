"""Model zoo: ``create(name, ...)`` builds a registered network from plain torch layers.

Flat-Sequential models (``lenet-5``, ``lenet-3c1l``, ``vgg-16``) and CIFAR-style ResNets
(``resnet-20/32/56``, ``resnet-18``, ``resnet-50``); ``list_models()`` names them all.
"""

from dyninfer.models.registry import create, list_models, original_macs, register
from dyninfer.models import lenet, resnet, vgg  # noqa: F401  (registers the families)
from dyninfer.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["create", "list_models", "original_macs", "register", "ResNet", "BasicBlock", "Bottleneck"]
