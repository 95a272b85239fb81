"""Claim check: large Bundles live in a blob store; Kafka records carry a reference and a SHA-256.

Two stores behind one small interface: a local directory (default; must be shared by every process
that reads blobs, e.g. a volume) and any S3-compatible service (plain httpx + AWS Signature V4).
Blobs are content-addressed by their SHA-256, so storing the same payload twice is a no-op and a
reference can always be checked: `get()` refuses a blob whose hash does not match (BlobIntegrityError).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlsplit

import httpx

from services.core.crypto import DecryptionError, Keyring, is_sealed_blob
from services.core.errors import ConfigurationError, PermanentError, TransientError
from services.core.settings import Settings

# Envelope extension attributes of a claim-checked record (the value is then empty).
X_BLOB = "blob"
X_BLOB_SHA256 = "blobsha256"
X_BLOB_SIZE = "blobsize"


class BlobIntegrityError(PermanentError):
    """When a blob is missing or its content does not match the SHA-256 the record carries."""


@dataclass(frozen=True, slots=True)
class BlobRef:
    """Where a payload is and what it must hash to."""

    uri: str
    sha256: str
    size: int

    def to_extra(self) -> dict[str, str]:
        """The envelope attributes carrying this reference."""
        return {X_BLOB: self.uri, X_BLOB_SHA256: self.sha256, X_BLOB_SIZE: str(self.size)}

    @classmethod
    def from_extra(cls, extra: Mapping[str, str]) -> BlobRef | None:
        """The reference an envelope carries, if any."""
        if X_BLOB not in extra:
            return None
        return cls(extra[X_BLOB], extra.get(X_BLOB_SHA256, ""), int(extra.get(X_BLOB_SIZE, "0") or 0))


class BlobStore(Protocol):
    """Put a payload, get it back verified."""

    async def put(self, data: bytes) -> BlobRef:
        """Store `data` durably; returns its reference."""

    async def get(self, ref: BlobRef) -> bytes:
        """The payload, checked against `ref.sha256`; BlobIntegrityError otherwise."""


def _seal(keyring: Keyring | None, sha: str, data: bytes) -> bytes:
    """What is stored for a payload: itself, or sealed (bound to its SHA-256 address) when encrypting."""
    return data if keyring is None else keyring.seal_blob(data, f"relais-blob/1|{sha}".encode())


def _open(keyring: Keyring | None, ref: BlobRef, stored: bytes) -> bytes:
    """The payload of a stored blob, decrypted when sealed, then checked against its SHA-256."""
    if is_sealed_blob(stored):
        if keyring is None:
            raise BlobIntegrityError(f"blob {ref.uri} is encrypted but no encryption key is configured")
        try:
            stored = keyring.open_blob(stored, f"relais-blob/1|{ref.sha256}".encode())
        except DecryptionError as exc:
            raise BlobIntegrityError(f"blob {ref.uri}: {exc}") from exc
    return _verify(ref, stored)


def _verify(ref: BlobRef, data: bytes) -> bytes:
    digest = hashlib.sha256(data).hexdigest()
    if digest != ref.sha256:
        raise BlobIntegrityError(f"blob {ref.uri} has SHA-256 {digest}, the record says {ref.sha256}")
    return data


class LocalBlobStore:
    """Blobs as files under one directory, named by their SHA-256."""

    def __init__(self, root: Path, keyring: Keyring | None = None) -> None:
        self.root = Path(root)
        self.keyring = keyring

    def _path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    async def put(self, data: bytes) -> BlobRef:
        """Write atomically (temporary file, fsync, rename)."""
        sha = hashlib.sha256(data).hexdigest()
        await asyncio.to_thread(self._write, sha, _seal(self.keyring, sha, data))
        return BlobRef(f"local:{sha}", sha, len(data))

    def _write(self, sha: str, data: bytes) -> None:
        path = self._path(sha)
        if path.exists() and path.stat().st_size == len(data):
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def get(self, ref: BlobRef) -> bytes:
        """Read and verify."""
        if not ref.uri.startswith("local:"):
            raise BlobIntegrityError(f"blob {ref.uri} is not in the local blob store")
        try:
            data = await asyncio.to_thread(self._path(ref.uri[len("local:"):]).read_bytes)
        except FileNotFoundError as exc:
            raise BlobIntegrityError(f"blob {ref.uri} is missing from {self.root}") from exc
        return _open(self.keyring, ref, data)


# --- S3-compatible -------------------------------------------------------------------------------

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def sigv4_headers(method: str, url: str, headers: Mapping[str, str], payload_sha256: str, *,
                  access_key: str, secret_key: str, region: str, service: str = "s3",
                  now: datetime | None = None) -> dict[str, str]:
    """`headers` plus x-amz-date, x-amz-content-sha256 and an AWS Signature V4 Authorization header."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    amz_date = moment.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    parts = urlsplit(url)
    signed = {k.lower(): " ".join(str(v).split()) for k, v in headers.items()}
    signed.setdefault("host", parts.netloc)
    signed["x-amz-date"] = signed.get("x-amz-date", amz_date)
    signed["x-amz-content-sha256"] = payload_sha256
    names = sorted(signed)
    query = "&".join(sorted(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
        for k, _, v in (pair.partition("=") for pair in parts.query.split("&") if pair)
    ))
    canonical = "\n".join([
        method.upper(), quote(parts.path or "/", safe="/-_.~"), query,
        "".join(f"{n}:{signed[n]}\n" for n in names), ";".join(names), payload_sha256,
    ])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", signed["x-amz-date"], scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out = {**headers, "x-amz-date": signed["x-amz-date"], "x-amz-content-sha256": payload_sha256}
    out["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                            f"SignedHeaders={';'.join(names)}, Signature={signature}")
    return out


class S3BlobStore:
    """Blobs as objects `<prefix><sha256>` in an S3-compatible bucket (path-style URLs)."""

    def __init__(self, endpoint: str, bucket: str, region: str, access_key: str, secret_key: str,
                 prefix: str = "relais/", client: httpx.AsyncClient | None = None,
                 keyring: Keyring | None = None) -> None:
        self.keyring = keyring
        self.endpoint, self.bucket, self.region, self.prefix = endpoint.rstrip("/"), bucket, region, prefix
        self._keys = (access_key, secret_key)
        self.client = client or httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0))

    def _url(self, sha: str) -> str:
        return f"{self.endpoint}/{self.bucket}/{self.prefix}{sha}"

    async def _send(self, method: str, url: str, body: bytes, sha: str) -> httpx.Response:
        headers = sigv4_headers(method, url, {}, sha, access_key=self._keys[0], secret_key=self._keys[1],
                                region=self.region)
        try:
            return await self.client.request(method, url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise TransientError(f"blob store unreachable: {type(exc).__name__}") from exc

    async def put(self, data: bytes) -> BlobRef:
        """PUT the object; 5xx and network trouble are transient."""
        sha = hashlib.sha256(data).hexdigest()
        url = self._url(sha)
        stored = _seal(self.keyring, sha, data)
        response = await self._send("PUT", url, stored, hashlib.sha256(stored).hexdigest())
        if response.status_code >= 500:
            raise TransientError(f"blob store answered {response.status_code}")
        if response.status_code >= 300:
            raise ConfigurationError(f"blob store refused PUT {url}: HTTP {response.status_code}")
        return BlobRef(f"s3://{self.bucket}/{self.prefix}{sha}", sha, len(data))

    async def get(self, ref: BlobRef) -> bytes:
        """GET the object and verify it."""
        url = self._url(ref.sha256)
        response = await self._send("GET", url, b"", EMPTY_SHA256)
        if response.status_code >= 500:
            raise TransientError(f"blob store answered {response.status_code}")
        if response.status_code == 404:
            raise BlobIntegrityError(f"blob {ref.uri} is missing from the blob store")
        if response.status_code >= 300:
            raise ConfigurationError(f"blob store refused GET {url}: HTTP {response.status_code}")
        return _open(self.keyring, ref, response.content)


def make_blob_store(settings: Settings) -> BlobStore:
    """The blob store the settings describe: S3 when RELAIS_BLOB_S3_ENDPOINT is set, else a directory."""
    if settings.blob_s3_endpoint:
        if not (settings.blob_s3_bucket and settings.blob_s3_access_key_id and settings.blob_s3_secret_access_key):
            raise ConfigurationError("RELAIS_BLOB_S3_ENDPOINT needs RELAIS_BLOB_S3_BUCKET, "
                                     "RELAIS_BLOB_S3_ACCESS_KEY_ID and RELAIS_BLOB_S3_SECRET_ACCESS_KEY")
        return S3BlobStore(settings.blob_s3_endpoint, settings.blob_s3_bucket, settings.blob_s3_region,
                           settings.blob_s3_access_key_id, settings.blob_s3_secret_access_key,
                           keyring=Keyring.from_settings(settings))
    return LocalBlobStore(settings.blob_dir, Keyring.from_settings(settings))


async def resolve_payload(store: BlobStore, data: bytes, extra: Mapping[str, str]) -> bytes:
    """The record's payload: inline, or fetched and verified from the blob store."""
    ref = BlobRef.from_extra(extra)
    return data if ref is None else await store.get(ref)
