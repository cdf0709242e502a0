"""The playground page in a real headless Chromium (Debian's `chromium`, driven by Playwright for
Python; nothing downloads a browser): sign up, one run of each product against the embedded
default (the `offline` provider; bring-your-own-key through the OpenAI fake), a screenshot per
product in the test output folder, and an axe-core accessibility check.

Screenshots go to `$AIHUB_TEST_OUTPUT` (default `test-output/`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MakeApp, Served
from tests.fakes.openai import FakeOpenAI
from tests.fakes.replicate import make_png

OUTPUT = Path(os.environ.get("AIHUB_TEST_OUTPUT", "test-output")) / "playground"
TIMEOUT_MS = 20_000


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    reason = "no Chromium on this machine (Debian: apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
async def served_embedded(make_app: MakeApp, fake_openai: FakeOpenAI) -> AsyncIterator[Served]:
    """The embedded default: no provider keys (everything on `offline`); bring-your-own-key
    goes to the OpenAI fake, as it would to BYOK_BASE_URL."""
    async with make_app(
        openai_api_key=None,
        gemini_api_key=None,
        replicate_api_token=None,
        offline_token_delay_ms=2,
        byok_base_url=fake_openai.base_url,
    ) as served:
        yield served


@pytest.fixture
async def page(served_embedded: Served) -> AsyncIterator[Any]:
    playwright_api = pytest.importorskip("playwright.async_api")
    executable = chromium_path()
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox"]
        )
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        await page.goto(served_embedded.base_url + "/")
        yield page
        await browser.close()
        assert errors == [], errors  # no uncaught script errors on the way


async def shot(page: Any, section: str) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    await page.locator(f"#{section}-section").screenshot(path=str(OUTPUT / f"{section}.png"))


async def test_every_product_runs_in_the_playground(
    page: Any, served_embedded: Served, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    # What runs where: the page says plainly that products run offline.
    providers = page.locator("#providers")
    await providers.get_by_text("offline provider").first.wait_for()
    assert "offline provider" in (await providers.inner_text())

    # Sign up with a local account.
    await page.fill("#signup-email", "playground@example.com")
    await page.fill("#signup-password", "correct-horse-battery")
    await page.click("#signup-button")
    await page.wait_for_selector("#whoami[data-state='signed-in']")
    assert "playground@example.com" in await page.inner_text("#whoami")

    # Business ideas: the Markdown renders as it arrives and ends done.
    await page.click("#ideas-start")
    await page.wait_for_selector("#ideas-output[data-state='done']")
    ideas = page.locator("#ideas-output")
    assert await ideas.locator("h1, h2, h3, h4, h5, h6, p, li").count() > 0
    assert "offline" in (await page.inner_text("#ideas-status")).lower()
    await shot(page, "ideas")

    # Coding challenges: generate, answer, see the verdict, quota and history.
    await page.select_option("#challenge-difficulty", "easy")
    await page.click("#challenge-generate")
    await page.click("#challenge-option-0")
    await page.wait_for_selector(
        "#challenge-result[data-state='right'], #challenge-result[data-state='wrong']"
    )
    assert (await page.inner_text("#challenge-result")).strip()
    await page.wait_for_function("document.querySelector('#quota').textContent.includes('49')")
    await page.wait_for_selector("#history [data-testid='history-item']")
    await shot(page, "challenges")

    # Image jobs: each image arrives, then time to first image and batch time.
    await page.fill("#images-prompt", "a lighthouse at dusk")
    await page.fill("#images-count", "3")
    await page.click("#images-start")
    await page.wait_for_selector("#images-summary[data-state='done']")
    assert await page.locator("#images-grid img").count() == 3
    summary = (await page.inner_text("#images-summary")).lower()
    assert "first image" in summary
    await shot(page, "images")

    # Chats with files: create, upload an image, ask, see the reply, rename, delete.
    await page.click("#chat-new")
    picture = tmp_path / "cat.png"
    picture.write_bytes(make_png())
    await page.set_input_files("#chat-file", str(picture))
    await page.fill("#chat-input", "What is in this picture?")
    await page.click("#chat-send")
    await page.wait_for_selector("#chat-messages[data-state='done']")
    messages = page.locator("#chat-messages [data-testid='chat-message']")
    assert await messages.count() >= 2
    assert await page.locator("#chat-messages img").count() >= 1  # the upload, loaded by link
    await page.fill("#chat-title", "A cat, probably")
    await page.click("#chat-rename")
    await page.locator("#chat-list").get_by_text("A cat, probably").wait_for()
    await shot(page, "chats")
    asked: list[str] = []

    async def answer(dialog: Any, *, accept: bool) -> None:
        asked.append(dialog.message)
        await (dialog.accept() if accept else dialog.dismiss())

    page.once("dialog", lambda dialog: answer(dialog, accept=False))
    await page.click("#chat-delete")  # asked first; declined, the chat stays
    await page.wait_for_timeout(300)
    assert len(asked) == 1
    assert "A cat, probably" in asked[0]
    assert await page.locator("#chat-list").get_by_text("A cat, probably").count() == 1
    page.once("dialog", lambda dialog: answer(dialog, accept=True))
    await page.click("#chat-delete")
    await page.locator("#chat-list").get_by_text("A cat, probably").wait_for(state="detached")

    # Bring your own key: a key typed into the page, the reply streamed from the upstream.
    fake_openai.text = "Relayed with your own key."
    await page.fill("#byok-key", "sk-test-typed-into-the-page-000000")
    await page.fill("#byok-input", "Hello?")
    await page.click("#byok-send")
    await page.wait_for_selector("#byok-output[data-state='done']")
    assert "Relayed with your own key." in await page.inner_text("#byok-output")
    await shot(page, "byok")

    # Usage per product.
    await page.click("#usage-refresh")
    for product in ("ideas", "challenges", "images", "chats"):
        await page.wait_for_selector(f"#usage-table [data-testid='usage-row-{product}']")
    await shot(page, "usage")


async def test_errors_read_as_a_person_wants(
    page: Any, served_embedded: Served, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail_with(401, {"error": {"message": "Incorrect API key provided: sk-t***"}})
    await page.fill("#byok-key", "sk-test-a-wrong-key-0000000000")
    await page.fill("#byok-input", "Hello?")
    await page.click("#byok-send")
    await page.wait_for_selector("#byok-output[data-state='error'], #byok-status:has-text('key')")
    status = await page.inner_text("#byok-status")
    assert "key" in status.lower()
    assert "sk-test-a-wrong-key" not in await page.content()  # never echoed back

    await page.click("#ideas-start")  # not signed in
    await page.wait_for_selector("#ideas-output[data-state='error'], #ideas-status:has-text('ign')")
    assert "sign in" in (await page.inner_text("#ideas-status")).lower()


async def test_the_page_passes_an_accessibility_check_and_fits_a_phone(page: Any) -> None:
    axe_module = pytest.importorskip("axe_playwright_python.async_playwright")
    await page.fill("#signup-email", "a11y@example.com")
    await page.fill("#signup-password", "correct-horse-battery")
    await page.click("#signup-button")
    await page.wait_for_selector("#whoami[data-state='signed-in']")

    results = await axe_module.Axe().run(page)
    serious = [
        (v["id"], v["impact"], [node["html"][:200] for node in v["nodes"]])
        for v in results.response["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert serious == [], serious

    # Every control has a label, and the actions are buttons a keyboard reaches.
    unlabeled = await page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea')]
            .filter(e => e.type !== 'hidden' && !(e.labels && e.labels.length)
                    && !e.getAttribute('aria-label') && !e.getAttribute('aria-labelledby'))
            .map(e => e.id)"""
    )
    assert unlabeled == []
    await page.focus("#signup-email")
    await page.keyboard.press("Tab")
    focused = await page.evaluate("document.activeElement && document.activeElement.id")
    assert focused  # focus moved to another control

    await page.set_viewport_size({"width": 375, "height": 800})
    OUTPUT.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(OUTPUT / "phone.png"))
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"the page scrolls sideways by {overflow} px at 375 px"
