"""Links that grant access without a token, until they expire: `?expires=<unix>&signature=<mac>`.

The MAC is HMAC-SHA256 over the path and the expiry, so a link opens exactly one object and only
until its time is up. The key is `STORAGE_SIGNING_KEY`, or one derived from aihub's token signing
key (every instance that shares one shares the other).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from datetime import datetime
from urllib.parse import urlencode


class UrlSigner:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def query(self, path: str, *, expires_at: datetime, bound: str = "GET") -> str:
        """The query string (`expires=...&signature=...`) that opens `path` until `expires_at`,
        for what `bound` names (a method, and for uploads the content type: `PUT image/png`)."""
        expires = math.floor(expires_at.timestamp())
        return urlencode({"expires": expires, "signature": self._mac(path, expires, bound)})

    def link(self, base_url: str, path: str, *, expires_at: datetime, bound: str = "GET") -> str:
        """The absolute signed URL of `path` on `base_url`."""
        return f"{base_url}{path}?{self.query(path, expires_at=expires_at, bound=bound)}"

    def verify(
        self, path: str, *, expires: int, signature: str, now: datetime, bound: str = "GET"
    ) -> bool:
        if expires < now.timestamp():
            return False
        return hmac.compare_digest(self._mac(path, expires, bound), signature)

    def _mac(self, path: str, expires: int, bound: str) -> str:
        message = f"{bound}\n{path}\n{expires}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")
