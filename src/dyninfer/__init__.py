"""dyninfer: networks whose compute is dialed at run time.

One set of weights holds many sub-networks; a device runs the one that fits the resources
it has now and, for incremental networks, steps up to a larger one reusing what it computed.

    >>> import dyninfer as dy
    >>> train, test = dy.data.load("digits")
    >>> model = dy.models.create("lenet-3c1l", num_classes=10, expansion=1.8, input_shape=train.input_shape)
    >>> net = dy.stepping.construct(model, train, budgets=[0.10, 0.30, 0.50, 0.85])
"""

from dyninfer import cost, data, export, models, report, runtime, train  # noqa: F401
from dyninfer.methods import doubly_nested, lcnet, nonuniform, stepping  # noqa: F401
from dyninfer.runs import load  # noqa: F401

__version__ = "0.1.0"
