"""Claim check: the local blob store round-trips and verifies; SigV4 matches AWS's published examples."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.core.blobstore import (
    EMPTY_SHA256,
    BlobIntegrityError,
    BlobRef,
    BlobStoreUnavailable,
    LocalBlobStore,
    prune_blobs_periodically,
    resolve_payload,
    sigv4_headers,
)
from services.core.crypto import Keyring, new_key, parse_keys
from services.core.errors import TransientError
from services.core.settings import Settings
from tests.support.kafka import wait_for

AWS_KEY, AWS_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


async def test_local_round_trip_under_random_names(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    ref = await store.put(b"bundle bytes")
    again = await store.put(b"bundle bytes")
    assert ref.uri != again.uri  # a name says nothing about the content, not even "same as before"
    assert ref.sha256 == hashlib.sha256(b"bundle bytes").hexdigest() and ref.size == 12
    assert await store.get(ref) == b"bundle bytes"
    assert await resolve_payload(store, b"", ref.to_extra()) == b"bundle bytes"
    assert await resolve_payload(store, b"inline", {}) == b"inline"
    assert BlobRef.from_extra(ref.to_extra()) == ref
    assert {p.name for p in store.names()} == {ref.name, again.name}
    assert hashlib.sha256(b"bundle bytes").hexdigest() not in {p.name for p in tmp_path.rglob("*")}


async def test_local_refuses_corrupt_or_missing_blobs(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    ref = await store.put(b"original")
    (tmp_path / ref.name[:2] / ref.name).write_bytes(b"tampered")
    with pytest.raises(BlobIntegrityError, match="SHA-256"):
        await store.get(ref)
    with pytest.raises(BlobIntegrityError, match="missing"):
        await store.get(BlobRef("local:" + "0" * 64, "0" * 64, 1))
    with pytest.raises(BlobIntegrityError, match="does not name"):
        await store.get(BlobRef("local:../../etc/passwd", "0" * 64, 1))


async def test_sealed_blobs_keep_their_sha256_inside_and_still_detect_tampering(tmp_path: Path) -> None:
    keyring = Keyring(parse_keys(new_key("k1"), "test"))
    store = LocalBlobStore(tmp_path, keyring)
    ref = await store.put(b"secret bundle")
    assert ref.sha256 == ""  # nothing about the content outside the sealed blob
    assert await store.get(ref) == b"secret bundle"
    path = tmp_path / ref.name[:2] / ref.name
    blob = path.read_bytes()
    path.write_bytes(blob[:-3] + bytes([blob[-3] ^ 1]) + blob[-2:])
    with pytest.raises(BlobIntegrityError, match="authenticate"):
        await store.get(ref)


async def test_a_blob_named_by_sha256_before_random_names_still_reads_and_reseals(tmp_path: Path) -> None:
    old, new = new_key("old"), new_key("new")
    data = b"written by an earlier Relais"
    sha = hashlib.sha256(data).hexdigest()
    legacy = Keyring(parse_keys(old, "test")).seal_blob(data, f"relais-blob/1|{sha}".encode())
    (tmp_path / sha[:2]).mkdir()
    (tmp_path / sha[:2] / sha).write_bytes(legacy)
    ref = BlobRef(f"local:{sha}", sha, len(data))
    assert await LocalBlobStore(tmp_path, Keyring(parse_keys(old, "test"))).get(ref) == data
    both = Keyring(parse_keys(f"{new},{old}", "test"))
    store = LocalBlobStore(tmp_path, both)
    assert store.key_ids() == {"old": 1}
    assert store.reseal_all(both) == (1, 1) and store.key_ids() == {"new": 1}
    assert await LocalBlobStore(tmp_path, Keyring(parse_keys(new, "test"))).get(ref) == data  # old key gone


async def test_an_unwritable_blob_store_is_a_transient_fault(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    store = LocalBlobStore(tmp_path / "file" / "blobs")
    with pytest.raises(BlobStoreUnavailable) as caught:
        await store.put(b"x" * 100)
    assert isinstance(caught.value, TransientError) and "RELAIS_BLOB_DIR" in str(caught.value)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem (needs root: the CI and this machine run tests as root)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        # Not counted as passing: test_a_write_the_os_refuses_is_a_transient_fault covers it without root.
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN (.ci/run runs as root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


async def test_a_full_disk_is_a_transient_fault_and_space_back_means_writes_again(tiny_tmpfs: Path) -> None:
    store = LocalBlobStore(tiny_tmpfs / "blobs")
    refs = []
    with pytest.raises(BlobStoreUnavailable, match="No space left"):
        for _ in range(100):
            refs.append(await store.put(os.urandom(16 * 1024)))
    assert not list(tiny_tmpfs.rglob(".tmp-*"))  # no half-written leftovers
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    with pytest.raises(BlobStoreUnavailable, match="Read-only"):
        await store.put(b"y")
    subprocess.run(["mount", "-o", "remount,rw", str(tiny_tmpfs)], check=True)
    for path in list(store.names())[:2]:
        path.unlink()
    assert await store.get(await store.put(b"fits again")) == b"fits again"


def test_a_write_the_os_refuses_is_a_transient_fault(tmp_path: Path) -> None:
    """A real refusal by the kernel without root: a process whose file-size limit is smaller than the blob."""
    script = f"""
