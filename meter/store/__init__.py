"""joulegate's SQL store: engines, models, migrations, API keys and sample retention.

The ledger (``meter.ledger``) writes ``requests`` and ``samples``; the attribution engine writes
``request_energy``, ``backend_epochs`` and ``usage_hourly``; the proxy reads ``api_keys``.
"""

from meter.store.db import make_engine, normalize_url
from meter.store.keys import CreatedKey, KeyInfo, KeyRecord, create_key, list_keys, lookup_key, revoke_key
from meter.store.migrate import current, ensure_schema, head, upgrade
from meter.store.models import (
    ApiKey,
    BackendEpoch,
    Base,
    Request,
    RequestEnergy,
    Sample,
    Tenant,
    UsageFinalHourly,
    UsageHourly,
    UsageRollupHour,
    UsageRollupState,
    metadata,
)
from meter.store.retention import prune_samples

__all__ = [
    "ApiKey",
    "BackendEpoch",
    "Base",
    "CreatedKey",
    "KeyInfo",
    "KeyRecord",
    "Request",
    "RequestEnergy",
    "Sample",
    "Tenant",
    "UsageFinalHourly",
    "UsageHourly",
    "UsageRollupHour",
    "UsageRollupState",
    "create_key",
    "current",
    "ensure_schema",
    "head",
    "list_keys",
    "lookup_key",
    "make_engine",
    "metadata",
    "normalize_url",
    "prune_samples",
    "revoke_key",
    "upgrade",
]
