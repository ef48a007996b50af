"""Compare-and-set on S3 objects, for what two DAG runs may write at once (a run's claim, the model
registry's versions, production pointer and history): a conditional PUT, ``If-None-Match: *`` to create
an object only if there is none, ``If-Match: "<etag>"`` to replace it only if it is still the version
read. The local S3 (SeaweedFS 4.48) honours both, atomically (checked with 8 writers racing on one key:
exactly one wins each time), as AWS S3 and MinIO do; the loser gets ``412 PreconditionFailed``.

:class:`essp.clients.s3.ObjectStore` has no conditional write yet, so this module sends the request through
its MinIO client's ``_put_object`` (the public ``put_object`` takes no request headers). A request whose
first attempt won but whose answer was lost is retried by the HTTP pool and fails its condition: a
failed condition is therefore checked against what the object now holds (ours: we won).
"""

from __future__ import annotations

from dataclasses import dataclass

import urllib3
from minio.error import S3Error

from essp.clients.s3 import ObjectStore
from essp.errors import EsspError, ServiceUnavailable

_CONFLICTS = ("PreconditionFailed", "ConditionalRequestConflict")


@dataclass(frozen=True)
class Versioned:
    """An object's bytes and the ETag of that very version (one GET: both come from one response)."""

    data: bytes
    etag: str


def read_versioned(store: ObjectStore, bucket: str, key: str) -> Versioned | None:
    """The object with its ETag, or None when there is none (nor its bucket)."""
    try:
        response = store.client.get_object(bucket, key)
        try:
            data = response.read()
            etag = (response.headers.get("ETag") or "").strip('"')
        finally:
            response.close()
            response.release_conn()
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchObject", "NoSuchBucket"):
            return None
        raise EsspError(f"s3://{bucket}/{key}: S3 error {exc.code}: {exc.message}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise ServiceUnavailable("S3", store.settings.s3_url, exc) from None
    return Versioned(data, etag)


def put_if(store: ObjectStore, bucket: str, key: str, data: bytes, *, etag: str | None,
           content_type: str = "application/json") -> str | None:
    """Write the object only if it is still version ``etag`` (None: only if there is no such object);
    returns the new ETag, or None when another writer got there first (read it again and decide again)."""
    condition = {"If-Match": f'"{etag}"'} if etag else {"If-None-Match": "*"}
    try:
        written = store.client._put_object(bucket, key, data, {"Content-Type": content_type, **condition})
    except S3Error as exc:
        if exc.code not in _CONFLICTS:
            raise EsspError(f"s3://{bucket}/{key}: conditional write refused: S3 error {exc.code}: "
                            f"{exc.message}") from None
        current = read_versioned(store, bucket, key)
        return current.etag if current is not None and current.data == data else None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise ServiceUnavailable("S3", store.settings.s3_url, exc) from None
    return (getattr(written, "etag", None) or "").strip('"')
