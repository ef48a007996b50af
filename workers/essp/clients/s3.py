"""S3 (MinIO in production, SeaweedFS locally): a small typed object store over the MinIO client."""

from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import urllib3
from minio import Minio
from minio.error import S3Error

from essp.errors import EsspError, ServiceUnavailable
from essp.settings import Settings


class ObjectNotFound(EsspError, FileNotFoundError):
    """The object (or its bucket) does not exist."""


_CONFLICTS = ("PreconditionFailed", "ConditionalRequestConflict")


@dataclass(frozen=True)
class Versioned:
    """An object's bytes and the ETag of that very version (one GET: both come from one response)."""

    data: bytes
    etag: str


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not uri.startswith("s3://"):
            raise ValueError(f"{uri!r} is not an s3:// URI")
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket or not key:
            raise ValueError(f"{uri!r} must name a bucket and a key: s3://BUCKET/KEY")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class ObjectInfo:
    """What S3 says about one object (a listing entry or a HEAD)."""

    key: str
    size: int
    etag: str  # without quotes; an MD5 of the bytes for a single-part upload, "<md5>-<parts>" for multipart
    last_modified: dt.datetime | None
    metadata: dict[str, str] = field(default_factory=dict)  # user metadata (x-amz-meta-NAME as NAME); stat only


def _etag(value: str | None) -> str:
    return (value or "").strip().strip('"')


def _user_metadata(headers) -> dict[str, str]:  # noqa: ANN001 - a dict or urllib3's HTTPHeaderDict
    prefix = "x-amz-meta-"
    return {k.lower()[len(prefix):]: v for k, v in (headers or {}).items() if k.lower().startswith(prefix)}


