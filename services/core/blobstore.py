"""Claim check: large Bundles live in a blob store; Kafka records carry a reference and an integrity check.

Two stores behind one small interface: a local directory (default; must be shared by every process
that reads blobs, e.g. a volume) and any S3-compatible service (plain httpx + AWS Signature V4).

Blob names are random (128 bits): a name says nothing about the content, so listing the directory or
bucket cannot confirm a guessed Bundle (names used to be the Bundle's SHA-256). Each put stores a new
blob. Integrity: with encryption at rest the SHA-256 of the payload is kept *inside* the sealed blob
(AES-GCM bound to the blob's name) and the reference carries none; without encryption the reference
carries the SHA-256 and `get()` checks it. Either way `get()` refuses a blob that does not match
(BlobIntegrityError). Blobs written before this scheme (named by SHA-256, sealed bound to it) still read.

A blob store that cannot be written or read (disk full, read-only, permissions, I/O error, S3 down) is an
infrastructure fault: BlobStoreUnavailable, a TransientError — the record waits and is retried, it never
becomes poison. `LocalBlobStore.prune` applies retention; `reseal` re-encrypts under the current key
(`relais keys rotate`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlsplit

import httpx

from services.core.crypto import DecryptionError, Keyring, blob_key_id, is_sealed_blob
from services.core.errors import ConfigurationError, PermanentError, TransientError
from services.core.logging import get_logger
from services.core.settings import Settings
from services.core.tasks import wait_until_set

log = get_logger(__name__)

# Envelope extension attributes of a claim-checked record (the value is then empty).
X_BLOB = "blob"
X_BLOB_SHA256 = "blobsha256"
X_BLOB_SIZE = "blobsize"

_NAME = re.compile(r"^[0-9a-f]{32,64}$")
_DIGEST_BYTES = 32


class BlobIntegrityError(PermanentError):
    """When a blob is missing or its content does not match the integrity check it carries."""


class BlobStoreUnavailable(TransientError):
    """When the blob store cannot be written or read right now (disk full, read-only, permissions, I/O, S3
    unreachable): waiting (and an operator freeing space) helps."""


@dataclass(frozen=True, slots=True)
class BlobRef:
    """Where a payload is and, for a blob stored in clear, what it must hash to ("" when sealed: the
    SHA-256 is inside the sealed blob)."""

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

    @property
    def name(self) -> str:
        """The blob's name (last part of its URI); BlobIntegrityError when it is not one Relais makes."""
        name = self.uri.rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        if not _NAME.match(name):
            raise BlobIntegrityError(f"blob reference {self.uri!r} does not name a Relais blob")
        return name


class BlobStore(Protocol):
    """Put a payload, get it back verified."""

    async def put(self, data: bytes) -> BlobRef:
        """Store `data` durably under a new random name; returns its reference."""

    async def get(self, ref: BlobRef) -> bytes:
        """The payload, checked; BlobIntegrityError otherwise."""


def new_blob_name() -> str:
    """A random name: 128 bits, hex."""
    return secrets.token_hex(16)


def _aad(name: str) -> bytes:
    return f"relais-blob/2|{name}".encode()


def _seal(keyring: Keyring | None, name: str, data: bytes) -> tuple[bytes, str]:
    """What is stored for a payload, and the SHA-256 the reference carries ("" when it is sealed inside)."""
    digest = hashlib.sha256(data)
    if keyring is None:
        return data, digest.hexdigest()
    return keyring.seal_blob(digest.digest() + data, _aad(name)), ""


def _unseal(keyring: Keyring, name: str, stored: bytes, legacy_sha: str | None) -> bytes:
    """The payload of a sealed blob, its inner SHA-256 checked; a blob from before random names (sealed
    bound to its SHA-256, which is also its name) opens too."""
    try:
        inner = keyring.open_blob(stored, _aad(name))
    except DecryptionError as first:
        try:
            payload = keyring.open_blob(stored, f"relais-blob/1|{legacy_sha or name}".encode())
        except DecryptionError:
            raise first from None
        if hashlib.sha256(payload).hexdigest() != (legacy_sha or name):
            raise DecryptionError("blob content does not match its SHA-256") from None
        return payload
    digest, payload = inner[:_DIGEST_BYTES], inner[_DIGEST_BYTES:]
    if not hmac.compare_digest(hashlib.sha256(payload).digest(), digest):
        raise DecryptionError("blob content does not match the SHA-256 sealed with it")
    return payload


