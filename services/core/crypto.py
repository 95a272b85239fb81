"""Envelope encryption at rest: every record value and blob sealed with its own AES-256-GCM data key.

Off unless a key is configured (`RELAIS_ENCRYPTION_KEYS` or `RELAIS_ENCRYPTION_KEYS_FILE`). Then:

* each record value (a Bundle, an event) is encrypted with a fresh 256-bit data key (DEK) by AES-GCM;
  the DEK is wrapped (RFC 3394 AES key wrap) by the key-encryption key (KEK) and travels in the record's
  headers with the KEK's id: `ce_enckid`, `ce_encdek`. The authenticated data binds the ciphertext to
  the record's transfer id and event id, so a value moved onto another record does not decrypt either;
* blobs (claim check) are stored as `RLE1 | kid | wrapped DEK | nonce | ciphertext`, bound to their
  (random) name, with the payload's SHA-256 sealed inside (services.core.blobstore);
* rotation: list the new key first (it encrypts), keep the old ones (they still decrypt), run
  `relais keys rotate` (services.keyrotation re-encrypts what is still live), then remove the old key.
  A keys file is re-read when it changes, without restart.

A record that fails authentication (tampered, truncated, unknown key) is not handed to the stage: the
bus marks it (`decrypterror`) and the runner sends it to the poison topic (`transfers.dlq`) untouched.

Key format: `kid:base64(32 bytes)`, comma-separated (environment) or one per line (file, `#` comments).
New key: `relais keys new KID`.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import struct
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from services.core.configfile import file_stamp
from services.core.errors import ConfigurationError, PermanentError
from services.core.logging import get_logger

if TYPE_CHECKING:
    from services.core.envelope import Envelope
    from services.core.settings import Settings

log = get_logger(__name__)

# Envelope extension attributes (headers `ce_enckid`, `ce_encdek`) of an encrypted record.
X_ENC_KID = "enckid"
X_ENC_DEK = "encdek"
# Set by the bus on a record that could not be decrypted; the runner poisons such a record.
X_DECRYPT_ERROR = "decrypterror"
_ENC_ATTRS = (X_ENC_KID, X_ENC_DEK)

BLOB_MAGIC = b"RLE1"
NONCE_BYTES = 12
KEY_BYTES = 32
RELOAD_EVERY_S = 5.0


class DecryptionError(PermanentError):
    """When a sealed record or blob does not authenticate (tampered, truncated) or its key is unknown."""


def parse_keys(text: str, origin: str) -> list[tuple[str, bytes]]:
    """`kid:base64` items (commas or new lines; `#` starts a comment), in order; each key 32 bytes."""
    keys: list[tuple[str, bytes]] = []
    for raw in text.replace(",", "\n").splitlines():
        item = raw.split("#", 1)[0].strip()
        if not item:
            continue
        kid, sep, material = item.partition(":")
        kid = kid.strip()
        if not sep or not kid or not kid.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigurationError(f"{origin}: key entries are 'kid:base64key' with kid in [A-Za-z0-9._-]")
        key = _b64(material.strip())
        if key is None:
            raise ConfigurationError(f"{origin}: key {kid!r} is not base64")
        if len(key) != KEY_BYTES:
            raise ConfigurationError(f"{origin}: key {kid!r} has {len(key)} bytes; AES-256 needs {KEY_BYTES} "
                                     "(make one with: relais keys new KID)")
        keys.append((kid, key))
    return keys


class Keyring:
    """The key-encryption keys: one current (encrypts), every listed one decrypts; reloads its file."""

    def __init__(self, keys: list[tuple[str, bytes]], current: str | None = None, *,
                 env_keys: list[tuple[str, bytes]] | None = None, path: Path | None = None) -> None:
        self._env_keys = list(env_keys or [])
        self._wanted_current = current
        self._path = path
        self._mtime: int | None = None
        self._next_check = 0.0
        self._install(keys)

    def _install(self, file_keys: list[tuple[str, bytes]]) -> None:
        ordered = [*file_keys, *self._env_keys]
        if not ordered:
            raise ConfigurationError("encryption is configured but no key was found")
        keys: dict[str, bytes] = {}
        for kid, key in ordered:
            if kid in keys and keys[kid] != key:
                raise ConfigurationError(f"encryption key id {kid!r} is listed twice with different keys")
            keys[kid] = key
        current = self._wanted_current or ordered[0][0]
        if current not in keys:
            raise ConfigurationError(f"RELAIS_ENCRYPTION_KEY_ID={current} is not among the configured keys")
        self.keys, self.current = keys, current

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring | None:
        """The keyring the settings describe, or None when encryption at rest is off."""
        env = parse_keys(settings.encryption_keys, "RELAIS_ENCRYPTION_KEYS") if settings.encryption_keys else []
        path = settings.encryption_keys_file
        if path is None and not env:
            return None
        ring = cls(cls._read(path) if path else [], settings.encryption_key_id, env_keys=env, path=path)
        if path is not None:
            ring._mtime = file_stamp(path)
            ring._next_check = time.monotonic() + RELOAD_EVERY_S
        return ring

    @staticmethod
    def _read(path: Path) -> list[tuple[str, bytes]]:
        try:
            return parse_keys(Path(path).read_text(encoding="utf-8"), str(path))
        except OSError as exc:
            raise ConfigurationError(f"cannot read encryption keys file {path}: {exc}") from exc

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the keys file when it changed (checked at most every few seconds); keeps the old keys
        when the new file is unreadable or invalid, so a bad edit never stops the broker."""
        if self._path is None or (not force and time.monotonic() < self._next_check):
            return
        self._next_check = time.monotonic() + RELOAD_EVERY_S
        mtime = file_stamp(self._path)
        if mtime is None or mtime == self._mtime:
            return
        try:
            self._install(self._read(self._path))
            self._mtime = mtime
        except ConfigurationError:
            log.error("encryption keys file changed but is invalid; keeping the previous keys",
                                       path=str(self._path))

    # --- primitives --------------------------------------------------------------------------
    def _kek(self, kid: str) -> bytes:
        self.refresh()
        key = self.keys.get(kid)
        if key is None:
            self.refresh(force=True)
            key = self.keys.get(kid)
        if key is None:
            raise DecryptionError(f"unknown encryption key id {kid!r} (was it removed before the records expired?)")
        return key

    def seal(self, data: bytes, aad: bytes) -> tuple[bytes, str, bytes]:
        """`nonce | AES-GCM(dek, data, aad)`, the current key id, and the DEK wrapped by that key."""
        self.refresh()
        dek = AESGCM.generate_key(bit_length=256)
        nonce = secrets.token_bytes(NONCE_BYTES)
        kid = self.current
        wrapped = aes_key_wrap(self.keys[kid], dek)
        return nonce + AESGCM(dek).encrypt(nonce, data, aad), kid, wrapped

    def open_(self, sealed: bytes, kid: str, wrapped: bytes, aad: bytes) -> bytes:
        """The plaintext of `seal`'s output; DecryptionError when anything does not authenticate."""
        kek = self._kek(kid)
        try:
            dek = aes_key_unwrap(kek, wrapped)
            if len(sealed) < NONCE_BYTES + 16:
                raise DecryptionError("sealed value is truncated")
            return AESGCM(dek).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
        except (InvalidTag, InvalidUnwrap, ValueError) as exc:
            raise DecryptionError(f"sealed value does not authenticate with key {kid!r} "
                                  "(tampered or truncated)") from exc

    # --- blobs -------------------------------------------------------------------------------
    def seal_blob(self, data: bytes, aad: bytes) -> bytes:
        """A self-describing sealed blob: magic, key id, wrapped DEK, then nonce and ciphertext."""
        sealed, kid, wrapped = self.seal(data, aad)
        k = kid.encode()
        return BLOB_MAGIC + struct.pack(">HH", len(k), len(wrapped)) + k + wrapped + sealed

    def open_blob(self, blob: bytes, aad: bytes) -> bytes:
        """The plaintext of a sealed blob."""
        if not is_sealed_blob(blob) or len(blob) < len(BLOB_MAGIC) + 4:
            raise DecryptionError("blob is not sealed by Relais")
        klen, wlen = struct.unpack(">HH", blob[4:8])
        kid = blob[8:8 + klen].decode(errors="replace")
        wrapped = blob[8 + klen:8 + klen + wlen]
        return self.open_(blob[8 + klen + wlen:], kid, wrapped, aad)


