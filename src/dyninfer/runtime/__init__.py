"""Inference runtime: compacted nets, incremental sessions, latency model, anytime controller.

    >>> from dyninfer import runtime
    >>> cnet = runtime.compact(tagged)                      # or stepping_net.compact()
    >>> run = cnet.start(x); run.step()                     # incremental session
    >>> model = runtime.calibrate(cnet, batch=1)            # ms per step on this machine
    >>> out = runtime.predict(cnet, x, deadline_ms=2.0)     # anytime answer under a deadline

Benchmarks (``runtime.bench``) and the compute-trace simulator (``runtime.simulate``) are
imported on use; ``dyninfer bench`` / ``dyninfer simulate`` drive them.
"""

from dyninfer.runtime.compaction import CompactLayer, CompactNet, as_compact, compact
from dyninfer.runtime.controller import PredictResult, StepRecord, predict
from dyninfer.runtime.latency import LatencyModel, calibrate
from dyninfer.runtime.session import Session

__all__ = ["CompactLayer", "CompactNet", "LatencyModel", "PredictResult", "Session", "StepRecord", "as_compact",
           "calibrate", "compact", "predict"]
