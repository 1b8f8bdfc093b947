"""NVIDIA GPU energy counters through NVML.

Reads ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the driver loaded). On an H100 that counter advances
every ~100 ms and integrates power continuously, so it is the source of truth for attribution; the power reading
(``nvmlDeviceGetPowerUsage``) is a lagging 1 s average on H100 and is not used here. One counter read costs ~3-4 ms
(p99 ~17 ms), which is why a ``Sampler`` calls ``read()`` on its own thread.

With ``counter_every`` N > 1 the counter is read every N-th tick only and the instant power (a field read,
~0.08 ms) every tick; each counter delta is spread over its ticks by power (``meter.sources.spread``): a node of 8
GPUs then spends ~3 % of a core on reads instead of ~30 %, every second's energy still the counter's.

Devices are named ``nvml:<GPU UUID>``: the UUID survives reboots and a changed ``CUDA_VISIBLE_DEVICES`` order, so
samples stored in SQL stay joined to the right GPU. Only stdlib, pynvml and structlog are imported here, so the module
also runs on a bare GPU image (see bench/gpu/).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pynvml
import structlog

from common.errors import JoulegateError
from meter.lifecycle import Lifecycle
from meter.samples import Sample
from meter.sources.spread import CounterSpreader

log = structlog.get_logger(__name__)

DEVICE_PREFIX = "nvml:"
FIELD_POWER_INSTANT = 186  # NVML_FI_DEV_POWER_INSTANT (mW): updated with the energy counter, ~0.08 ms a read
_VALUE_MEMBER = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal"}  # nvmlValueType_t


class NvmlUnavailableError(JoulegateError, RuntimeError):
    """NVML cannot be used here: no driver, no library, no such GPU, or a GPU without an energy counter."""


def nvml_device_name(uuid: str) -> str:
    """The stable device name of a GPU with this NVML UUID (e.g. ``GPU-5f3c...``)."""
    return f"{DEVICE_PREFIX}{uuid}"


def _as_str(value: str | bytes) -> str:
    # pynvml returns str in current releases and bytes in some old ones.
    return value.decode() if isinstance(value, bytes) else value


def _init() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        raise NvmlUnavailableError(
            f"NVML could not be initialised ({e}): is the NVIDIA driver installed and is this a GPU host? "
            "Use the simulated source (sim) on machines without a GPU."
        ) from e


def _handles(gpu_indices: Sequence[int] | None) -> list[tuple[int, Any]]:
    """Handles of the requested GPUs (all when None); NVML must be initialised."""
    count = pynvml.nvmlDeviceGetCount()
    indices = list(range(count)) if gpu_indices is None else list(gpu_indices)
    if not indices:
        raise NvmlUnavailableError("no GPU to read: NVML reports no devices" if count == 0 else "gpu_indices is empty")
    if len(set(indices)) != len(indices):
        raise NvmlUnavailableError(f"gpu_indices lists a GPU twice: {indices}")
    handles = []
    for index in indices:
        if not 0 <= index < count:
            raise NvmlUnavailableError(f"GPU index {index} does not exist: NVML sees {count} GPU(s) (0..{count - 1})")
        try:
            handles.append((index, pynvml.nvmlDeviceGetHandleByIndex(index)))
        except pynvml.NVMLError as e:
            raise NvmlUnavailableError(f"GPU {index}: no NVML handle ({e})") from e
    return handles


def nvml_device_names(gpu_indices: Sequence[int] | None = None) -> dict[int, str]:
    """Map GPU indices (as ``nvidia-smi`` numbers them) to joulegate device names, for config validation.

    Backends list the GPU indices they run on; the meter stores samples under UUID-based names. This opens and closes
    NVML itself, so it can be called at startup before any ``NvmlSource`` exists. Raises ``NvmlUnavailableError``.
    """
    _init()
    try:
        return {index: nvml_device_name(_as_str(pynvml.nvmlDeviceGetUUID(h))) for index, h in _handles(gpu_indices)}
    except pynvml.NVMLError as e:
        raise NvmlUnavailableError(f"could not read GPU UUIDs ({e})") from e
    finally:
        pynvml.nvmlShutdown()


class NvmlSource:
    """An ``EnergySource`` over the energy counters of some local GPUs (all of them by default).

    Construction initialises NVML once (NVML reference-counts init/shutdown, so several sources may coexist), opens one
    handle per GPU and reads each counter once, so a GPU without the counter (pre-Volta) or a broken driver fails at
    startup with ``NvmlUnavailableError`` rather than as an endless run of gaps. After that ``read()`` never raises.
    """

    def __init__(self, gpu_indices: Sequence[int] | None = None, *, counter_every: int = 1) -> None:
        """``counter_every``: read the energy counter every this many reads (1: every read), the instant power
        every read, and spread each counter delta over the reads between by power."""
        if counter_every < 1:
            raise ValueError(f"counter_every must be at least 1, got {counter_every}")
        self._counter_every = counter_every
        self._reads = 0
        _init()
        self._state = Lifecycle.RUNNING
        try:
            opened = _handles(gpu_indices)
            self._indices = [i for i, _ in opened]
            self._handles = [h for _, h in opened]
            names = []
            for index, handle in zip(self._indices, self._handles, strict=True):
                uuid = _as_str(pynvml.nvmlDeviceGetUUID(handle))
                try:
                    pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                except pynvml.NVMLError_NotSupported as e:
                    model = _as_str(pynvml.nvmlDeviceGetName(handle))
                    raise NvmlUnavailableError(
                        f"GPU {index} ({model}, {uuid}) has no total-energy counter "
                        "(nvmlDeviceGetTotalEnergyConsumption needs Volta or newer): joulegate cannot meter it"
                    ) from e
                names.append(nvml_device_name(uuid))
            self._devices = tuple(names)
            self._spreaders = [CounterSpreader(name) for name in names]
            if counter_every > 1 and any(_power_mw(h) is None for h in self._handles):
                log.warning("nvml_no_instant_power", detail="the energy between counter reads is spread evenly")
        except NvmlUnavailableError:
            self.close()
            raise
        except pynvml.NVMLError as e:
            self.close()
            raise NvmlUnavailableError(f"NVML failed while opening GPUs {gpu_indices}: {e}") from e
        log.info("nvml_source_opened", devices=self._devices, gpu_indices=self._indices, counter_every=counter_every)

    @property
    def devices(self) -> tuple[str, ...]:
        return self._devices

    @property
    def gpu_indices(self) -> tuple[int, ...]:
        """NVML indices of ``devices``, in the same order."""
        return tuple(self._indices)

    def read(self) -> list[Sample]:
        """One counter read per GPU (with ``counter_every`` > 1: on every N-th read, and the instant power on every
        one); each sample is stamped right after its own read returned."""
        due = self._reads % self._counter_every == 0
        self._reads += 1
        samples: list[Sample] = []
        for name, handle, spreader in zip(self._devices, self._handles, self._spreaders, strict=True):
            if self._counter_every == 1:
                samples.append(_read_counter(name, handle))
                continue
            if due or spreader.owes_counter:
                samples += _counter_tick(name, handle, spreader)
            else:
                power_mw = _power_mw(handle)
                samples += spreader.power_tick(time.time_ns(), power_mw)
        return samples

    def settle(self) -> list[Sample]:
        """A counter read for every GPU whose last reads wait for one (``counter_every`` > 1): their samples, so
        that a meter that stops leaves no read of its last second unstored."""
        if self._state is Lifecycle.CLOSED:
            return []
        samples: list[Sample] = []
        for name, handle, spreader in zip(self._devices, self._handles, self._spreaders, strict=True):
            if spreader.holds_ticks:
                samples += _counter_tick(name, handle, spreader)
        return samples

    def close(self) -> None:
        """Shut NVML down (once; later calls do nothing)."""
        if self._state is Lifecycle.CLOSED:
            return
        self._state = Lifecycle.CLOSED
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as e:
            log.warning("nvml_shutdown_failed", error=str(e))


def _read_counter(name: str, handle: Any) -> Sample:
    try:
        energy_mj = int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    except Exception as e:  # a gap, never an exception out of the sampler's source
        return Sample(device=name, t_ns=time.time_ns(), energy_mj=None, error=f"{type(e).__name__}: {e}")
    return Sample(device=name, t_ns=time.time_ns(), energy_mj=energy_mj)


def _counter_tick(name: str, handle: Any, spreader: CounterSpreader) -> list[Sample]:
    """A counter read with the instant power beside it, handed to the device's spreader: the samples it completes."""
    read = _read_counter(name, handle)
    return spreader.counter_tick(read.t_ns, read.energy_mj, _power_mw(handle), read.error)


def _power_mw(handle: Any) -> int | None:
    """The GPU's instant power (mW), None when it cannot be read."""
    try:
        [value] = pynvml.nvmlDeviceGetFieldValues(handle, [FIELD_POWER_INSTANT])
        if value.nvmlReturn != pynvml.NVML_SUCCESS:
            return None
        return int(getattr(value.value, _VALUE_MEMBER[value.valueType]))
    except Exception:  # read as "no power": that tick's share is by time alone
        return None
