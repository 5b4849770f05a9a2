"""Baselines users compare dynamic networks against, each behind the common face
(``num_subnets``, ``mac_fractions()``, ``forward(x, subnet=k)``, ``evaluate(data)``; incremental
ones also ``start(x)`` / ``step()``):

* :mod:`.slimmable` -- slimmable networks (full rule, switchable BN, summed losses)
* :mod:`.universal` -- universally slimmable networks (sandwich rule, in-place distillation,
  BN recalibration per deployed width)
* :mod:`.anywidth` -- any-width networks (causal rule with regular groups, incremental)
* :mod:`.earlyexit` -- early exits after each stage (depth prefixes, incremental)
* :mod:`.individual` -- individually trained narrow copies; slicing one full model, with or
  without classifier fine-tuning
"""

from dyninfer.methods.baselines import anywidth, earlyexit, individual, slimmable, universal  # noqa: F401
from dyninfer.methods.baselines._common import BaselineConfig, SubnetList, match_prefix_counts  # noqa: F401

__all__ = ["anywidth", "earlyexit", "individual", "slimmable", "universal", "BaselineConfig", "SubnetList",
           "match_prefix_counts"]
