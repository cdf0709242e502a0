"""GCS and S3 storage: signed links exactly as Google's and AWS's own libraries make them, and
object round-trips through loopback fakes that check every request's credentials."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, urlsplit
from xml.sax.saxutils import escape

import botocore.auth
import botocore.session
import httpx
import jwt
import pytest
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.cloud.storage import Client as GoogleClient
from google.cloud.storage import _signing as google_signing
from google.oauth2 import service_account
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aihub.core.config import ConfigError, Settings, load_settings
from aihub.storage import create_storage
from aihub.storage.base import ObjectNotFound, Storage, delete_user_files
from aihub.storage.gcs import SCOPE, GCSError, GCSStorage, ServiceAccount
from aihub.storage.local import LocalStorage
from aihub.storage.s3 import S3Credentials, S3Error, S3Storage
from tests.clocks import FakeClock
from tests.conftest import MakeApp
from tests.factories import bearer, create_user
from tests.fakes.server import serve

NOW = datetime(2026, 11, 1, 9, 30, 15, tzinfo=UTC)
BUCKET = "aihub-test-bucket"
USER = uuid.UUID("0b6f2a57-3c1e-4d55-9a57-1f0e2f6c8a11")
UPLOAD_KEY = f"uploads/{USER}/4c8d1b7e-52a6-4f8e-b2f4-8f0a3c9d6e21-holiday_photo.png"
IMAGE_KEY = f"images/{USER}/job_3f9a1c/0.png"
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_info(
    key: rsa.RSAPrivateKey, token_uri: str = "https://oauth2.googleapis.com/token"
) -> dict[str, str]:
    """A throwaway service-account key file, as the Cloud console downloads one."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return {
        "type": "service_account",
        "project_id": "aihub-test",
        "private_key_id": "0123456789abcdef0123456789abcdef01234567",
        "private_key": pem,
        "client_email": "aihub-storage@aihub-test.iam.gserviceaccount.com",
        "client_id": "104200000000000000000",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }


# --- GCS: V4 signed URLs ---------------------------------------------------------------------


def google_signed_url(
    info: dict[str, str],
    *,
    key: str,
    method: str,
    expires_at: datetime,
    content_type: str | None,
    endpoint: str | None,
    disposition: str | None = None,
) -> str:
    credentials = service_account.Credentials.from_service_account_info(info)  # type: ignore[no-untyped-call]
    client = GoogleClient.create_anonymous_client()
    blob = client.bucket(BUCKET).blob(key)
    url: str = blob.generate_signed_url(
        version="v4",
        expiration=expires_at,
        method=method,
        content_type=content_type,
        credentials=credentials,
        api_access_endpoint=endpoint,
        response_disposition=disposition,
    )
    return url


@pytest.mark.parametrize("key", [UPLOAD_KEY, IMAGE_KEY], ids=["upload", "image"])
@pytest.mark.parametrize(
    ("method", "content_type", "attachment"),
    [
        ("PUT", "image/png", False),
        ("PUT", "text/plain", False),
        ("GET", None, False),
        ("GET", None, True),
    ],
)
@pytest.mark.parametrize("endpoint", [None, "http://127.0.0.1:4443"], ids=["google", "fake"])
async def test_gcs_signed_urls_are_googles_own(
    monkeypatch: pytest.MonkeyPatch,
    rsa_key: rsa.RSAPrivateKey,
    key: str,
    method: str,
    content_type: str | None,
    attachment: bool,
    endpoint: str | None,
) -> None:
    monkeypatch.setattr(google_signing, "_NOW", lambda tz=None: NOW)
    info = key_info(rsa_key)
    expires_at = NOW + timedelta(seconds=900)
    storage = GCSStorage(
        BUCKET, ServiceAccount.from_info(info), base_url=endpoint, clock=lambda: NOW
    )
    try:
        if content_type is None:
            ours = storage.presigned_get(key, expires_at, attachment=attachment)
        else:
            ours = storage.presigned_put(key, content_type, expires_at)
    finally:
        await storage.aclose()

    theirs = google_signed_url(
        info,
        key=key,
        method=method,
        expires_at=expires_at,
        content_type=content_type,
        endpoint=endpoint,
        disposition="attachment" if attachment else None,
    )
    assert ours == theirs
    query = parse_qs(urlsplit(ours).query)
    assert query["X-Goog-Algorithm"] == ["GOOG4-RSA-SHA256"]
    assert query["X-Goog-Credential"] == [
        f"{info['client_email']}/20261101/auto/storage/goog4_request"
    ]
    assert query["X-Goog-Expires"] == ["900"]
    assert query["X-Goog-SignedHeaders"] == ["content-type;host" if content_type else "host"]


def test_gcs_signed_url_signature_verifies_with_the_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    """GCS's own check, from the URL and the headers sent: another content type fails."""
    from aihub.storage.gcs import signed_url_v4

    account = ServiceAccount.from_info(key_info(rsa_key))
    now = datetime.now(UTC)
    url = signed_url_v4(
        account,
        method="PUT",
        bucket=BUCKET,
        key=UPLOAD_KEY,
        now=now,
        expires_at=now + timedelta(minutes=15),
        content_type="image/png",
    )
    host = {"host": "storage.googleapis.com"}
    public_key = rsa_key.public_key()
    assert gcs_signed_request_holds(public_key, "PUT", url, {**host, "content-type": "image/png"})
    assert not gcs_signed_request_holds(
        public_key, "PUT", url, {**host, "content-type": "text/html"}
    )
    assert not gcs_signed_request_holds(public_key, "GET", url, {**host})
    assert not gcs_signed_request_holds(
        public_key, "PUT", url.replace("X-Goog-Expires=900", "X-Goog-Expires=9000"), host
    )


