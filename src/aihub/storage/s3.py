"""S3 and S3-compatible stores (AWS, MinIO, Cloudflare R2, ...): SigV4 over async httpx.

Every request is signed with AWS Signature Version 4 (an `Authorization` header, the payload's
SHA-256 signed too); browser links are SigV4 presigned URLs with `UNSIGNED-PAYLOAD`, as botocore's
`generate_presigned_url` makes them, an upload link also bound to its `Content-Type`. Buckets are
addressed path-style (`endpoint/bucket/key`, what MinIO and R2 expect) or virtual-host style
(`bucket.endpoint/key`, AWS's default).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree

import httpx

from aihub.storage.base import (
    DEFAULT_RETRIES,
    ObjectNotFound,
    Retries,
    Storage,
    StoredObject,
    check_key,
)

MAX_URL_SECONDS = 7 * 24 * 3600
"""The longest a SigV4 presigned URL may be valid."""

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_HASH_IN_THREAD_BYTES = 256 * 1024
_DELETE_CONCURRENCY = 8


class S3Error(OSError):
    """The store could not be reached, or refused or failed the request."""


@dataclass(frozen=True, slots=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def default_endpoint(region: str) -> str:
    return f"https://s3.{region}.amazonaws.com"


def canonical_query(params: Mapping[str, str]) -> str:
    """Parameters percent-encoded (only `-_.~` left as they are) and sorted by name."""
    encoded = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in params.items())
    return "&".join(f"{k}={v}" for k, v in encoded)


def expiry_seconds(now: datetime, expires_at: datetime) -> int:
    """Seconds from `now` to `expires_at`, within what a presigned URL allows (1 s to 7 days)."""
    return max(1, min(MAX_URL_SECONDS, int((expires_at - now).total_seconds())))


class SigV4Signer:
    """AWS Signature Version 4 for one set of credentials, region and service."""

    def __init__(self, credentials: S3Credentials, region: str, service: str = "s3") -> None:
        self.credentials, self.region, self.service = credentials, region, service

    def scope(self, timestamp: str) -> str:
        return f"{timestamp[:8]}/{self.region}/{self.service}/aws4_request"

    def signature(self, timestamp: str, canonical_request: str) -> str:
        string_to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256",
                timestamp,
                self.scope(timestamp),
                hashlib.sha256(canonical_request.encode()).hexdigest(),
            ]
        )
        key = f"AWS4{self.credentials.secret_access_key}".encode()
        for part in (timestamp[:8], self.region, self.service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()

    def presign(
        self,
        method: str,
        url: str,
        *,
        now: datetime,
        expires_at: datetime,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
    ) -> str:
        """`url` (no query of its own) with the query that authorizes `method` on it until
        `expires_at`; `headers` (besides `host`) must then be sent exactly as given. `query`:
        parameters signed with it (`response-content-disposition`)."""
        timestamp = _timestamp(now)
        signed = _canonical_headers(url, headers or {})
        params = {
            "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
            "X-Amz-Credential": f"{self.credentials.access_key_id}/{self.scope(timestamp)}",
            "X-Amz-Date": timestamp,
            "X-Amz-Expires": str(expiry_seconds(now, expires_at)),
            "X-Amz-SignedHeaders": ";".join(signed),
            **(query or {}),
        }
        if self.credentials.session_token:
            params["X-Amz-Security-Token"] = self.credentials.session_token
        signed_query = canonical_query(params)
        request = _canonical_request(method, url, signed_query, signed, UNSIGNED_PAYLOAD)
        return f"{url}?{signed_query}&X-Amz-Signature={self.signature(timestamp, request)}"

    def authorize(
        self,
        method: str,
        url: str,
        *,
        query: str,
        headers: Mapping[str, str],
        payload_hash: str,
        now: datetime,
    ) -> dict[str, str]:
        """`headers` plus the ones that sign the request (`x-amz-date`, `Authorization`, ...).
        `query` must be in canonical form (`canonical_query`), and sent as it is."""
        timestamp = _timestamp(now)
        headers = {**headers, "x-amz-date": timestamp, "x-amz-content-sha256": payload_hash}
        if self.credentials.session_token:
            headers["x-amz-security-token"] = self.credentials.session_token
        signed = _canonical_headers(url, headers)
        request = _canonical_request(method, url, query, signed, payload_hash)
        headers["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.credentials.access_key_id}/"
            f"{self.scope(timestamp)}, SignedHeaders={';'.join(signed)}, "
            f"Signature={self.signature(timestamp, request)}"
        )
        return headers


def _timestamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def _canonical_headers(url: str, headers: Mapping[str, str]) -> dict[str, str]:
    """Lower-case names, sorted, whitespace-trimmed values, `host` as an HTTP client sends it."""
    canonical = {name.lower().strip(): " ".join(value.split()) for name, value in headers.items()}
    canonical.setdefault("host", httpx.URL(url).netloc.decode("ascii"))
    return dict(sorted(canonical.items()))


def _canonical_request(
    method: str, url: str, query: str, signed: Mapping[str, str], payload_hash: str
) -> str:
    return "\n".join(
        [
            method.upper(),
            urlsplit(url).path or "/",
            query,
            "".join(f"{name}:{value}\n" for name, value in signed.items()),
            ";".join(signed),
            payload_hash,
        ]
    )


def _utc_now() -> datetime:
    return datetime.now(UTC)


class S3Storage(Storage):
    name = "s3"

    def __init__(
        self,
        bucket: str,
        credentials: S3Credentials,
        *,
        region: str = "us-east-1",
        endpoint_url: str | None = None,
        path_style: bool | None = None,
        timeout: float = 30.0,
        clock: Callable[[], datetime] = _utc_now,
        retries: Retries = DEFAULT_RETRIES,
    ) -> None:
        """`path_style` None: path-style with a custom `endpoint_url` (MinIO, R2), virtual-host
        style on AWS."""
        self.bucket, self.region, self._clock = bucket, region, clock
        self.endpoint_url = (endpoint_url or default_endpoint(region)).rstrip("/")
        self.path_style = endpoint_url is not None if path_style is None else path_style
        self._signer = SigV4Signer(credentials, region)
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0))
        self._retries = retries

    def bucket_url(self) -> str:
        """The bucket's URL, without a trailing slash in path style (`/` is its path else)."""
        parts = urlsplit(self.endpoint_url)
        base = parts.path.rstrip("/")
        if self.path_style:
            return f"{parts.scheme}://{parts.netloc}{base}/{quote(self.bucket, safe='')}"
        return f"{parts.scheme}://{self.bucket}.{parts.netloc}{base}"

    def object_url(self, key: str) -> str:
        return f"{self.bucket_url()}/{quote(key, safe='/~')}"

    # --- browser links ----------------------------------------------------------------------

    def presigned_put(self, key: str, content_type: str, expires_at: datetime) -> str:
        return self._signer.presign(
            "PUT",
            self.object_url(check_key(key)),
            now=self._clock(),
            expires_at=expires_at,
            headers={"content-type": content_type},
        )

    def presigned_get(self, key: str, expires_at: datetime, *, attachment: bool = False) -> str:
        return self._signer.presign(
            "GET",
            self.object_url(check_key(key)),
            now=self._clock(),
            expires_at=expires_at,
            query={"response-content-disposition": "attachment"} if attachment else None,
        )

    # --- objects ----------------------------------------------------------------------------

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        response = await self._request(
            "PUT", self.object_url(check_key(key)), content=data, content_type=content_type
        )
        _raise_for_status(response, "upload")

    async def get(self, key: str) -> StoredObject:
        response = await self._request("GET", self.object_url(check_key(key)))
        if response.status_code == 404:
            raise ObjectNotFound()
        _raise_for_status(response, "download")
        content_type = response.headers.get("content-type") or "application/octet-stream"
        return StoredObject(response.content, content_type)

    async def delete(self, key: str) -> None:
        await self._delete(check_key(key))

    async def delete_prefix(self, prefix: str) -> int:
        keys = await self._list(check_key(prefix.rstrip("/")) + "/")
        limit = asyncio.Semaphore(_DELETE_CONCURRENCY)

        async def delete_one(key: str) -> None:
            async with limit:
                await self._delete(key)

        await asyncio.gather(*(delete_one(key) for key in keys))
        return len(keys)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _delete(self, key: str) -> None:
        response = await self._request("DELETE", self.object_url(key))
        if response.status_code == 404 and _error_code(response) == "NoSuchKey":
            return  # S3 itself answers 204; some compatible stores say so
        _raise_for_status(response, "delete")

    async def _list(self, prefix: str) -> list[str]:
        """Every key under `prefix` (ListObjectsV2, page by page)."""
        keys: list[str] = []
        params = {"list-type": "2", "prefix": prefix}
        url = self.bucket_url() if self.path_style else self.bucket_url() + "/"
        while True:
            response = await self._request("GET", url, query=canonical_query(params))
            _raise_for_status(response, "list")
            page = _parse_xml(response.content)
            keys.extend(e.text or "" for e in page.iter() if _local(e.tag) == "Key")
            token = next((e.text for e in page if _local(e.tag) == "NextContinuationToken"), None)
            truncated = any(_local(e.tag) == "IsTruncated" and e.text == "true" for e in page)
            if not truncated or not token:
                return keys
            params["continuation-token"] = token

    async def _request(
        self,
        method: str,
        url: str,
        *,
        query: str = "",
        content: bytes = b"",
        content_type: str | None = None,
    ) -> httpx.Response:
        payload_hash = await _sha256_hex(content)

        async def send() -> httpx.Response:  # signed again for each try: the time is signed too
            headers = self._signer.authorize(
                method,
                url,
                query=query,
                headers={"content-type": content_type} if content_type else {},
                payload_hash=payload_hash,
                now=self._clock(),
            )
            return await self._client.request(
                method,
                f"{url}?{query}" if query else url,
                content=content or None,
                headers=headers,
            )

        try:
            return await self._retries.send(send)
        except httpx.HTTPError as exc:
            raise S3Error(f"S3 request failed: {type(exc).__name__}") from exc


async def _sha256_hex(data: bytes) -> str:
    if len(data) < _HASH_IN_THREAD_BYTES:
        return hashlib.sha256(data).hexdigest()
    # hashlib releases the GIL on large inputs: a big upload is hashed beside the event loop
    return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())


def _parse_xml(body: bytes) -> ElementTree.Element:
    try:
        # The configured store's reply, not user input; expat refuses external entities.
        return ElementTree.fromstring(body)  # noqa: S314
    except ElementTree.ParseError as exc:
        raise S3Error("S3 answered with malformed XML") from exc


def _local(tag: str) -> str:
    """A tag without its namespace (`{http://s3.amazonaws.com/doc/2006-03-01/}Key` -> `Key`)."""
    return tag.rsplit("}", 1)[-1]


def _error_code(response: httpx.Response) -> str | None:
    try:
        root = ElementTree.fromstring(response.content)  # noqa: S314
    except ElementTree.ParseError:
        return None
    return next((e.text for e in root if _local(e.tag) == "Code"), None)


def _raise_for_status(response: httpx.Response, action: str) -> None:
    if response.is_success:
        return
    code = _error_code(response) if response.content else None
    raise S3Error(f"S3 {action} failed: HTTP {response.status_code} {code or ''}".rstrip())