import asyncio, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from services.core.blobstore import BlobStoreUnavailable, LocalBlobStore
from services.core.errors import TransientError
try:
    asyncio.run(LocalBlobStore({str(tmp_path)!r}).put(b"x" * 65536))
except BlobStoreUnavailable as exc:
    print("transient:", isinstance(exc, TransientError), exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[3])
    assert done.stdout.startswith("transient: True") and "File too large" in done.stdout, done.stdout + done.stderr
    assert not list(tmp_path.rglob(".tmp-*"))  # the half-written file is gone


def test_prune_removes_blobs_past_retention_only(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    old = asyncio.run(store.put(b"old"))
    new = asyncio.run(store.put(b"new"))
    stale_tmp = tmp_path / old.name[:2] / ".tmp-abandoned"
    stale_tmp.write_bytes(b"half")
    past = time.time() - 10 * 86400
    for path in (tmp_path / old.name[:2] / old.name, stale_tmp):
        os.utime(path, (past, past))
    assert store.prune(7 * 86400) == 2
    assert [p.name for p in store.names()] == [new.name]


def test_sigv4_matches_the_aws_s3_get_object_example() -> None:
    # docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html, "GET Object".
    headers = sigv4_headers("GET", "https://examplebucket.s3.amazonaws.com/test.txt", {"Range": "bytes=0-9"},
                            EMPTY_SHA256, access_key=AWS_KEY, secret_key=AWS_SECRET, region="us-east-1",
                            now=datetime(2013, 5, 24, tzinfo=UTC))
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")


def test_sigv4_matches_the_aws_s3_put_object_example() -> None:
    body = b"Welcome to Amazon S3."
    headers = sigv4_headers(
        "PUT", "https://examplebucket.s3.amazonaws.com/test$file.text",
        {"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"},
        hashlib.sha256(body).hexdigest(), access_key=AWS_KEY, secret_key=AWS_SECRET, region="us-east-1",
        now=datetime(2013, 5, 24, tzinfo=UTC))
    assert headers["Authorization"].endswith(
        "Signature=98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd")


async def test_the_running_broker_prunes_blobs_past_both_retentions(tmp_path: Path) -> None:
    settings = Settings(blob_dir=tmp_path, topic_retention_days=1, dlq_retention_days=2)
    store = LocalBlobStore(tmp_path)
    kept, gone = await store.put(b"still a dead letter"), await store.put(b"four days old")
    for ref, days in ((kept, 2.5), (gone, 4)):
        moment = time.time() - days * 86400
        os.utime(tmp_path / ref.name[:2] / ref.name, (moment, moment))
    stop = asyncio.Event()
    task = asyncio.create_task(prune_blobs_periodically(settings, stop, every_s=0.05))
    await wait_for(lambda: _true(len(list(store.names())) == 1), timeout_s=5, interval_s=0.02)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert [p.name for p in store.names()] == [kept.name]


async def _true(value: bool) -> bool:
    return value
