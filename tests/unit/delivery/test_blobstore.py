"""Claim check: the local blob store round-trips and verifies; SigV4 matches AWS's published examples."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.core.blobstore import (
    EMPTY_SHA256,
    BlobIntegrityError,
    BlobRef,
    LocalBlobStore,
    resolve_payload,
    sigv4_headers,
)

AWS_KEY, AWS_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


async def test_local_round_trip_and_idempotent_put(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    ref = await store.put(b"bundle bytes")
    assert ref == await store.put(b"bundle bytes")
    assert ref.sha256 == hashlib.sha256(b"bundle bytes").hexdigest() and ref.size == 12
    assert await store.get(ref) == b"bundle bytes"
    assert await resolve_payload(store, b"", ref.to_extra()) == b"bundle bytes"
    assert await resolve_payload(store, b"inline", {}) == b"inline"
    assert BlobRef.from_extra(ref.to_extra()) == ref


async def test_local_refuses_corrupt_or_missing_blobs(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    ref = await store.put(b"original")
    (tmp_path / ref.sha256[:2] / ref.sha256).write_bytes(b"tampered")
    with pytest.raises(BlobIntegrityError, match="SHA-256"):
        await store.get(ref)
    with pytest.raises(BlobIntegrityError, match="missing"):
        await store.get(BlobRef("local:" + "0" * 64, "0" * 64, 1))


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
