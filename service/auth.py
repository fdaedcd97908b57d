"""API keys and tenants. A key is shown once at creation and stored as its SHA-256.

Authentication is required when the server listens on a non-loopback address or when
``OPTIM_AUTH=required``; on loopback otherwise, every request acts as the single tenant ``local``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets

from .storage import Repository

KEY_PREFIX = "osk_"
LOCAL_TENANT = "local"
TENANT_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(repo: Repository, tenant: str) -> str:
    if not TENANT_RE.fullmatch(tenant):
        raise ValueError(f"a tenant is 1-64 letters, digits or '_.-', got {tenant!r}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    repo.add_api_key(tenant=tenant, key_hash=hash_key(key), prefix=key[: len(KEY_PREFIX) + 6])
    return key


def tenant_for(repo: Repository, key: str) -> str | None:
    return repo.tenant_for_key(hash_key(key))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
