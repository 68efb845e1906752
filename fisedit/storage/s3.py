"""Objects in an S3-compatible bucket (AWS, MinIO, Ceph), under an optional key prefix."""

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import IO, Literal

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fisedit.storage.base import ObjectStore, StoreNotFoundError, validate_key

MiB = 1 << 20
_MAX_PARTS = 10_000
# 412: the key exists. 409: a concurrent conditional write to the key is in flight.
_LOST_CREATE_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
_MISSING_CODES = {"404", "NoSuchKey"}


class S3Config(BaseModel):
    """Which bucket and prefix an S3 store uses and how its client talks to the endpoint.

    Credentials come from boto3's standard chain (environment, profile, instance role).
    create_only needs an endpoint that honours If-None-Match on PutObject and
    CompleteMultipartUpload (AWS S3, recent MinIO and Ceph).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket: str = Field(min_length=1)
    prefix: str = Field("", description="Key prefix of every object, without slashes at the ends.")
    endpoint_url: str | None = Field(None, description="None for AWS; e.g. a MinIO or Ceph URL.")
    region: str | None = Field(None, description="None takes boto3's configured region.")
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    multipart_threshold: int = Field(8 * MiB, ge=1, description="Larger objects go multipart.")
    part_size: int = Field(8 * MiB, ge=5 * MiB, description="S3's minimum for all but the last.")
    max_attempts: int = Field(5, ge=1, description="Attempts per request, standard retry mode.")
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, prefix: str) -> str:
        prefix = prefix.strip("/")
        return validate_key(prefix) if prefix else prefix


class S3ObjectStore(ObjectStore):
    """Key ``k`` is the object ``prefix/k`` in the bucket."""

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            config=Config(
                # Presigned URLs would otherwise use SigV2, which newer regions reject.
                signature_version="s3v4",
                retries={"mode": "standard", "max_attempts": config.max_attempts},
                connect_timeout=config.connect_timeout_s,
                read_timeout=config.read_timeout_s,
                s3={"addressing_style": config.addressing_style},
            ),
        )
        self._root = f"{config.prefix}/" if config.prefix else ""

    @property
    def url(self) -> str:
        return f"s3://{self.config.bucket}/{self.config.prefix}"

    def _location(self, key: str) -> dict[str, str]:
        return {"Bucket": self.config.bucket, "Key": self._root + key}

    def _no_bucket(self) -> StoreNotFoundError:
        endpoint = self.config.endpoint_url or "AWS"
        return StoreNotFoundError(
            self.url, f"bucket {self.config.bucket!r} does not exist at {endpoint}"
        )

    @contextmanager
    def _in_bucket(self) -> Iterator[None]:
        """Raises StoreNotFoundError for S3's answer that the bucket does not exist."""
        try:
            yield
        except ClientError as error:
            if _code(error) == "NoSuchBucket":
                raise self._no_bucket() from None
            raise

    def _write(self, key: str, stream: IO[bytes], size: int, create_only: bool) -> bool:
        condition = {"IfNoneMatch": "*"} if create_only else {}
        try:
            with self._in_bucket():
                self._upload(key, stream, size, condition)
        except ClientError as error:
            # A retried write whose first attempt landed unseen also ends here, as a loss.
            if create_only and _code(error) in _LOST_CREATE_CODES:
                return False
            raise
        return True

    def _upload(self, key: str, stream: IO[bytes], size: int, condition: dict[str, str]) -> None:
        if size > self.config.multipart_threshold:
            self._multipart_upload(key, stream, size, condition)
        else:
            self._client.put_object(**self._location(key), Body=stream, **condition)

    def _multipart_upload(
        self, key: str, stream: IO[bytes], size: int, condition: dict[str, str]
    ) -> None:
        location = self._location(key)
        # Parts carry the checksum botocore adds by default (as boto3's own transfer manager
        # does): AWS rejects parts whose checksum the upload was not created with.
        checksum = (
            {"ChecksumAlgorithm": "CRC32"}
            if self._client.meta.config.request_checksum_calculation == "when_supported"
            else {}
        )
        part_size = max(self.config.part_size, -(-size // _MAX_PARTS))
        upload_id = self._client.create_multipart_upload(**location, **checksum)["UploadId"]
        try:
            parts = []
            for number, chunk in enumerate(iter(lambda: stream.read(part_size), b""), start=1):
                response = self._client.upload_part(
                    **location, UploadId=upload_id, PartNumber=number, Body=chunk, **checksum
                )
                part = {"PartNumber": number, "ETag": response["ETag"]}
                if "ChecksumCRC32" in response:
                    part["ChecksumCRC32"] = response["ChecksumCRC32"]
                parts.append(part)
            self._client.complete_multipart_upload(
                **location, UploadId=upload_id, MultipartUpload={"Parts": parts}, **condition
            )
        except BaseException:
            # An unfinished upload keeps its parts, and their cost, until aborted; a failed
            # abort must not hide the error that got us here.
            with suppress(BotoCoreError, ClientError):
                self._client.abort_multipart_upload(**location, UploadId=upload_id)
            raise

    def _open(self, key: str) -> IO[bytes] | None:
        try:
            with self._in_bucket():
                return self._client.get_object(**self._location(key))["Body"]
        except ClientError as error:
            if _code(error) in _MISSING_CODES:
                return None
            raise

    def _exists(self, key: str) -> bool:
        try:
            self._client.head_object(**self._location(key))
            return True
        except ClientError as error:
            if _code(error) not in _MISSING_CODES:
                raise
        # HEAD answers have no body: this 404 means no such key, or no such bucket.
        try:
            self._client.head_bucket(Bucket=self.config.bucket)
        except ClientError as error:
            if _code(error) in {"404", "NoSuchBucket"}:
                raise self._no_bucket() from None
            if _code(error) not in {"403", "AccessDenied"}:  # 403: it exists, not ours to list
                raise
        return False

    def _delete(self, key: str) -> None:
        with self._in_bucket():
            self._client.delete_object(**self._location(key))

    def _presign_get(self, key: str, expires_s: int) -> str:
        return self._client.generate_presigned_url(
            "get_object", Params=self._location(key), ExpiresIn=expires_s
        )

    def _list(self, prefix: str) -> Iterator[str]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.config.bucket, Prefix=self._root + prefix
        )
        with self._in_bucket():
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"].removeprefix(self._root)


def _code(error: ClientError) -> str:
    return error.response.get("Error", {}).get("Code", "")