def gcs_signed_request_holds(
    public_key: rsa.RSAPublicKey, method: str, url: str, headers: Mapping[str, str]
) -> bool:
    """Whether a request through a V4 signed URL is authorized, checked as GCS documents it:
    https://cloud.google.com/storage/docs/authentication/signatures."""
    parts = urlsplit(url)
    given = dict(parse_qsl(parts.query, keep_blank_values=True))
    signature = given.pop("X-Goog-Signature", "")
    if given.get("X-Goog-Algorithm") != "GOOG4-RSA-SHA256":
        return False
    date, signed = given["X-Goog-Date"], given["X-Goog-SignedHeaders"].split(";")
    issued = datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    if datetime.now(UTC) > issued + timedelta(seconds=int(given["X-Goog-Expires"])):
        return False
    query = "&".join(sorted(f"{quote(k, safe='~')}={quote(v, safe='~')}" for k, v in given.items()))
    lowered = {name.lower(): value for name, value in headers.items()}
    canonical_headers = "".join(f"{n}:{' '.join(lowered.get(n, '').split())}\n" for n in signed)
    canonical = "\n".join(
        [method, parts.path, query, canonical_headers, ";".join(signed), "UNSIGNED-PAYLOAD"]
    )
    scope = given["X-Goog-Credential"].split("/", 1)[1]
    string_to_sign = (
        f"GOOG4-RSA-SHA256\n{date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    )
    try:
        public_key.verify(
            bytes.fromhex(signature), string_to_sign.encode(), padding.PKCS1v15(), hashes.SHA256()
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def test_gcs_signed_url_lifetime_is_kept_within_seven_days(rsa_key: rsa.RSAPrivateKey) -> None:
    from aihub.storage.gcs import signed_url_v4

    account = ServiceAccount.from_info(key_info(rsa_key))

    def expires(after: timedelta) -> str:
        url = signed_url_v4(
            account, method="GET", bucket=BUCKET, key=IMAGE_KEY, now=NOW, expires_at=NOW + after
        )
        return parse_qs(urlsplit(url).query)["X-Goog-Expires"][0]

    assert expires(timedelta(days=30)) == "604800"
    assert expires(timedelta(seconds=-5)) == "1"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"type": "authorized_user"}', "not a service-account key"),
        ('{"type": "service_account", "private_key": "x"}', "no client_email"),
        ('{"client_email": "a@b.iam.gserviceaccount.com"}', "no private_key"),
        (
            '{"client_email": "a@b.iam.gserviceaccount.com", "private_key": "-----BEGIN secret"}',
            "not a PEM key",
        ),
    ],
)
def test_a_bad_service_account_key_is_named_without_quoting_it(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        ServiceAccount.from_json(text)
    assert "secret" not in str(caught.value)


def test_the_service_account_key_never_shows_in_a_repr(rsa_key: rsa.RSAPrivateKey) -> None:
    info = key_info(rsa_key)
    assert "PRIVATE KEY" not in repr(ServiceAccount.from_info(info))
    assert SECRET_KEY not in repr(S3Credentials(ACCESS_KEY, SECRET_KEY, "session-token"))


# --- S3: SigV4 presigned URLs ----------------------------------------------------------------


@dataclass(frozen=True)
class S3Case:
    region: str
    endpoint_url: str | None
    path_style: bool | None
    addressing_style: str
    token: str | None = None


S3_CASES = {
    "aws": S3Case("eu-west-1", None, None, "virtual"),
    "aws-path": S3Case("us-east-2", None, True, "path"),
    "minio": S3Case("us-east-1", "http://127.0.0.1:9000", None, "path"),
    "r2-with-session-token": S3Case(
        "auto", "https://0123abcd.r2.cloudflarestorage.com", None, "path", token="FwoGZXIvYXdz//t"
    ),
    "custom-virtual": S3Case("us-west-2", "https://s3.example.com:8443", False, "virtual"),
}


@functools.cache
def botocore_client(case: S3Case) -> Any:
    endpoint = case.endpoint_url or f"https://s3.{case.region}.amazonaws.com"
    return _botocore_session().create_client(
        "s3",
        region_name=case.region,
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        aws_session_token=case.token,
        config=Config(signature_version="s3v4", s3={"addressing_style": case.addressing_style}),
    )


@functools.cache
def _botocore_session() -> Any:
    return botocore.session.get_session()


def botocore_presigned_url(
    case: S3Case, *, key: str, content_type: str | None, attachment: bool = False
) -> str:
    params = {"Bucket": BUCKET, "Key": key}
    if content_type is not None:
        params["ContentType"] = content_type
    if attachment:
        params["ResponseContentDisposition"] = "attachment"
    operation = "get_object" if content_type is None else "put_object"
    url: str = botocore_client(case).generate_presigned_url(operation, Params=params, ExpiresIn=900)
    return url


@pytest.mark.parametrize("case", S3_CASES.values(), ids=S3_CASES.keys())
@pytest.mark.parametrize(
    ("content_type", "attachment"),
    [("image/png", False), ("application/pdf", False), (None, False), (None, True)],
)
@pytest.mark.parametrize("key", [UPLOAD_KEY, IMAGE_KEY], ids=["upload", "image"])
async def test_s3_presigned_urls_are_botocores_own(
    monkeypatch: pytest.MonkeyPatch,
    case: S3Case,
    content_type: str | None,
    attachment: bool,
    key: str,
) -> None:
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: NOW.replace(tzinfo=None))
    storage = S3Storage(
        BUCKET,
        S3Credentials(ACCESS_KEY, SECRET_KEY, case.token),
        region=case.region,
        endpoint_url=case.endpoint_url,
        path_style=case.path_style,
        clock=lambda: NOW,
    )
    expires_at = NOW + timedelta(seconds=900)
    try:
        if content_type is None:
            ours = storage.presigned_get(key, expires_at, attachment=attachment)
        else:
            ours = storage.presigned_put(key, content_type, expires_at)
    finally:
        await storage.aclose()

    theirs = botocore_presigned_url(case, key=key, content_type=content_type, attachment=attachment)
    ours_parts, theirs_parts = urlsplit(ours), urlsplit(theirs)
    assert ours_parts[:3] == theirs_parts[:3]
    assert parse_qs(ours_parts.query) == parse_qs(theirs_parts.query)
    query = parse_qs(ours_parts.query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Credential"] == [f"{ACCESS_KEY}/20261101/{case.region}/s3/aws4_request"]
    assert query["X-Amz-Date"] == ["20261101T093015Z"]
    assert query["X-Amz-SignedHeaders"] == ["content-type;host" if content_type else "host"]
    assert re.fullmatch(r"[0-9a-f]{64}", query["X-Amz-Signature"][0])


def test_s3_addressing_style_defaults() -> None:
    credentials = S3Credentials(ACCESS_KEY, SECRET_KEY)
    aws = S3Storage(BUCKET, credentials, region="ap-south-1")
    minio = S3Storage(BUCKET, credentials, endpoint_url="http://127.0.0.1:9000/")
    assert aws.object_url(IMAGE_KEY) == (
        f"https://{BUCKET}.s3.ap-south-1.amazonaws.com/{IMAGE_KEY}"
    )
    assert minio.object_url(IMAGE_KEY) == f"http://127.0.0.1:9000/{BUCKET}/{IMAGE_KEY}"


# --- a loopback fake of GCS ------------------------------------------------------------------


@dataclass
class FakeGCS:
    """The OAuth2 token endpoint and the JSON API's object calls, checking every token."""

    public_key: rsa.RSAPublicKey
    base_url: str = ""
    objects: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    fail_with: int | None = None
    fail_times: int | None = None
    """How many requests `fail_with` answers (None: every one)."""
    token_fail_times: int = 0
    """How many token requests fail with 503 first."""
    page_size: int = 2
    requests: list[tuple[str, str]] = field(default_factory=list)

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/token", self.token, methods=["POST"]),
                Route("/upload/storage/v1/b/{bucket}/o", self.upload, methods=["POST"]),
                Route("/storage/v1/b/{bucket}/o", self.list, methods=["GET"]),
                Route("/storage/v1/b/{bucket}/o/{name:path}", self.get, methods=["GET"]),
                Route("/storage/v1/b/{bucket}/o/{name:path}", self.delete, methods=["DELETE"]),
                Route("/{bucket}/{name:path}", self.signed, methods=["GET", "PUT"]),
            ]
        )

    async def signed(self, request: Request) -> Response:
        """The XML API as a browser reaches it: through a signed URL, without a token."""
        self.requests.append((request.method, request.url.path))
        assert request.path_params["bucket"] == BUCKET
        assert "authorization" not in request.headers
        if not gcs_signed_request_holds(
            self.public_key, request.method, str(request.url), request.headers
        ):
            return Response(_xml_error("SignatureDoesNotMatch"), 403)
        name = request.path_params["name"]
        if request.method == "PUT":
            self.objects[name] = (await request.body(), request.headers["content-type"])
            return Response()
        if name not in self.objects:
            return Response(_xml_error("NoSuchKey"), 404)
        data, content_type = self.objects[name]
        return Response(data, headers=_stored_headers(content_type, request))

    async def token(self, request: Request) -> Response:
        if self.token_fail_times > 0:
            self.token_fail_times -= 1
            return JSONResponse({"error": "backend_error"}, 503)
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
        claims = jwt.decode(  # leeway: some tests move aihub's clock ahead
            form["assertion"],
            self.public_key,
            algorithms=["RS256"],
            audience=self.token_uri,
            leeway=timedelta(hours=2),
        )
        assert claims["iss"] == "aihub-storage@aihub-test.iam.gserviceaccount.com"
        assert claims["scope"] == SCOPE
        assert claims["exp"] - claims["iat"] == 3600
        token = f"ya29.fake-{len(self.tokens)}"
        self.tokens.append(token)
        return JSONResponse({"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    def _refused(self, request: Request) -> Response | None:
        self.requests.append((request.method, request.url.path))
        assert request.path_params["bucket"] == BUCKET
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme != "Bearer" or token not in self.tokens or token in self.revoked:
            return JSONResponse({"error": {"code": 401, "message": "Invalid Credentials"}}, 401)
        if self.fail_with is not None and self.fail_times != 0:
            if self.fail_times is not None:
                self.fail_times -= 1
            return JSONResponse(
                {"error": {"code": self.fail_with, "message": "Backend Error"}}, self.fail_with
            )
        return None

    async def upload(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        assert request.query_params["uploadType"] == "media"
        name = request.query_params["name"]
        self.objects[name] = (await request.body(), request.headers["content-type"])
        return JSONResponse({"name": name})

    async def get(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        assert request.query_params["alt"] == "media"
        stored = self.objects.get(request.path_params["name"])
        if stored is None:
            return JSONResponse({"error": {"code": 404, "message": "No such object"}}, 404)
        return Response(stored[0], headers={"content-type": stored[1]})

    async def delete(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        if self.objects.pop(request.path_params["name"], None) is None:
            return JSONResponse({"error": {"code": 404, "message": "No such object"}}, 404)
        return Response(status_code=204)

    async def list(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        prefix = request.query_params.get("prefix", "")
        names = sorted(n for n in self.objects if n.startswith(prefix))
        start = int(request.query_params.get("pageToken", "0"))
        page = names[start : start + self.page_size]
        body: dict[str, Any] = {"items": [{"name": n} for n in page]} if page else {}
        if start + self.page_size < len(names):
            body["nextPageToken"] = str(start + self.page_size)
        return JSONResponse(body)


@pytest.fixture
async def fake_gcs(rsa_key: rsa.RSAPrivateKey) -> AsyncIterator[FakeGCS]:
    fake = FakeGCS(rsa_key.public_key())
    async with serve(fake.app(), lifespan="off") as base_url:
        fake.base_url = base_url
        yield fake


@pytest.fixture
async def gcs(fake_gcs: FakeGCS, rsa_key: rsa.RSAPrivateKey) -> AsyncIterator[GCSStorage]:
    account = ServiceAccount.from_info(key_info(rsa_key, fake_gcs.token_uri))
    storage = GCSStorage(BUCKET, account, base_url=fake_gcs.base_url)
    yield storage
    await storage.aclose()


# --- a loopback fake of S3 -------------------------------------------------------------------

S3_REGION = "us-east-1"
_AUTHORIZATION = re.compile(
    rf"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/(?P<date>\d{{8}})/{S3_REGION}/s3/aws4_request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<signature>[0-9a-f]{64})"
)


def _stored_headers(content_type: str, request: Request) -> dict[str, str]:
    """GCS and S3 both answer a signed GET's `response-content-disposition` in kind."""
    headers = {"content-type": content_type}
    if disposition := request.query_params.get("response-content-disposition"):
        headers["content-disposition"] = disposition
    return headers


@dataclass
class FakeS3:
    """Path-style S3 (PutObject, GetObject, DeleteObject, ListObjectsV2) that checks each
    request's SigV4 signature with botocore's own signer."""

    session_token: str | None = None
    objects: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    page_size: int = 2
    requests: list[tuple[str, str]] = field(default_factory=list)
    fail_with: int | None = None
    fail_times: int = 0
    """How many signed requests `fail_with` answers."""

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/{bucket}", self.list, methods=["GET"]),
                Route("/{bucket}/{key:path}", self.object, methods=["GET", "PUT", "DELETE"]),
            ]
        )

    async def _refused(self, request: Request) -> Response | None:
        self.requests.append((request.method, request.url.path))
        assert request.path_params["bucket"] == BUCKET
        if "X-Amz-Signature" in request.query_params:
            assert "authorization" not in request.headers
            holds = s3_presigned_request_holds(
                request.method, str(request.url), request.headers, self.session_token
            )
            return None if holds else _s3_error(403, "SignatureDoesNotMatch")
        body = await request.body()
        match = _AUTHORIZATION.fullmatch(request.headers.get("authorization", ""))
        if match is None:
            return _s3_error(403, "AccessDenied")
        signed = match["signed"].split(";")
        assert {"host", "x-amz-content-sha256", "x-amz-date"} <= set(signed)
        assert request.headers["x-amz-content-sha256"] == hashlib.sha256(body).hexdigest()
        assert request.headers["x-amz-date"].startswith(match["date"])
        assert request.headers.get("x-amz-security-token") == self.session_token
        if self.session_token is not None:
            assert "x-amz-security-token" in signed
        if match["signature"] != self._expected_signature(request, signed, body):
            return _s3_error(403, "SignatureDoesNotMatch")
        if self.fail_with is not None and self.fail_times > 0:
            self.fail_times -= 1
            return _s3_error(self.fail_with, "ServiceUnavailable")
        return None

    def _expected_signature(self, request: Request, signed: list[str], body: bytes) -> str:
        auth = botocore.auth.S3SigV4Auth(
            Credentials(ACCESS_KEY, SECRET_KEY, self.session_token), "s3", S3_REGION
        )
        aws_request = AWSRequest(
            method=request.method,
            url=str(request.url),
            headers={name: request.headers[name] for name in signed},
            data=body,
        )
        aws_request.context["timestamp"] = request.headers["x-amz-date"]
        canonical = auth.canonical_request(aws_request)
        signature: str = auth.signature(auth.string_to_sign(aws_request, canonical), aws_request)
        return signature

    async def object(self, request: Request) -> Response:
        if (refused := await self._refused(request)) is not None:
            return refused
        key = request.path_params["key"]
        if request.method == "PUT":
            self.objects[key] = (await request.body(), request.headers["content-type"])
            return Response(headers={"ETag": '"etag"'})
        if request.method == "DELETE":
            self.objects.pop(key, None)
            return Response(status_code=204)
        if key not in self.objects:
            return _s3_error(404, "NoSuchKey")
        data, content_type = self.objects[key]
        return Response(data, headers=_stored_headers(content_type, request))

    async def list(self, request: Request) -> Response:
        if (refused := await self._refused(request)) is not None:
            return refused
        assert request.query_params["list-type"] == "2"
        prefix = request.query_params.get("prefix", "")
        keys = sorted(k for k in self.objects if k.startswith(prefix))
        start = int(request.query_params.get("continuation-token", "0"))
        page, more = keys[start : start + self.page_size], start + self.page_size < len(keys)
        contents = "".join(
            f"<Contents><Key>{escape(k)}</Key><Size>1</Size></Contents>" for k in page
        )
        token = f"<NextContinuationToken>{start + self.page_size}</NextContinuationToken>"
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Name>{BUCKET}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount>"
            f"<IsTruncated>{'true' if more else 'false'}</IsTruncated>"
            f"{token if more else ''}{contents}</ListBucketResult>"
        )
        return Response(xml, media_type="application/xml")


def _xml_error(code: str) -> str:
    return f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message/></Error>"


def _s3_error(status: int, code: str) -> Response:
    return Response(_xml_error(code), status_code=status, media_type="application/xml")


def s3_presigned_request_holds(
    method: str, url: str, headers: Mapping[str, str], session_token: str | None
) -> bool:
    """Whether a request through a presigned URL is authorized, by botocore's own signer."""
    parts = urlsplit(url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    given = dict(params)
    issued = datetime.strptime(given["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    if datetime.now(UTC) > issued + timedelta(seconds=int(given["X-Amz-Expires"])):
        return False
    if given.get("X-Amz-Security-Token") != session_token:
        return False
    unsigned = [(k, v) for k, v in params if k != "X-Amz-Signature"]
    query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in unsigned)
    signed = given["X-Amz-SignedHeaders"].split(";")
    lowered = {name.lower(): value for name, value in headers.items()}
    auth = botocore.auth.S3SigV4QueryAuth(
        Credentials(ACCESS_KEY, SECRET_KEY, session_token), "s3", S3_REGION
    )
    aws_request = AWSRequest(
        method=method,
        url=parts._replace(query=query).geturl(),
        headers={name: lowered.get(name, "") for name in signed},
    )
    aws_request.context["timestamp"] = given["X-Amz-Date"]
    string_to_sign = auth.string_to_sign(aws_request, auth.canonical_request(aws_request))
    expected: str = auth.signature(string_to_sign, aws_request)
    return hmac.compare_digest(expected, given.get("X-Amz-Signature", ""))


@pytest.fixture
async def fake_s3() -> AsyncIterator[tuple[FakeS3, str]]:
    fake = FakeS3()
    async with serve(fake.app(), lifespan="off") as base_url:
        yield fake, base_url


@pytest.fixture
async def s3(fake_s3: tuple[FakeS3, str]) -> AsyncIterator[S3Storage]:
    _, base_url = fake_s3
    storage = S3Storage(
        BUCKET, S3Credentials(ACCESS_KEY, SECRET_KEY), region=S3_REGION, endpoint_url=base_url
    )
    yield storage
    await storage.aclose()


@pytest.fixture
async def s3_with_session_token(fake_s3: tuple[FakeS3, str]) -> AsyncIterator[S3Storage]:
    """Temporary credentials (STS): the token travels, signed, with every request."""
    fake, base_url = fake_s3
    fake.session_token = "FwoGZXIvYXdzEJr//session"
    credentials = S3Credentials(ACCESS_KEY, SECRET_KEY, fake.session_token)
    storage = S3Storage(BUCKET, credentials, region=S3_REGION, endpoint_url=base_url)
    yield storage
    await storage.aclose()


# --- object round-trips (both backends) ------------------------------------------------------


@pytest.fixture(params=["gcs", "s3", "s3_with_session_token"])
def backend(request: pytest.FixtureRequest) -> Storage:
    storage: Storage = request.getfixturevalue(request.param)
    return storage


async def test_put_get_and_replace(backend: Storage) -> None:
    await backend.put(IMAGE_KEY, PNG, content_type="image/png")
    stored = await backend.get(IMAGE_KEY)
    assert (stored.data, stored.content_type) == (PNG, "image/png")

    await backend.put(IMAGE_KEY, b"plain words", content_type="text/plain")
    stored = await backend.get(IMAGE_KEY)
    assert (stored.data, stored.content_type) == (b"plain words", "text/plain")


async def test_a_missing_object_is_not_found_and_deleting_it_is_no_error(backend: Storage) -> None:
    with pytest.raises(ObjectNotFound):
        await backend.get(UPLOAD_KEY)
    await backend.delete(UPLOAD_KEY)

    await backend.put(UPLOAD_KEY, PNG, content_type="image/png")
    await backend.delete(UPLOAD_KEY)
    with pytest.raises(ObjectNotFound):
        await backend.get(UPLOAD_KEY)


async def test_delete_prefix_removes_exactly_what_is_under_the_prefix(backend: Storage) -> None:
    other = uuid.UUID(int=USER.int + 1)
    mine = [f"images/{USER}/job_{n}/{i}.png" for n in range(3) for i in range(2)]
    mine.append(UPLOAD_KEY)
    theirs = [f"images/{other}/job_0/0.png", f"images/{USER}0/job_0/0.png"]  # look-alike prefix
    for key in [*mine, *theirs]:
        await backend.put(key, PNG, content_type="image/png")

    assert await delete_user_files(backend, USER) == len(mine)  # many list pages

    for key in mine:
        with pytest.raises(ObjectNotFound):
            await backend.get(key)
    for key in theirs:
        assert (await backend.get(key)).data == PNG
    assert await backend.delete_prefix(f"images/{USER}/") == 0


async def test_unsafe_keys_never_reach_the_store(backend: Storage) -> None:
    for key in ["../etc/passwd", "images//x", "images/.hidden"]:
        with pytest.raises(ValueError, match="unsafe storage key"):
            await backend.put(key, PNG, content_type="image/png")
        with pytest.raises(ValueError, match="unsafe storage key"):
            backend.presigned_get(key, NOW)


async def test_an_unreachable_store_is_an_os_error(rsa_key: rsa.RSAPrivateKey) -> None:
    closed = "http://127.0.0.1:9"  # discard port: nothing listens
    account = ServiceAccount.from_info(key_info(rsa_key, f"{closed}/token"))
    stores: list[Storage] = [
        GCSStorage(BUCKET, account, base_url=closed, timeout=2),
        S3Storage(BUCKET, S3Credentials(ACCESS_KEY, SECRET_KEY), endpoint_url=closed, timeout=2),
    ]
    for storage, error in zip(stores, [GCSError, S3Error], strict=True):
        with pytest.raises(error) as caught:
            await storage.get(IMAGE_KEY)
        assert isinstance(caught.value, OSError)  # what the callers catch and log
        await storage.aclose()


# --- a browser's upload, end to end ---------------------------------------------------------


@pytest.fixture(params=["gcs", "s3"])
def bucket_settings(
    request: pytest.FixtureRequest, rsa_key: rsa.RSAPrivateKey
) -> tuple[dict[str, Any], dict[str, tuple[bytes, str]], str]:
    """Settings of an app whose storage is a fake bucket; the bucket's objects; its URL."""
    if request.param == "gcs":
        gcs: FakeGCS = request.getfixturevalue("fake_gcs")
        overrides: dict[str, Any] = {
            "storage_backend": "gcs",
            "gcs_bucket_name": BUCKET,
            "gcs_credentials_json": json.dumps(key_info(rsa_key, gcs.token_uri)),
            "gcs_base_url": gcs.base_url,
        }
        return overrides, gcs.objects, f"{gcs.base_url}/{BUCKET}"
    s3, base_url = request.getfixturevalue("fake_s3")
    overrides = {
        "storage_backend": "s3",
        "s3_bucket": BUCKET,
        "s3_region": S3_REGION,
        "s3_endpoint_url": base_url,
        "s3_access_key_id": ACCESS_KEY,
        "s3_secret_access_key": SECRET_KEY,
    }
    return overrides, s3.objects, f"{base_url}/{BUCKET}"


async def test_a_browser_uploads_to_the_bucket_and_loads_the_file(
    make_app: MakeApp,
    bucket_settings: tuple[dict[str, Any], dict[str, tuple[bytes, str]], str],
) -> None:
    overrides, objects, bucket_url = bucket_settings
    async with make_app(**overrides) as served, httpx.AsyncClient() as browser:
        _, token = await create_user(served.client)
        response = await served.client.post(
            "/api/upload-url",
            json={"filename": "Holiday photo.png", "contentType": "image/png"},
            headers=bearer(token),
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        key = f"uploads/{answer['url'].split('/uploads/', 1)[1].split('?', 1)[0]}"
        assert answer["url"].startswith(f"{bucket_url}/uploads/")
        assert answer["gcs_url"].startswith(f"{bucket_url}/{key}?")

        wrong_type = await browser.put(
            answer["url"], content=PNG, headers={"Content-Type": "text/html"}
        )
        assert wrong_type.status_code == 403
        assert key not in objects
        put = await browser.put(answer["url"], content=PNG, headers=answer["headers"])
        assert put.status_code == 200, put.text
        assert objects[key] == (PNG, "image/png")

        loaded = await browser.get(answer["gcs_url"])
        assert loaded.status_code == 200
        assert (loaded.content, loaded.headers["content-type"]) == (PNG, "image/png")
        not_for_put = await browser.put(answer["gcs_url"], content=b"x")
        assert not_for_put.status_code == 403
        assert (await served.app.state.storage.get(key)).data == PNG


# --- GCS specifics ---------------------------------------------------------------------------


async def test_a_file_a_browser_would_run_as_a_page_is_a_download_from_the_bucket(
    make_app: MakeApp,
    bucket_settings: tuple[dict[str, Any], dict[str, tuple[bytes, str]], str],
) -> None:
    """aihub serves such files sandboxed; a bucket cannot, so its link makes them downloads."""
    overrides, _, _ = bucket_settings
    page = b"<html><script>alert(document.domain)</script></html>"
    async with make_app(**overrides) as served, httpx.AsyncClient() as browser:
        _, token = await create_user(served.client)
        loaded = {}
        for name, content_type, data in [
            ("notes.html", "text/html", page),
            ("photo.png", "image/png", PNG),
        ]:
            answer = (
                await served.client.post(
                    "/api/upload-url",
                    json={"filename": name, "contentType": content_type},
                    headers=bearer(token),
                )
            ).json()
            put = await browser.put(answer["url"], content=data, headers=answer["headers"])
            assert put.status_code == 200, put.text
            loaded[content_type] = await browser.get(answer["gcs_url"])

    assert loaded["text/html"].headers["content-disposition"] == "attachment"
    assert loaded["text/html"].content == page
    assert "content-disposition" not in loaded["image/png"].headers


async def test_gcs_token_is_fetched_once_and_reused(gcs: GCSStorage, fake_gcs: FakeGCS) -> None:
    for n in range(3):
        await gcs.put(f"images/{USER}/job_x/{n}.png", PNG, content_type="image/png")
    await gcs.get(f"images/{USER}/job_x/0.png")
    assert fake_gcs.tokens == ["ya29.fake-0"]


async def test_gcs_token_is_renewed_before_it_expires(
    fake_gcs: FakeGCS, rsa_key: rsa.RSAPrivateKey
) -> None:
    clock = FakeClock(datetime.now(UTC))
    account = ServiceAccount.from_info(key_info(rsa_key, fake_gcs.token_uri))
    storage = GCSStorage(BUCKET, account, base_url=fake_gcs.base_url, clock=clock)
    try:
        await storage.put(IMAGE_KEY, PNG, content_type="image/png")
        clock.advance(minutes=50)
        await storage.get(IMAGE_KEY)
        assert len(fake_gcs.tokens) == 1
        clock.advance(minutes=5)  # within five minutes of expiry
        await storage.get(IMAGE_KEY)
        assert len(fake_gcs.tokens) == 2
    finally:
        await storage.aclose()


async def test_gcs_concurrent_requests_share_one_token_fetch(
    gcs: GCSStorage, fake_gcs: FakeGCS
) -> None:
    import asyncio

    await asyncio.gather(
        *(gcs.put(f"images/{USER}/job_y/{n}.png", PNG, content_type="image/png") for n in range(8))
    )
    assert len(fake_gcs.tokens) == 1


async def test_gcs_revoked_token_is_replaced_once(gcs: GCSStorage, fake_gcs: FakeGCS) -> None:
    await gcs.put(IMAGE_KEY, PNG, content_type="image/png")
    fake_gcs.revoked.add(fake_gcs.tokens[0])
    assert (await gcs.get(IMAGE_KEY)).data == PNG
    assert len(fake_gcs.tokens) == 2


async def test_gcs_errors_are_os_errors_with_the_status(gcs: GCSStorage, fake_gcs: FakeGCS) -> None:
    fake_gcs.fail_with = 503
    with pytest.raises(GCSError, match="HTTP 503 Backend Error"):
        await gcs.put(IMAGE_KEY, PNG, content_type="image/png")


async def test_gcs_transient_errors_are_retried_and_others_are_not(
    gcs: GCSStorage, fake_gcs: FakeGCS
) -> None:
    fake_gcs.fail_with, fake_gcs.fail_times = 503, 2
    await gcs.put(IMAGE_KEY, PNG, content_type="image/png")  # the third try
    fake_gcs.fail_with, fake_gcs.fail_times = 429, 1
    assert (await gcs.get(IMAGE_KEY)).data == PNG
    uploads = [path for method, path in fake_gcs.requests if method == "POST"]
    downloads = [path for method, path in fake_gcs.requests if method == "GET"]
    assert (len(uploads), len(downloads)) == (3, 2)

    fake_gcs.requests.clear()
    fake_gcs.fail_with, fake_gcs.fail_times = 403, None
    with pytest.raises(GCSError, match="HTTP 403"):
        await gcs.delete(IMAGE_KEY)
    assert len(fake_gcs.requests) == 1  # refused for good: not tried again

    fake_gcs.requests.clear()
    fake_gcs.fail_with = 503
    with pytest.raises(GCSError, match="HTTP 503"):
        await gcs.delete(IMAGE_KEY)
    assert len(fake_gcs.requests) == 3  # three tries in all


async def test_gcs_token_requests_are_retried_too(gcs: GCSStorage, fake_gcs: FakeGCS) -> None:
    fake_gcs.token_fail_times = 2
    await gcs.put(IMAGE_KEY, PNG, content_type="image/png")
    assert len(fake_gcs.tokens) == 1
    assert fake_gcs.objects[IMAGE_KEY] == (PNG, "image/png")


async def test_s3_transient_errors_are_retried_each_signed_anew(
    s3: S3Storage, fake_s3: tuple[FakeS3, str]
) -> None:
    fake, _ = fake_s3
    fake.fail_with, fake.fail_times = 503, 2
    await s3.put(IMAGE_KEY, PNG, content_type="image/png")
    assert [method for method, _ in fake.requests] == ["PUT"] * 3
    fake.fail_with, fake.fail_times = 500, 1
    assert (await s3.get(IMAGE_KEY)).data == PNG
    fake.fail_with, fake.fail_times = 503, 3
    with pytest.raises(S3Error, match="503"):
        await s3.delete(IMAGE_KEY)
    assert [method for method, _ in fake.requests].count("DELETE") == 3


async def test_gcs_object_names_are_escaped_in_the_path(gcs: GCSStorage, fake_gcs: FakeGCS) -> None:
    await gcs.put(IMAGE_KEY, PNG, content_type="image/png")
    await gcs.get(IMAGE_KEY)
    assert fake_gcs.requests[-1] == ("GET", f"/storage/v1/b/{BUCKET}/o/{IMAGE_KEY}")


# --- settings --------------------------------------------------------------------------------


def settings_from(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(_env_file=None)


def config_error(monkeypatch: pytest.MonkeyPatch, **env: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        settings_from(monkeypatch, **env)
    return str(caught.value).splitlines()


@pytest.fixture
def key_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "service-account.json"
    path.write_text(json.dumps(key_info(rsa_key)))
    return path


async def _backend_of(settings: Settings) -> Storage:
    storage = create_storage(settings)
    await storage.aclose()
    return storage


async def test_storage_is_local_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(monkeypatch)
    assert settings.storage_backend == "local"
    assert isinstance(await _backend_of(settings), LocalStorage)


async def test_the_seeds_gcs_bucket_name_alone_chooses_gcs(
    monkeypatch: pytest.MonkeyPatch, key_file: Path
) -> None:
    settings = settings_from(
        monkeypatch, GCS_BUCKET_NAME=BUCKET, GOOGLE_APPLICATION_CREDENTIALS=str(key_file)
    )
    assert settings.storage_backend == "gcs"
    storage = await _backend_of(settings)
    assert isinstance(storage, GCSStorage)
    assert storage.bucket == BUCKET
    assert storage.account.client_email.startswith("aihub-storage@")
    assert storage.base_url == "https://storage.googleapis.com"


async def test_gcs_credentials_inline_and_base_url(
    monkeypatch: pytest.MonkeyPatch, rsa_key: rsa.RSAPrivateKey
) -> None:
    settings = settings_from(
        monkeypatch,
        STORAGE_BACKEND="gcs",
        GCS_BUCKET_NAME=BUCKET,
        GCS_CREDENTIALS_JSON=json.dumps(key_info(rsa_key)),
        GCS_BASE_URL="http://127.0.0.1:4443/",
        GOOGLE_APPLICATION_CREDENTIALS="/nonexistent/ignored.json",  # the inline key wins
    )
    storage = await _backend_of(settings)
    assert isinstance(storage, GCSStorage)
    assert storage.base_url == "http://127.0.0.1:4443"


def test_explicit_local_wins_over_a_gcs_bucket_name(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(monkeypatch, STORAGE_BACKEND="local", GCS_BUCKET_NAME=BUCKET)
    assert settings.storage_backend == "local"


def test_gcs_bucket_name_without_a_key_says_how_to_fix_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert config_error(monkeypatch, GCS_BUCKET_NAME=BUCKET) == [
        "GOOGLE_APPLICATION_CREDENTIALS or GCS_CREDENTIALS_JSON: a service-account key is "
        "required with STORAGE_BACKEND=gcs (chosen because GCS_BUCKET_NAME is set; "
        "STORAGE_BACKEND=local keeps files on disk)"
    ]


def test_gcs_without_bucket_or_key_is_one_line_each(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_error(monkeypatch, STORAGE_BACKEND="gcs") == [
        "GCS_BUCKET_NAME: required with STORAGE_BACKEND=gcs",
        "GOOGLE_APPLICATION_CREDENTIALS or GCS_CREDENTIALS_JSON: a service-account key is "
        "required with STORAGE_BACKEND=gcs",
    ]


def test_an_unreadable_key_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    assert config_error(
        monkeypatch, GCS_BUCKET_NAME=BUCKET, GOOGLE_APPLICATION_CREDENTIALS=str(missing)
    ) == [f"GOOGLE_APPLICATION_CREDENTIALS: cannot read {missing}: No such file or directory"]


def test_a_bad_inline_key_is_named_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = '{"private_key": "-----BEGIN PRIVATE KEY-----\\nsup3r-secret", "client_email": "a@b"}'
    lines = config_error(
        monkeypatch, STORAGE_BACKEND="gcs", GCS_BUCKET_NAME=BUCKET, GCS_CREDENTIALS_JSON=secret
    )
    assert lines == ["GCS_CREDENTIALS_JSON: the service-account key's private_key is not a PEM key"]
    assert config_error(
        monkeypatch, GCS_CREDENTIALS_JSON="sup3r-secret{", GCS_BUCKET_NAME=BUCKET
    ) == ["GCS_CREDENTIALS_JSON: not valid JSON"]


def test_s3_without_bucket_or_keys_is_one_line_each(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_error(monkeypatch, STORAGE_BACKEND="s3", S3_ACCESS_KEY_ID=ACCESS_KEY) == [
        "S3_BUCKET: required with STORAGE_BACKEND=s3",
        "S3_SECRET_ACCESS_KEY: required with STORAGE_BACKEND=s3",
    ]


S3_ENV = {
    "STORAGE_BACKEND": "s3",
    "S3_BUCKET": BUCKET,
    "S3_ACCESS_KEY_ID": ACCESS_KEY,
    "S3_SECRET_ACCESS_KEY": SECRET_KEY,
}


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({}, f"https://{BUCKET}.s3.us-east-1.amazonaws.com/{IMAGE_KEY}"),
        (
            {"S3_REGION": "eu-central-1"},
            f"https://{BUCKET}.s3.eu-central-1.amazonaws.com/{IMAGE_KEY}",
        ),
        (
            {"S3_FORCE_PATH_STYLE": "true"},
            f"https://s3.us-east-1.amazonaws.com/{BUCKET}/{IMAGE_KEY}",
        ),
        (
            {"S3_ENDPOINT_URL": "http://127.0.0.1:9000"},
            f"http://127.0.0.1:9000/{BUCKET}/{IMAGE_KEY}",
        ),
        (
            {"S3_ENDPOINT_URL": "https://minio.example.com", "S3_FORCE_PATH_STYLE": "false"},
            f"https://{BUCKET}.minio.example.com/{IMAGE_KEY}",
        ),
        (
            {"S3_ENDPOINT_URL": "", "S3_SESSION_TOKEN": ""},
            f"https://{BUCKET}.s3.us-east-1.amazonaws.com/{IMAGE_KEY}",
        ),
    ],
    ids=["aws", "region", "aws-path", "minio", "virtual-endpoint", "blank-is-unset"],
)
async def test_s3_settings(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], url: str) -> None:
    storage = await _backend_of(settings_from(monkeypatch, **S3_ENV, **env))
    assert isinstance(storage, S3Storage)
    assert storage.object_url(IMAGE_KEY) == url


def test_s3_endpoint_must_be_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_error(monkeypatch, **S3_ENV, S3_ENDPOINT_URL="minio:9000") == [
        "S3_ENDPOINT_URL: must be an absolute http:// or https:// URL"
    ]


@pytest.mark.parametrize("name", ["STORAGE_URL_TTL_SECONDS", "UPLOAD_URL_TTL_SECONDS"])
def test_signed_links_live_at_most_seven_days_in_a_bucket(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    assert settings_from(monkeypatch, **{name: "9999999"}).storage_backend == "local"
    assert config_error(monkeypatch, **S3_ENV, **{name: "604801"}) == [
        f"{name}: at most 604800 (7 days) with STORAGE_BACKEND=s3: longer links cannot be signed"
    ]


def test_secrets_stay_secret_in_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(monkeypatch, **S3_ENV, S3_SESSION_TOKEN="session-secret")
    shown = repr(settings) + str(settings.model_dump())
    assert SECRET_KEY not in shown
    assert "session-secret" not in shown