class ObjectStore:
    """Buckets and objects on one S3 endpoint. Errors name the endpoint or the object's URI."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.endpoint = settings.s3_endpoint
        # Fail fast when the endpoint is down instead of retrying for minutes.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=3, read=60),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
            maxsize=16,
        )
        self.client = Minio(
            settings.s3_endpoint,
            access_key=settings.secret("s3_access_key"),
            secret_key=settings.secret("s3_secret_key"),
            secure=settings.s3_secure,
            region=settings.s3_region,
            http_client=http,
        )

    def _unavailable(self, exc: Exception) -> ServiceUnavailable:
        return ServiceUnavailable("S3", self.settings.s3_url, exc)

    def _call(self, what: str, fn, *args, **kwargs):  # noqa: ANN001, ANN202
        try:
            return fn(*args, **kwargs)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                raise ObjectNotFound(f"{what}: {exc.code} ({exc.message})") from None
            raise EsspError(f"{what}: S3 error {exc.code}: {exc.message}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._unavailable(exc) from None

    def check(self) -> None:
        """List buckets once: proves the endpoint answers and the credentials are accepted."""
        self._call(f"S3 at {self.settings.s3_url}", self.client.list_buckets)

    def ensure_bucket(self, bucket: str) -> None:
        if not self._call(f"s3://{bucket}", self.client.bucket_exists, bucket):
            try:
                self._call(f"s3://{bucket}", self.client.make_bucket, bucket)
            except EsspError as exc:  # another process made it first
                if "BucketAlreadyOwnedByYou" not in str(exc) and "BucketAlreadyExists" not in str(exc):
                    raise

    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream",
                  metadata: dict[str, str] | None = None) -> S3Uri:
        """Write one object; ``metadata`` becomes its user metadata (x-amz-meta-NAME, read back by :meth:`stat`)."""
        self.put_object(bucket, key, data, content_type=content_type, metadata=metadata)
        return S3Uri(bucket, key)

    def put_object(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream",
                   metadata: dict[str, str] | None = None) -> str:
        """:meth:`put_bytes`, returning the written object's ETag (without quotes)."""
        written = self._call(f"s3://{bucket}/{key}", self.client.put_object, bucket, key, io.BytesIO(data),
                             len(data), content_type=content_type, metadata=metadata)
        return _etag(getattr(written, "etag", None))

    # -- compare-and-set, for what two DAG runs may write at once (a run's claim, the model registry) --
    # A conditional PUT: ``If-None-Match: *`` creates the object only if there is none, ``If-Match:
    # "<etag>"`` replaces it only if it is still the version read. The local S3 (SeaweedFS 4.48) honours
    # both atomically (8 writers racing on one key: exactly one wins each time), as AWS S3 and MinIO do;
    # the loser gets 412 PreconditionFailed. MinIO's public put_object takes no request headers (it turns
    # them into user metadata), so the request goes through its _put_object, here and only here.

    def get_versioned(self, bucket: str, key: str) -> Versioned | None:
        """The object with its ETag, or None when there is none (nor its bucket)."""
        try:
            response = self.client.get_object(bucket, key)
            try:
                data = response.read()
                etag = _etag(response.headers.get("ETag"))
            finally:
                response.close()
                response.release_conn()
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NoSuchBucket"):
                return None
            raise EsspError(f"s3://{bucket}/{key}: S3 error {exc.code}: {exc.message}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._unavailable(exc) from None
        return Versioned(data, etag)

    def put_if(self, bucket: str, key: str, data: bytes, *, etag: str | None,
               content_type: str = "application/json") -> str | None:
        """Write the object only if it is still version ``etag`` (None: only if there is no such object);
        returns the new ETag, or None when another writer got there first (read it again, decide again).

        A request whose first attempt won but whose answer was lost is retried by the HTTP pool and fails
        its condition: a failed condition is therefore checked against what the object now holds."""
        condition = {"If-Match": f'"{etag}"'} if etag else {"If-None-Match": "*"}
        try:
            written = self.client._put_object(bucket, key, data, {"Content-Type": content_type, **condition})
        except S3Error as exc:
            if exc.code not in _CONFLICTS:
                raise EsspError(f"s3://{bucket}/{key}: conditional write refused: S3 error {exc.code}: "
                                f"{exc.message}") from None
            current = self.get_versioned(bucket, key)
            return current.etag if current is not None and current.data == data else None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._unavailable(exc) from None
        return _etag(getattr(written, "etag", None))

    def get_bytes(self, bucket: str, key: str) -> bytes:
        def read() -> bytes:
            response = self.client.get_object(bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call(f"s3://{bucket}/{key}", read)

    def stream(self, bucket: str, key: str, chunk_size: int = 64 * 1024) -> Iterator[bytes]:
        """The object's bytes in chunks, read as they are consumed (ObjectNotFound before the first
        chunk when there is no such object). Closing the iterator releases the connection."""
        response = self._call(f"s3://{bucket}/{key}", self.client.get_object, bucket, key)

        def chunks() -> Iterator[bytes]:
            try:
                yield from response.stream(chunk_size)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise self._unavailable(exc) from None
            finally:
                response.close()
                response.release_conn()

        return chunks()

    def put_json(self, bucket: str, key: str, value: Any) -> S3Uri:
        return self.put_bytes(bucket, key, json.dumps(value, indent=2, sort_keys=True).encode(),
                              content_type="application/json")

    def get_json(self, bucket: str, key: str) -> Any:
        return json.loads(self.get_bytes(bucket, key))

    def bucket_exists(self, bucket: str) -> bool:
        return bool(self._call(f"s3://{bucket}", self.client.bucket_exists, bucket))

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self._call(f"s3://{bucket}/{key}", self.client.stat_object, bucket, key)
        except ObjectNotFound:
            return False
        return True

    def stat(self, bucket: str, key: str) -> ObjectInfo:
        """Size, ETag, last modification and user metadata of one object (ObjectNotFound if none)."""
        obj = self._call(f"s3://{bucket}/{key}", self.client.stat_object, bucket, key)
        return ObjectInfo(key=key, size=int(obj.size or 0), etag=_etag(obj.etag), last_modified=obj.last_modified,
                          metadata=_user_metadata(obj.metadata))

    def list_keys(self, bucket: str, prefix: str = "") -> Iterator[str]:
        objects = self._call(f"s3://{bucket}/{prefix}", self.client.list_objects, bucket,
                             prefix=prefix, recursive=True)
        try:
            for obj in objects:
                yield obj.object_name
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                raise ObjectNotFound(f"s3://{bucket}: NoSuchBucket") from None
            raise
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._unavailable(exc) from None

    def list_prefixes(self, bucket: str, prefix: str = "") -> list[str]:
        """The "folders" right under ``prefix`` (names ending in '/', without the prefix), sorted;
        ObjectNotFound when the bucket does not exist."""
        found = self._call(f"s3://{bucket}/{prefix}",
                           lambda: list(self.client.list_objects(bucket, prefix=prefix or None, recursive=False)))
        return sorted((o.object_name or "")[len(prefix):] for o in found if o.is_dir)

    def list_objects(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under `prefix` (recursively), with size, ETag and last modification; ObjectNotFound
        when the bucket does not exist."""
        objects = self._call(f"s3://{bucket}/{prefix}", self.client.list_objects, bucket,
                             prefix=prefix, recursive=True)
        try:
            for obj in objects:
                if obj.is_dir:
                    continue
                yield ObjectInfo(key=obj.object_name, size=int(obj.size or 0), etag=_etag(obj.etag),
                                 last_modified=obj.last_modified)
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                raise ObjectNotFound(f"s3://{bucket}: NoSuchBucket") from None
            raise EsspError(f"s3://{bucket}/{prefix}: S3 error {exc.code}: {exc.message}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._unavailable(exc) from None

    def delete(self, bucket: str, key: str) -> None:
        self._call(f"s3://{bucket}/{key}", self.client.remove_object, bucket, key)

    def delete_bucket(self, bucket: str) -> None:
        """Delete every object of the bucket, then the bucket (tests and teardown)."""
        for key in list(self.list_keys(bucket)):
            self.delete(bucket, key)
        self._call(f"s3://{bucket}", self.client.remove_bucket, bucket)
