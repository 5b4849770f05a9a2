"""dyninfer: networks whose compute is dialed at run time.

One set of weights holds many sub-networks; a device runs the one that fits the resources
it has now and, for incremental networks, steps up to a larger one reusing what it computed.
"""

from dyninfer import data  # noqa: F401  (other submodules are added as they land)

__version__ = "0.1.0"