def blob_key_id(blob: bytes) -> str:
    """The id of the key that seals `blob` (a sealed blob's header; the first few hundred bytes suffice)."""
    if not is_sealed_blob(blob) or len(blob) < len(BLOB_MAGIC) + 4:
        raise DecryptionError("blob is not sealed by Relais")
    klen = struct.unpack(">H", blob[4:6])[0]
    return blob[8:8 + klen].decode(errors="replace")


def is_sealed_blob(blob: bytes) -> bool:
    """True when `blob` was written by `Keyring.seal_blob`."""
    return blob[:len(BLOB_MAGIC)] == BLOB_MAGIC


def _b64(text: str) -> bytes | None:
    padded = text + "=" * (-len(text) % 4)
    for altchars in (None, b"-_"):
        try:
            return base64.b64decode(padded, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
    return None


def _aad(env: Envelope) -> bytes:
    return f"relais/1|{env.transfer_id}|{env.id}".encode()


def seal_envelope(keyring: Keyring | None, env: Envelope) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The record value and headers to write for `env`: sealed when a keyring is configured.

    A record that could not be decrypted (on its way to the poison topic) is written exactly as read,
    so an operator can examine what arrived.
    """
    if keyring is None or X_DECRYPT_ERROR in env.extra:
        return env.data, env.to_headers()
    sealed, kid, wrapped = keyring.seal(env.data, _aad(env))
    extra = {**{k: v for k, v in env.extra.items() if k not in _ENC_ATTRS},
             X_ENC_KID: kid, X_ENC_DEK: base64.b64encode(wrapped).decode()}
    return sealed, replace(env, extra=extra).to_headers()


def open_envelope(keyring: Keyring | None, env: Envelope) -> Envelope:
    """`env` with its value decrypted (plaintext records pass as they are); a record that does not
    decrypt keeps its sealed value and gains the `decrypterror` attribute (the runner poisons it)."""
    kid = env.extra.get(X_ENC_KID)
    if kid is None:
        return env
    try:
        if keyring is None:
            raise DecryptionError(f"record is encrypted (key {kid!r}) but no encryption key is configured "
                                  "(RELAIS_ENCRYPTION_KEYS / RELAIS_ENCRYPTION_KEYS_FILE)")
        try:
            wrapped = base64.b64decode(env.extra.get(X_ENC_DEK, ""), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DecryptionError("record's wrapped data key (ce_encdek) is not base64") from exc
        data = keyring.open_(env.data, kid, wrapped, _aad(env))
    except DecryptionError as exc:
        return replace(env, extra={**env.extra, X_DECRYPT_ERROR: str(exc)})
    return replace(env, data=data, extra={k: v for k, v in env.extra.items() if k not in _ENC_ATTRS})


def new_key(kid: str) -> str:
    """A fresh key entry `kid:base64`."""
    return f"{kid}:{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()}"
