"""Energy sources: NVML counters of local GPUs, and the counters of simulated GPUs served by ``sim/``.

Each implements ``meter.samples.EnergySource`` as a plain blocking class, read by ``meter.sampler.Sampler`` on its own
thread.
"""

from meter.sources.nvml import NvmlSource, NvmlUnavailableError, nvml_device_name, nvml_device_names
from meter.sources.sim import SimCounterInfo, SimSource

__all__ = [
    "NvmlSource",
    "NvmlUnavailableError",
    "SimCounterInfo",
    "SimSource",
    "nvml_device_name",
    "nvml_device_names",
]
