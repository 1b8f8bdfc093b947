"""The HTTP front door: TGI's HTTP API and its OpenAI-compatible routes over the same ``Gateway`` as gRPC.

``HttpFrontDoor(gateway, auth, limits)`` serves ``/generate``, ``/generate_stream``, ``/``, ``/info``, ``/health``,
``/tokenize``, ``/metrics``, ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``; every generation goes
through ``Gateway.stream``, so shaping, backend slots, retries, the ledger and metrics are those of the gRPC path.
"""

from proxy.http.app import HttpFrontDoor

__all__ = ["HttpFrontDoor"]
