"""API keys: ``jg_<key_id>_<secret>``, stored as the SHA-256 of the whole key, mapped to a tenant.

- ``key_id`` is 12 lowercase hex chars (48 random bits): a public handle for listings, logs and revocation.
- ``secret`` is 32 random bytes (256 bits) in URL-safe base64 without padding (43 chars).
- Only ``sha256(key).hexdigest()`` is stored. With 256 random bits a fast hash is enough: slow password hashes
  defend low-entropy secrets against guessing, which a 256-bit secret does not need.
- Lookups go through the unique index on ``key_hash``. A constant-time comparison is not needed there: timing can
  at most reveal how much of the *hash of the caller's own guess* matches a stored hash, and since SHA-256 outputs
  of chosen inputs are unpredictable, that says nothing about any key's secret.

The plaintext key is returned once, by ``create_key``, and is never stored or logged.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa

from meter.store import audit
from meter.store.models import ApiKey, Tenant, table_of
from meter.store.upsert import dialect_insert

KEY_PREFIX = "jg"
KEY_RE = re.compile(r"jg_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")  # use with fullmatch
SCOPES = ("generate", "reports")  # generate: the generation APIs; reports: its tenant's energy (admin: every tenant's)
ALL_SCOPES = frozenset(SCOPES)
LAST_USED_RESOLUTION_NS = 60 * 10**9  # last_used_ns is written at most once a minute per key


def encode_scopes(scopes: frozenset[str] | set[str]) -> str:
    unknown = set(scopes) - ALL_SCOPES
    if unknown or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {sorted(scopes)}")
    return ",".join(s for s in SCOPES if s in scopes)


def decode_scopes(text: str) -> frozenset[str]:
    return frozenset(s for s in text.split(",") if s)


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: str  # the plaintext key: shown once, never stored
    key_id: str
    tenant: str


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What a valid key grants: the request path's view of a key."""

    key_id: str
    tenant: str
    admin: bool
    default_class: str | None
    scopes: frozenset[str] = ALL_SCOPES
    expires_ns: int | None = None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as listed for operators (never with its secret)."""

    key_id: str
    tenant: str
    admin: bool
    default_class: str | None
    label: str | None
    created_ns: int
    revoked_ns: int | None
    expires_ns: int | None
    scopes: frozenset[str]
    last_used_ns: int | None
    rotated_from: str | None

    def active_at(self, now_ns: int) -> bool:
        return self.revoked_ns is None and (self.expires_ns is None or now_ns < self.expires_ns)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _new_key() -> tuple[str, str]:
    key_id = secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"


def parse_key_id(key: str) -> str | None:
    """The key_id of a well-formed key, None for anything else (no database needed)."""
    m = KEY_RE.fullmatch(key)
    return m.group(1) if m else None


def _tenant_id(conn: sa.Connection, tenant: str, now_ns: int) -> int:
    table = table_of(Tenant)
    conn.execute(
        dialect_insert(conn)(table)
        .values(name=tenant, created_ns=now_ns)
        .on_conflict_do_nothing(index_elements=["name"])
    )
    return conn.execute(sa.select(table.c.id).where(table.c.name == tenant)).scalar_one()


def create_key(
    engine: sa.Engine,
    tenant: str,
    *,
    admin: bool = False,
    default_class: str | None = None,
    label: str | None = None,
    scopes: frozenset[str] = ALL_SCOPES,
    expires_ns: int | None = None,
    actor: str = "internal",
) -> CreatedKey:
    """Create a key for ``tenant`` (creating the tenant if missing), recorded in the audit log as done by
    ``actor``. The returned ``key`` is the only copy."""
    if not tenant:
        raise ValueError("tenant must be a non-empty name")
    encoded = encode_scopes(scopes)
    with engine.begin() as conn:
        return _insert_key(conn, tenant, admin, default_class, label, encoded, expires_ns, None, actor)


def _insert_key(conn: sa.Connection, tenant: str, admin: bool, default_class: str | None, label: str | None,
                scopes: str, expires_ns: int | None, rotated_from: str | None, actor: str) -> CreatedKey:  # fmt: skip
    now_ns = time.time_ns()
    tenant_id = _tenant_id(conn, tenant, now_ns)
    for _attempt in range(5):  # a key_id collision (48 random bits) is astronomically rare; retry anyway
        key_id, key = _new_key()
        if conn.execute(sa.select(table_of(ApiKey).c.id).where(table_of(ApiKey).c.key_id == key_id)).first():
            continue
        conn.execute(
            sa.insert(table_of(ApiKey)).values(
                key_id=key_id,
                key_hash=hash_key(key),
                tenant_id=tenant_id,
                admin=admin,
                default_class=default_class,
                label=label,
                created_ns=now_ns,
                revoked_ns=None,
                expires_ns=expires_ns,
                scopes=scopes,
                rotated_from=rotated_from,
            )
        )
        action = "key.rotate" if rotated_from else "key.create"
        audit.record(conn, actor, action, key_id, tenant=tenant, admin=admin, scopes=scopes, label=label,
                     default_class=default_class, expires_ns=expires_ns, rotated_from=rotated_from)  # fmt: skip
        return CreatedKey(key=key, key_id=key_id, tenant=tenant)
    raise RuntimeError("could not allocate a unique key id")


def lookup_key(engine: sa.Engine, key: str) -> KeyInfo | None:
    """What ``key`` grants; None for a malformed, unknown or revoked key."""
    key_id = parse_key_id(key)
    if key_id is None:
        return None
    keys, tenants = table_of(ApiKey), table_of(Tenant)
    now_ns = time.time_ns()
    with engine.begin() as conn:
        row = conn.execute(
            sa.select(
                keys.c.id, keys.c.key_id, tenants.c.name, keys.c.admin, keys.c.default_class, keys.c.scopes,
                keys.c.expires_ns, keys.c.last_used_ns,
            )
            .join(tenants, tenants.c.id == keys.c.tenant_id)
            .where(
                keys.c.key_hash == hash_key(key),
                keys.c.revoked_ns.is_(None),
                sa.or_(keys.c.expires_ns.is_(None), keys.c.expires_ns > now_ns),
            )
        ).first()  # fmt: skip
        if row is None or row.key_id != key_id:
            return None
        if row.last_used_ns is None or row.last_used_ns < now_ns - LAST_USED_RESOLUTION_NS:
            conn.execute(sa.update(keys).where(keys.c.id == row.id).values(last_used_ns=now_ns))
    return KeyInfo(
        key_id=row.key_id,
        tenant=row.name,
        admin=bool(row.admin),
        default_class=row.default_class,
        scopes=decode_scopes(row.scopes),
        expires_ns=row.expires_ns,
    )


def list_keys(engine: sa.Engine, *, include_revoked: bool = True) -> list[KeyRecord]:
    """Every key (oldest first), without secrets."""
    keys, tenants = table_of(ApiKey), table_of(Tenant)
    query = (
        sa.select(
            keys.c.key_id,
            tenants.c.name,
            keys.c.admin,
            keys.c.default_class,
            keys.c.label,
            keys.c.created_ns,
            keys.c.revoked_ns,
            keys.c.expires_ns,
            keys.c.scopes,
            keys.c.last_used_ns,
            keys.c.rotated_from,
        )
        .join(tenants, tenants.c.id == keys.c.tenant_id)
        .order_by(keys.c.created_ns, keys.c.id)
    )
    if not include_revoked:
        query = query.where(keys.c.revoked_ns.is_(None))
    with engine.connect() as conn:
        return [
            KeyRecord(
                key_id=r.key_id,
                tenant=r.name,
                admin=bool(r.admin),
                default_class=r.default_class,
                label=r.label,
                created_ns=r.created_ns,
                revoked_ns=r.revoked_ns,
                expires_ns=r.expires_ns,
                scopes=decode_scopes(r.scopes),
                last_used_ns=r.last_used_ns,
                rotated_from=r.rotated_from,
            )
            for r in conn.execute(query)
        ]


def revoke_key(engine: sa.Engine, key_id: str, *, actor: str = "internal") -> bool:
    """Revoke the key ``key_id``. True if it was valid and is now revoked; False if unknown or already revoked."""
    keys = table_of(ApiKey)
    with engine.begin() as conn:
        result = conn.execute(
            sa.update(keys)
            .where(keys.c.key_id == key_id, keys.c.revoked_ns.is_(None))
            .values(revoked_ns=time.time_ns())
        )
        if result.rowcount == 1:
            audit.record(conn, actor, "key.revoke", key_id)
    return result.rowcount == 1


def rotate_key(engine: sa.Engine, key_id: str, *, grace_ns: int, actor: str = "internal") -> CreatedKey | None:
    """A new key with everything ``key_id`` grants (tenant, admin, scopes, class, label), while the old one keeps
    working for ``grace_ns`` more (or until its own, earlier expiry). None if ``key_id`` is unknown, revoked or
    expired. The new key carries no expiry of its own."""
    if grace_ns < 0:
        raise ValueError("the grace period cannot be negative")
    keys, tenants = table_of(ApiKey), table_of(Tenant)
    now_ns = time.time_ns()
    with engine.begin() as conn:
        old = conn.execute(
            sa.select(keys, tenants.c.name.label("tenant"))
            .join(tenants, tenants.c.id == keys.c.tenant_id)
            .where(
                keys.c.key_id == key_id,
                keys.c.revoked_ns.is_(None),
                sa.or_(keys.c.expires_ns.is_(None), keys.c.expires_ns > now_ns),
            )
            .with_for_update()
        ).first()
        if old is None:
            return None
        until = now_ns + grace_ns if old.expires_ns is None else min(old.expires_ns, now_ns + grace_ns)
        conn.execute(sa.update(keys).where(keys.c.id == old.id).values(expires_ns=until))
        return _insert_key(
            conn, old.tenant, bool(old.admin), old.default_class, old.label, old.scopes, None, key_id, actor
        )
