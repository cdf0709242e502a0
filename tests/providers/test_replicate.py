"""The Replicate adapter, through the real replicate client, against the loopback fake."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aihub.providers.base import (
    ImageRequest,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderError,
    ProviderNotFound,
    ProviderRateLimited,
    ProviderUnavailable,
)
from aihub.providers.replicate import ReplicateProvider
from tests.fakes.replicate import FakeReplicate, make_png

TOKEN = "r8_TestToken0123456789abcdefghij"
MODEL = "black-forest-labs/flux-schnell"
CAT = ImageRequest(prompt="a cat in a hat", aspect_ratio="16:9")


def make_provider(fake: FakeReplicate, **options: Any) -> ReplicateProvider:
    return ReplicateProvider(
        api_key=TOKEN,
        base_url=fake.base_url,
        timeout=10,
        max_retries=0,
        poll_interval=options.pop("poll_interval", 0.02),
        **options,
    )


@pytest.fixture
async def provider(fake_replicate: FakeReplicate) -> AsyncIterator[ReplicateProvider]:
    provider = make_provider(fake_replicate)
    yield provider
    await provider.aclose()


async def test_returns_the_png_and_the_provider_url(
    provider: ReplicateProvider, fake_replicate: FakeReplicate
) -> None:
    fake_replicate.png = make_png(rgb=(200, 10, 10))

    image = await provider.generate_image(CAT, model=MODEL)

    assert image.data == fake_replicate.png
    assert image.mime_type == "image/png"
    (prediction_id,) = fake_replicate.predictions
    assert image.url == f"{fake_replicate.base_url}/files/{prediction_id}/out-0.png"
    assert image.extra == {"prediction_id": prediction_id}
    assert fake_replicate.file_downloads == 1


async def test_request_shape(provider: ReplicateProvider, fake_replicate: FakeReplicate) -> None:
    request = ImageRequest(prompt="a red fox", aspect_ratio="3:2", output_format="webp", seed=7)

    await provider.generate_image(request, model=MODEL)

    (created,) = fake_replicate.created
    assert created.path == f"/v1/models/{MODEL}/predictions"
    assert created.headers["authorization"] == f"Bearer {TOKEN}"
    assert created.headers["prefer"] == "wait=1"
    assert created.json == {
        "input": {
            "prompt": "a red fox",
            "num_outputs": 1,
            "aspect_ratio": "3:2",
            "output_format": "webp",
            "seed": 7,
        }
    }


async def test_polls_a_prediction_still_running(
    provider: ReplicateProvider, fake_replicate: FakeReplicate
) -> None:
    fake_replicate.image_delay = 0.2
    fake_replicate.prefer_wait_max = 0.0

    image = await provider.generate_image(CAT, model=MODEL)

    assert image.data == fake_replicate.png
    assert fake_replicate.polls >= 2


async def test_failed_prediction_raises_with_its_error(
    provider: ReplicateProvider, fake_replicate: FakeReplicate
) -> None:
    fake_replicate.fail_predictions("NSFW content detected. Try running it again.")

    with pytest.raises(ProviderError, match="NSFW content detected") as caught:
        await provider.generate_image(CAT, model=MODEL)

    assert type(caught.value) is ProviderError
    assert caught.value.provider == "replicate"
    assert fake_replicate.file_downloads == 0


async def test_failure_found_while_polling(
    provider: ReplicateProvider, fake_replicate: FakeReplicate
) -> None:
    fake_replicate.image_delay = 0.1
    fake_replicate.prefer_wait_max = 0.0
    fake_replicate.fail_predictions("CUDA out of memory")

    with pytest.raises(ProviderError, match="CUDA out of memory"):
        await provider.generate_image(CAT, model=MODEL)


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, ProviderBadRequest),
        (401, ProviderAuthError),
        (403, ProviderAuthError),
        (404, ProviderNotFound),
        (422, ProviderBadRequest),
        (429, ProviderRateLimited),
        (500, ProviderUnavailable),
        (503, ProviderUnavailable),
    ],
)
async def test_status_errors_are_mapped(
    provider: ReplicateProvider,
    fake_replicate: FakeReplicate,
    status: int,
    error_type: type[ProviderError],
) -> None:
    fake_replicate.fail_with(status)

    with pytest.raises(error_type) as caught:
        await provider.generate_image(CAT, model=MODEL)

    assert type(caught.value) is error_type
    assert caught.value.upstream_status == status
    assert isinstance(caught.value.__cause__, Exception)


async def test_wrong_token_is_an_auth_error(
    provider: ReplicateProvider, fake_replicate: FakeReplicate
) -> None:
    fake_replicate.require_api_token = "r8_other"

    with pytest.raises(ProviderAuthError) as caught:
        await provider.generate_image(CAT, model=MODEL)

    assert TOKEN not in caught.value.message


async def test_rate_limit_carries_retry_after(
    provider: ReplicateProvider, fake_replicate: FakeReplicate
) -> None:
    fake_replicate.fail_with(429, retry_after=12)

    with pytest.raises(ProviderRateLimited) as caught:
        await provider.generate_image(CAT, model=MODEL)

    assert caught.value.retry_after == 12


@pytest.mark.parametrize(("status", "kind"), [(500, ProviderUnavailable), (404, ProviderError)])
async def test_output_file_errors_are_mapped(
    provider: ReplicateProvider,
    fake_replicate: FakeReplicate,
    status: int,
    kind: type[ProviderError],
) -> None:
    fake_replicate.fail_files_with(status)

    with pytest.raises(kind) as caught:
        await provider.generate_image(CAT, model=MODEL)

    assert type(caught.value) is kind  # a file gone is not an unknown model
    assert caught.value.upstream_status == status
    assert caught.value.message == f"Replicate's output file could not be fetched ({status})"


@pytest.mark.parametrize("output", [b"<html>hi</html>", b"", b"GIF89a not supported"])
async def test_an_output_that_is_not_an_image_is_a_failure(
    provider: ReplicateProvider, fake_replicate: FakeReplicate, output: bytes
) -> None:
    fake_replicate.png = output

    with pytest.raises(ProviderError) as caught:
        await provider.generate_image(CAT, model=MODEL)

    assert caught.value.message == "Replicate's output is not an image"


async def test_deadline_cancels_the_prediction(fake_replicate: FakeReplicate) -> None:
    fake_replicate.image_delay = 5.0
    fake_replicate.prefer_wait_max = 0.0
    provider = make_provider(fake_replicate, deadline=0.3)
    try:
        with pytest.raises(ProviderUnavailable):
            await provider.generate_image(CAT, model=MODEL)
    finally:
        await provider.aclose()

    assert fake_replicate.cancellations == 1
    (prediction,) = fake_replicate.predictions.values()
    assert prediction.status() == "canceled"


async def test_concurrent_images(
    provider: ReplicateProvider, fake_replicate: FakeReplicate
) -> None:
    fake_replicate.image_delay = 0.3

    started = asyncio.get_running_loop().time()
    images = await asyncio.gather(*(provider.generate_image(CAT, model=MODEL) for _ in range(4)))
    elapsed = asyncio.get_running_loop().time() - started

    assert len({image.url for image in images}) == 4
    assert elapsed < 1.0  # concurrent, not 4 x 0.3 s one after the other


async def test_connection_refused_is_unavailable() -> None:
    provider = ReplicateProvider(api_key=TOKEN, base_url="http://127.0.0.1:9", max_retries=0)
    try:
        with pytest.raises(ProviderUnavailable):
            await provider.generate_image(CAT, model=MODEL)
    finally:
        await provider.aclose()


async def test_the_client_keeps_no_cookies(fake_replicate: FakeReplicate) -> None:
    """One client serves every user: a cookie that one answer sets (a load balancer's, a
    proxy's) must not ride along on the next request. (By a host name, not an IP address:
    cookie jars keep no cookies for IP addresses.)"""
    served_at = fake_replicate.base_url
    fake_replicate.base_url = served_at.replace("127.0.0.1", "localhost")
    fake_replicate.set_cookie = "__cf_bm=first-users-session; Path=/; HttpOnly"
    fake_replicate.prefer_wait_max = 0  # answered while still running: polled, then fetched
    provider = make_provider(fake_replicate)
    try:
        await provider.generate_image(CAT, model=MODEL)
        await provider.generate_image(CAT, model=MODEL)
    finally:
        await provider.aclose()
        fake_replicate.base_url = served_at
    methods = {(r.method, r.path.split("/")[1]) for r in fake_replicate.requests}
    assert len(methods) >= 2, methods
    assert [r.headers.get("cookie") for r in fake_replicate.requests] == [None] * len(
        fake_replicate.requests
    )
