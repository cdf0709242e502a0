"""Google Cloud Storage: objects over the JSON API, browser links as V4 signed URLs.

aihub authenticates as a service account (its JSON key): requests carry an OAuth2 access token
obtained with the JWT bearer grant from the key's `token_uri`, kept until five minutes before it
expires and renewed by one request at a time. Signed URLs are made locally with the key
(`GOOG4-RSA-SHA256`, as `Blob.generate_signed_url(version="v4")` makes them): no request to
Google. RSA signing is CPU work of a millisecond; every network call goes through async httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from aihub.storage.base import (
    DEFAULT_RETRIES,
    ObjectNotFound,
    Retries,
    Storage,
    StoredObject,
    check_key,
)

DEFAULT_BASE_URL = "https://storage.googleapis.com"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
MAX_URL_SECONDS = 7 * 24 * 3600
"""The longest a V4 signed URL may be valid."""

_TOKEN_LIFETIME = timedelta(hours=1)
_REFRESH_MARGIN = timedelta(minutes=5)
_DELETE_CONCURRENCY = 8


class GCSError(OSError):
    """GCS could not be reached, or refused or failed the request."""


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """What aihub needs of a service-account key file."""

    client_email: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    private_key_id: str | None = None
    token_uri: str = DEFAULT_TOKEN_URI

    @classmethod
    def from_json(cls, text: str) -> ServiceAccount:
        """Parse a key file's text; a `ValueError` says what is wrong without quoting it."""
        try:
            info = json.loads(text)
        except ValueError:
            raise ValueError("not valid JSON") from None
        if not isinstance(info, dict):
            raise ValueError("not a service-account key (a JSON object)")
        return cls.from_info(info)

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> ServiceAccount:
        if info.get("type", "service_account") != "service_account":
            raise ValueError(
                f"a {info.get('type')!r} credential, not a service-account key: signed URLs "
                "need the service account's private key"
            )
        email, pem = info.get("client_email"), info.get("private_key")
        if not isinstance(email, str) or not email:
            raise ValueError("the service-account key has no client_email")
        if not isinstance(pem, str) or not pem:
            raise ValueError("the service-account key has no private_key")
        try:
            key = serialization.load_pem_private_key(pem.encode(), password=None)
        except (ValueError, TypeError):
            raise ValueError("the service-account key's private_key is not a PEM key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the service-account key's private_key is not an RSA key")
        key_id, token_uri = info.get("private_key_id"), info.get("token_uri") or DEFAULT_TOKEN_URI
        return cls(
            client_email=email,
            private_key=key,
            private_key_id=key_id if isinstance(key_id, str) and key_id else None,
            token_uri=str(token_uri),
        )

    def sign(self, message: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 with SHA-256, as Google's `sign_bytes`."""
        return self.private_key.sign(message, padding.PKCS1v15(), hashes.SHA256())

    def assertion(self, now: datetime) -> str:
        """The JWT that the bearer grant trades for an access token."""
        issued = int(now.timestamp())
        claims = {
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": issued,
            "exp": issued + int(_TOKEN_LIFETIME.total_seconds()),
        }
        headers = {"kid": self.private_key_id} if self.private_key_id else None
        return jwt.encode(claims, self.private_key, algorithm="RS256", headers=headers)


def signed_url_v4(
    account: ServiceAccount,
    *,
    method: str,
    bucket: str,
    key: str,
    now: datetime,
    expires_at: datetime,
    content_type: str | None = None,
    base_url: str = DEFAULT_BASE_URL,
    response_disposition: str | None = None,
) -> str:
    """A V4 signed URL (path style) for `method` on the object, until `expires_at`.

    See https://cloud.google.com/storage/docs/access-control/signing-urls-manually. Signed
    headers are `host` and, when given, `content-type`: an upload must send exactly that type.
    `response_disposition` becomes the answer's `Content-Disposition` (a signed query parameter).
    """
    base_url = base_url.rstrip("/")
    timestamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    scope = f"{timestamp[:8]}/auto/storage/goog4_request"
    resource = f"/{bucket}/{quote(key, safe='/~')}"
    headers = {"host": urlsplit(base_url).netloc}
    if content_type is not None:
        headers["content-type"] = " ".join(content_type.split())
    signed_headers = ";".join(sorted(headers))
    params = {
        "X-Goog-Algorithm": "GOOG4-RSA-SHA256",
        "X-Goog-Credential": f"{account.client_email}/{scope}",
        "X-Goog-Date": timestamp,
        "X-Goog-Expires": str(expiry_seconds(now, expires_at)),
        "X-Goog-SignedHeaders": signed_headers,
    }
    if response_disposition is not None:
        params["response-content-disposition"] = response_disposition
    query = canonical_query(params)
    canonical_request = "\n".join(
        [
            method.upper(),
            resource,
            query,
            "".join(f"{name}:{headers[name]}\n" for name in sorted(headers)),
            signed_headers,
            "UNSIGNED-PAYLOAD",
        ]
    )
    string_to_sign = "\n".join(
        [
            "GOOG4-RSA-SHA256",
            timestamp,
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    signature = account.sign(string_to_sign.encode()).hex()
    return f"{base_url}{resource}?{query}&X-Goog-Signature={signature}"


def canonical_query(params: Mapping[str, str]) -> str:
    """Parameters percent-encoded (only `-_.~` left as they are) and sorted by name."""
    encoded = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in params.items())
    return "&".join(f"{k}={v}" for k, v in encoded)


def expiry_seconds(now: datetime, expires_at: datetime) -> int:
    """Seconds from `now` to `expires_at`, within what a signed URL allows (1 s to 7 days)."""
    return max(1, min(MAX_URL_SECONDS, int((expires_at - now).total_seconds())))


class _AccessToken:
    """An OAuth2 access token for the service account, renewed shortly before it expires."""

    def __init__(
        self,
        account: ServiceAccount,
        client: httpx.AsyncClient,
        clock: Callable[[], datetime],
        retries: Retries,
    ) -> None:
        self._account, self._client, self._clock = account, client, clock
        self._retries = retries
        self._token: str | None = None
        self._expires_at = datetime.fromtimestamp(0, UTC)
        self._lock = asyncio.Lock()

    async def get(self) -> str:
        if self._token is not None and self._clock() < self._expires_at - _REFRESH_MARGIN:
            return self._token
        async with self._lock:  # one renewal at a time; the others wait for its result
            if self._token is None or self._clock() >= self._expires_at - _REFRESH_MARGIN:
                self._token, self._expires_at = await self._fetch()
            return self._token

    def forget(self, token: str) -> None:
        """Drop `token` (refused by GCS) so that the next request fetches a new one."""
        if self._token == token:
            self._token = None

    async def _fetch(self) -> tuple[str, datetime]:
        now = self._clock()
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
            "assertion": self._account.assertion(now),
        }
        try:
            response = await self._retries.send(
                lambda: self._client.post(self._account.token_uri, data=form)
            )
        except httpx.HTTPError as exc:
            raise GCSError(f"GCS token request failed: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise GCSError(f"GCS token request refused: HTTP {response.status_code}")
        try:
            body = response.json()
            token, lifetime = str(body["access_token"]), float(body.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            raise GCSError("GCS token response without an access_token") from None
        return token, now + timedelta(seconds=lifetime)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class GCSStorage(Storage):
    name = "gcs"

    def __init__(
        self,
        bucket: str,
        account: ServiceAccount,
        *,
        base_url: str | None = None,
        timeout: float = 30.0,
        clock: Callable[[], datetime] = _utc_now,
        retries: Retries = DEFAULT_RETRIES,
    ) -> None:
        self.bucket, self.account, self._clock = bucket, account, clock
        self._retries = retries
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0))
        self._token = _AccessToken(account, self._client, clock, retries)

    # --- browser links ----------------------------------------------------------------------

    def presigned_put(self, key: str, content_type: str, expires_at: datetime) -> str:
        return self._sign("PUT", key, expires_at, content_type)

    def presigned_get(self, key: str, expires_at: datetime, *, attachment: bool = False) -> str:
        return self._sign("GET", key, expires_at, disposition="attachment" if attachment else None)

    def _sign(
        self,
        method: str,
        key: str,
        expires_at: datetime,
        content_type: str | None = None,
        disposition: str | None = None,
    ) -> str:
        return signed_url_v4(
            self.account,
            method=method,
            bucket=self.bucket,
            key=check_key(key),
            now=self._clock(),
            expires_at=expires_at,
            content_type=content_type,
            base_url=self.base_url,
            response_disposition=disposition,
        )

    # --- objects ----------------------------------------------------------------------------

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        response = await self._request(
            "POST",
            f"/upload/storage/v1/b/{self._bucket_path}/o",
            params={"uploadType": "media", "name": check_key(key), "fields": "name"},
            content=data,
            headers={"Content-Type": content_type},
        )
        self._raise_for_status(response, "upload")

    async def get(self, key: str) -> StoredObject:
        path = self._object_path(check_key(key))
        response = await self._request("GET", path, params={"alt": "media"})
        if response.status_code == 404:
            raise ObjectNotFound()
        self._raise_for_status(response, "download")
        content_type = response.headers.get("content-type") or "application/octet-stream"
        return StoredObject(response.content, content_type)

    async def delete(self, key: str) -> None:
        await self._delete(check_key(key))

    async def delete_prefix(self, prefix: str) -> int:
        names = await self._list(check_key(prefix.rstrip("/")) + "/")
        limit = asyncio.Semaphore(_DELETE_CONCURRENCY)

        async def delete_one(name: str) -> bool:
            async with limit:
                return await self._delete(name)

        return sum(await asyncio.gather(*(delete_one(name) for name in names)))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _delete(self, key: str) -> bool:
        response = await self._request("DELETE", self._object_path(key))
        if response.status_code == 404:
            return False
        self._raise_for_status(response, "delete")
        return True

    async def _list(self, prefix: str) -> list[str]:
        names: list[str] = []
        params = {"prefix": prefix, "fields": "items(name),nextPageToken"}
        while True:
            response = await self._request(
                "GET", f"/storage/v1/b/{self._bucket_path}/o", params=params
            )
            self._raise_for_status(response, "list")
            page = response.json()
            names.extend(str(item["name"]) for item in page.get("items", []))
            if not page.get("nextPageToken"):
                return names
            params["pageToken"] = str(page["nextPageToken"])

    @property
    def _bucket_path(self) -> str:
        return quote(self.bucket, safe="")

    def _object_path(self, key: str) -> str:
        return f"/storage/v1/b/{self._bucket_path}/o/{quote(key, safe='')}"

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """The response, with a fresh token; once more with a new token if GCS refuses one."""
        request = self._client.build_request(
            method, self.base_url + path, params=params, content=content, headers=headers
        )
        token = await self._token.get()
        response = await self._send(request, token)
        if response.status_code == 401:
            self._token.forget(token)
            response = await self._send(request, await self._token.get())
        return response

    async def _send(self, request: httpx.Request, token: str) -> httpx.Response:
        request.headers["Authorization"] = f"Bearer {token}"
        try:
            return await self._retries.send(lambda: self._client.send(request))
        except httpx.HTTPError as exc:
            raise GCSError(f"GCS request failed: {type(exc).__name__}") from exc

    @staticmethod
    def _raise_for_status(response: httpx.Response, action: str) -> None:
        if response.is_success:
            return
        reason = ""
        with contextlib.suppress(ValueError, KeyError, TypeError):
            reason = str(response.json()["error"]["message"])[:200]
        raise GCSError(f"GCS {action} failed: HTTP {response.status_code} {reason}".rstrip())