def _open(keyring: Keyring | None, ref: BlobRef, stored: bytes) -> bytes:
    """The payload of a stored blob, decrypted when sealed, then checked."""
    if is_sealed_blob(stored):
        if keyring is None:
            raise BlobIntegrityError(f"blob {ref.uri} is encrypted but no encryption key is configured")
        try:
            payload = _unseal(keyring, ref.name, stored, ref.sha256 or None)
        except DecryptionError as exc:
            raise BlobIntegrityError(f"blob {ref.uri}: {exc}") from exc
        return _verify(ref, payload) if ref.sha256 else payload
    return _verify(ref, stored)


def _verify(ref: BlobRef, data: bytes) -> bytes:
    digest = hashlib.sha256(data).hexdigest()
    if digest != ref.sha256:
        raise BlobIntegrityError(f"blob {ref.uri} has SHA-256 {digest}, the record says {ref.sha256}")
    return data


def reseal(keyring: Keyring, name: str, stored: bytes) -> bytes | None:
    """`stored` sealed again under the current key, or None when it already is (or is not sealed)."""
    if not is_sealed_blob(stored) or blob_key_id(stored) == keyring.current:
        return None
    payload = _unseal(keyring, name, stored, None)
    return _seal(keyring, name, payload)[0]


class LocalBlobStore:
    """Blobs as files under one directory, under random names."""

    def __init__(self, root: Path, keyring: Keyring | None = None) -> None:
        self.root = Path(root)
        self.keyring = keyring

    def _path(self, name: str) -> Path:
        return self.root / name[:2] / name

    async def put(self, data: bytes) -> BlobRef:
        """Write atomically (temporary file, fsync, rename); BlobStoreUnavailable when the disk refuses."""
        name = new_blob_name()
        stored, sha = _seal(self.keyring, name, data)
        await asyncio.to_thread(self._write, name, stored)
        return BlobRef(f"local:{name}", sha, len(data))

    def _write(self, name: str, data: bytes) -> None:
        path = self._path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        except OSError as exc:
            raise BlobStoreUnavailable(f"cannot write to the blob store {self.root}: {exc}; free space or fix its "
                                       "permissions (RELAIS_BLOB_DIR), the record is retried") from exc
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise BlobStoreUnavailable(f"cannot write to the blob store {self.root}: {exc}; free space or fix its "
                                       "permissions (RELAIS_BLOB_DIR), the record is retried") from exc
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def get(self, ref: BlobRef) -> bytes:
        """Read and verify."""
        if not ref.uri.startswith("local:"):
            raise BlobIntegrityError(f"blob {ref.uri} is not in the local blob store")
        try:
            data = await asyncio.to_thread(self._path(ref.name).read_bytes)
        except FileNotFoundError as exc:
            raise BlobIntegrityError(f"blob {ref.uri} is missing from {self.root}") from exc
        except OSError as exc:
            raise BlobStoreUnavailable(f"cannot read blob {ref.uri} from {self.root}: {exc}") from exc
        return _open(self.keyring, ref, data)

    def names(self) -> Iterator[Path]:
        """Every blob file (not the temporary ones)."""
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir():
                yield from (p for p in sorted(sub.iterdir()) if p.is_file() and _NAME.match(p.name))

    def prune(self, older_than_s: float, *, now: float | None = None) -> int:
        """Remove blobs (and abandoned temporary files) not written for `older_than_s`; how many went.

        Retention: a blob is referenced by pipeline records and dead letters, which the bus keeps for
        RELAIS_TOPIC_RETENTION_DAYS then RELAIS_DLQ_RETENTION_DAYS (`blob_retention_s`); past both nothing
        can refer to it any more. `reseal` rewrites a blob, which restarts its clock.
        """
        cutoff = (time.time() if now is None else now) - older_than_s
        gone = 0
        if not self.root.is_dir():
            return 0
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for path in sub.iterdir():
                try:
                    if path.is_file() and path.stat().st_mtime < cutoff:
                        path.unlink()
                        gone += 1
                except FileNotFoundError:
                    continue
        return gone

    def reseal_all(self, keyring: Keyring, progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
        """Re-encrypt every blob not sealed under the current key (atomically, one by one); (resealed, total)."""
        paths = list(self.names())
        done = 0
        for n, path in enumerate(paths, start=1):
            fresh = reseal(keyring, path.name, path.read_bytes())
            if fresh is not None:
                self._write(path.name, fresh)
                done += 1
            if progress is not None:
                progress(n, len(paths))
        return done, len(paths)

    def key_ids(self) -> dict[str, int]:
        """How many blobs each key id seals (unsealed blobs are not counted)."""
        counts: dict[str, int] = {}
        for path in self.names():
            with path.open("rb") as f:
                head = f.read(512)
            if is_sealed_blob(head):
                kid = blob_key_id(head)
                counts[kid] = counts.get(kid, 0) + 1
        return counts


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
    """Blobs as objects `<prefix><random name>` in an S3-compatible bucket (path-style URLs)."""

    def __init__(self, endpoint: str, bucket: str, region: str, access_key: str, secret_key: str,
                 prefix: str = "relais/", client: httpx.AsyncClient | None = None,
                 keyring: Keyring | None = None) -> None:
        self.keyring = keyring
        self.endpoint, self.bucket, self.region, self.prefix = endpoint.rstrip("/"), bucket, region, prefix
        self._keys = (access_key, secret_key)
        self.client = client or httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0))

    def _url(self, name: str) -> str:
        return f"{self.endpoint}/{self.bucket}/{self.prefix}{name}"

    async def _send(self, method: str, url: str, body: bytes, sha: str) -> httpx.Response:
        headers = sigv4_headers(method, url, {}, sha, access_key=self._keys[0], secret_key=self._keys[1],
                                region=self.region)
        try:
            return await self.client.request(method, url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise BlobStoreUnavailable(f"blob store unreachable: {type(exc).__name__}") from exc

    async def put(self, data: bytes) -> BlobRef:
        """PUT the object under a new random name; 5xx and network trouble are transient."""
        name = new_blob_name()
        url = self._url(name)
        stored, sha = _seal(self.keyring, name, data)
        response = await self._send("PUT", url, stored, hashlib.sha256(stored).hexdigest())
        if response.status_code >= 500:
            raise BlobStoreUnavailable(f"blob store answered {response.status_code}")
        if response.status_code >= 300:
            raise ConfigurationError(f"blob store refused PUT {url}: HTTP {response.status_code}")
        return BlobRef(f"s3://{self.bucket}/{self.prefix}{name}", sha, len(data))

    async def get(self, ref: BlobRef) -> bytes:
        """GET the object and verify it."""
        url = self._url(ref.name)
        response = await self._send("GET", url, b"", EMPTY_SHA256)
        if response.status_code >= 500:
            raise BlobStoreUnavailable(f"blob store answered {response.status_code}")
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


def blob_retention_s(settings: Settings) -> float:
    """How long a blob may still be referenced: a record may wait in the pipeline up to its retention, then
    be dead-lettered (a dead letter reuses the blob the router wrote) and kept as long again."""
    return (settings.topic_retention_days + settings.dlq_retention_days) * 86400


def prune_local_blobs(settings: Settings) -> int:
    """Apply retention to the local blob store (none for S3: give the bucket a lifecycle rule instead)."""
    if settings.blob_s3_endpoint:
        return 0
    return LocalBlobStore(settings.blob_dir).prune(blob_retention_s(settings))


async def prune_blobs_periodically(settings: Settings, stop: asyncio.Event, every_s: float = 3600.0) -> None:
    """`prune_local_blobs` now and every `every_s` until `stop` is set (the embedded default has no Kafka
    retention to lean on, so blobs would otherwise accumulate forever)."""
    while not stop.is_set():
        try:
            gone = await asyncio.to_thread(prune_local_blobs, settings)
            if gone:
                log.info("blobs past retention removed", blobs=gone)
        except OSError as exc:
            log.warning("blob retention could not run; retrying later", error=str(exc))
        await wait_until_set(stop, every_s)


async def resolve_payload(store: BlobStore, data: bytes, extra: Mapping[str, str]) -> bytes:
    """The record's payload: inline, or fetched and verified from the blob store."""
    ref = BlobRef.from_extra(extra)
    return data if ref is None else await store.get(ref)
