"""API keys and tenants. A key is shown once at creation and stored as its SHA-256.

Authentication is required when the server listens on a non-loopback address or when
``OPTIM_AUTH=required``; on loopback otherwise, every request acts as the single tenant ``local``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .models import ApiKey

KEY_PREFIX = "osk_"
LOCAL_TENANT = "local"
TENANT_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant: str) -> str:
    if not TENANT_RE.fullmatch(tenant):
        raise ValueError(f"a tenant is 1-64 letters, digits or '_.-', got {tenant!r}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant=tenant, key_hash=hash_key(key), prefix=key[: len(KEY_PREFIX) + 6]))
    return key


def tenant_for(session: Session, key: str) -> str | None:
    row = session.execute(
        select(ApiKey.tenant).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()
    return row


def revoke(session: Session, prefix: str) -> int:
    result = session.execute(
        update(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None)).values(revoked_at=datetime.now(UTC))
    )
    return result.rowcount  # type: ignore[attr-defined, no-any-return]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
