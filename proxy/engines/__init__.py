"""Engine adapters: the gateway streams through one interface (``base.Engine``) whatever engine a backend runs —
TGI (``tgi``), vLLM (``vllm``) or SGLang (``sglang``) — found by probing the backend (``probe``)."""

from proxy.engines.base import Engine, EventReader
from proxy.engines.probe import ENGINE_NAMES, engine, probe

__all__ = ["ENGINE_NAMES", "Engine", "EventReader", "engine", "probe"]
