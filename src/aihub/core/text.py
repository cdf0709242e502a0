"""Text a client sends, checked once at the edge: what passes can be stored by either database,
encoded for any provider, and logged."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def plain_text(value: str) -> str:
    """`value`, or `ValueError` (a 422 naming the field) for what JSON can carry but nothing
    behind aihub can take: NUL (PostgreSQL's text refuses it) and lone surrogates (no UTF-8
    encoding exists for them: the database driver and the SDKs' JSON both fail)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode (it holds a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(plain_text)]
"""A `str` field of a request body, checked by `plain_text`."""
