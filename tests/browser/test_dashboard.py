"""The operators' dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright).

The broker runs as `relais run --demo-target` (embedded log, tests/support/broker.py); the demo target
fails on demand. Screenshots go to test-artifacts/ (git-ignored) so a failed run can be looked at.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.support.broker import OPERATOR_TOKEN, VIEWER_TOKEN, Broker, running_broker
from tests.support.processes import REPO

pytestmark = pytest.mark.browser
REQUIRED = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ARTIFACTS = REPO / "test-artifacts"


def _unavailable(why: str) -> None:
    if REQUIRED:
        pytest.fail(f"browser tests are required in CI: {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with running_broker(tmp_path_factory.mktemp("dashboard")) as b:
        yield b


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        _unavailable("no chromium executable (apt-get install -y chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, headless=True,
                                           args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        context = await browser.new_context(viewport={"width": 1366, "height": 768})
        try:
            yield await context.new_page()
        finally:
            await context.close()
            await browser.close()


def dead_letters(broker: Broker) -> list[str]:
    return [d["id"] for d in broker.ops("GET", "/ops/dead-letters").json()["items"]]


def status_of(broker: Broker, transfer_id: str) -> str | None:
    answer = broker.ops("GET", f"/ops/transfers/{transfer_id}")
    return answer.json()["status"] if answer.status_code == 200 else None


async def login(page: Any, broker: Broker, token: str) -> None:
    await page.goto(f"{broker.base}/ops/ui")
    assert "/ops/ui/login" in page.url
    await page.fill("input[name=token]", token)
    await page.click("form[action='/ops/ui/login'] button")
    await page.wait_for_url(f"{broker.base}/ops/ui")


async def reload_until(page: Any, selector: str, broker: Broker, tries: int = 150) -> None:
    for _ in range(tries):
        if await page.locator(selector).count():
            return
        await asyncio.sleep(0.2)
        await page.reload()
    raise AssertionError(f"{selector} never appeared\n{broker.tail()}")


async def test_failing_target_then_replay_from_the_dlq_page(broker: Broker, page: Any) -> None:
    broker.fault({"status": 500, "count": -1})
    transfer_id, marker = broker.send()
    broker.wait(lambda: f"{transfer_id}/demo" in dead_letters(broker), what="the dead letter")

    await login(page, broker, OPERATOR_TOKEN)
    row = page.locator("tr.target-row[data-target=demo]")
    assert await row.get_attribute("data-health") == "failing"
    assert "en échec" in await row.inner_text()
    assert await page.locator("#dlq-size .big").inner_text() == "1"
    await page.screenshot(path=str(ARTIFACTS / "overview-failing-target.png"), full_page=True)

    await page.click("a[hreflang=en]")  # the English toggle, remembered afterwards
    assert "failing" in await page.locator("tr.target-row[data-target=demo]").inner_text()
    await page.click("a[hreflang=fr]")

    broker.fault(None)  # the target is back
    await page.click("nav a[href='/ops/ui/dlq']")
    letter = page.locator(f"tr.dead-letter[data-id='{transfer_id}/demo']")
    assert await letter.count() == 1
    await page.screenshot(path=str(ARTIFACTS / "dlq-before-replay.png"), full_page=True)
    await letter.locator("button.replay").click()
    await page.wait_for_url(f"{broker.base}/ops/ui/dlq?msg=replayed")
    assert "Rejoué" in await page.locator(".flash").inner_text()
    # The list updated with the redirect: the replayed row is gone without a manual reload.
    assert await page.locator(f"tr.dead-letter[data-id='{transfer_id}/demo']").count() == 0

    await page.goto(f"{broker.base}/ops/ui/transfers/{transfer_id}")
    await reload_until(page, "h1 .s-delivered", broker)
    assert await page.locator("h1 .s-delivered").inner_text() == "livré"  # statuses in French
    assert await page.locator("table.timeline tr.k-replayed").count() == 1
    await page.screenshot(path=str(ARTIFACTS / "transfer-delivered-after-replay.png"), full_page=True)
    assert broker.received(marker) == 1


async def test_a_second_submit_of_a_replay_is_refused_once_done(broker: Broker, page: Any) -> None:
    broker.fault({"status": 422, "count": 1})
    transfer_id, marker = broker.send()
    dlq_id = f"{transfer_id}/demo"
    broker.wait(lambda: dlq_id in dead_letters(broker), what="the dead letter")
    await login(page, broker, OPERATOR_TOKEN)
    await page.goto(f"{broker.base}/ops/ui/transfers/{transfer_id}")
    form = page.locator(f"tr.dead-letter[data-id='{dlq_id}'] form[action='/ops/ui/dlq/replay']")
    # Two submits of the same form, as a double click or a second tab would send them.
    statuses = await form.evaluate("""async (f) => {
        const send = () => fetch(f.action, {method: 'POST', body: new URLSearchParams(new FormData(f)),
                                            redirect: 'follow'}).then(r => r.url);
        return await Promise.all([send(), send()]);
    }""")
    assert sorted(u.rsplit("msg=", 1)[-1] for u in statuses) == ["already", "replayed"]
    broker.wait(lambda: status_of(broker, transfer_id) == "delivered", what="delivery after replay")
    assert broker.received(marker) == 1


async def test_rejected_transfer_page_shows_every_issue_with_its_fhirpath(broker: Broker, page: Any) -> None:
    transfer_id, _ = broker.send(invalid=True)
    broker.wait(lambda: status_of(broker, transfer_id) == "rejected", what="the rejection")
    await login(page, broker, VIEWER_TOKEN)
    await page.goto(f"{broker.base}/ops/ui/transfers/{transfer_id}")
    assert await page.locator("h1 .s-rejected").inner_text() == "rejeté"
    rows = page.locator("table.issues tr.issue")
    assert await rows.count() >= 3
    expressions = await page.locator("table.issues td.expression").all_inner_texts()
    rules = await page.locator("table.issues td.rule").all_inner_texts()
    assert "Bundle.entry[1].resource.identifier" in expressions
    assert "tddui-patient-ins/card/identifier" in rules
    assert "erreur" in await rows.first.inner_text()
    await page.screenshot(path=str(ARTIFACTS / "transfer-rejected-issues.png"), full_page=True)


async def test_a_target_completely_down_is_shown_down_in_red(broker: Broker, page: Any) -> None:
    broker.fault({"status": 503, "count": -1})
    sent = [broker.send() for _ in range(2)]
    for transfer_id, _ in sent:
        broker.wait(lambda t=transfer_id: f"{t}/demo" in dead_letters(broker), what="dead letters")
    await login(page, broker, OPERATOR_TOKEN)
    row = page.locator("tr.target-row[data-target=demo]")
    assert await row.get_attribute("data-health") == "down"
    badge = row.locator(".badge.down")
    assert (await badge.inner_text()).lower() == "hors service"
    assert await badge.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(179, 38, 30)"
    detail = await row.locator(".down-detail").inner_text()
    assert "hors service depuis" in detail and "HTTP 503" in detail
    await page.screenshot(path=str(ARTIFACTS / "overview-target-down.png"), full_page=True)

    broker.fault(None)  # back up; replay what waits so later tests start clean
    await page.goto(f"{broker.base}/ops/ui/dlq?target=demo")
    await page.click("form[action='/ops/ui/dlq/replay-all'] button")
    for transfer_id, _ in sent:
        broker.wait(lambda t=transfer_id: status_of(broker, t) == "delivered", what="deliveries after replay")
    await page.goto(f"{broker.base}/ops/ui")
    assert await page.locator("tr.target-row[data-target=demo]").get_attribute("data-health") != "down"


async def test_target_page_shows_its_policy_and_pause(broker: Broker, page: Any) -> None:
    await login(page, broker, VIEWER_TOKEN)
    await page.goto(f"{broker.base}/ops/ui/targets/demo")
    assert await page.locator("form[action$='/pause']").count() == 0  # a viewer may not act
    policy = page.locator("#policy")
    assert await policy.locator(".base-url").inner_text() == f"{broker.target}/fhir"
    assert await policy.locator(".auth-kind").inner_text() == "aucune"
    assert await policy.locator(".timeouts").inner_text() == "5.0 s · 30.0 s"
    assert (await policy.locator(".retry-tiers").inner_text()).startswith("0.2 s → 0.4 s")
    assert await policy.locator(".breaker").inner_text() == "5 · 30.0 s"
    assert "token" not in (await policy.inner_text()).lower()
    await page.context.clear_cookies()

    await login(page, broker, OPERATOR_TOKEN)
    await page.goto(f"{broker.base}/ops/ui/targets/demo")
    await page.fill("input[name=reason]", "maintenance")
    await page.click("form[action$='/pause'] button")
    assert await page.locator("h1 .badge.paused").count() == 1
    assert await page.locator(".pause-reason").inner_text() == "maintenance"
    assert broker.ops("GET", "/ops/targets/demo").json()["paused"] is True
    await page.screenshot(path=str(ARTIFACTS / "target-paused.png"), full_page=True)
    await page.click("form[action$='/resume'] button")
    assert await page.locator("h1 .badge.paused").count() == 0
    await page.goto(f"{broker.base}/ops/ui/transfers?status=delivered")
    assert await page.locator("table.transfers tbody tr").count() >= 1
    await page.screenshot(path=str(ARTIFACTS / "transfers-browser.png"), full_page=True)


async def test_poison_is_on_the_dlq_page(broker: Broker, page: Any) -> None:
    marker = "browser-poison-51c2"
    broker.fault_file.write_text(marker, encoding="utf-8")
    try:
        transfer_id, _ = broker.send(marker)
        broker.wait(lambda: f"{transfer_id}/@validator" in dead_letters(broker), what="the validator's dead letter")
    finally:
        broker.fault_file.unlink()
    await login(page, broker, OPERATOR_TOKEN)
    await page.goto(f"{broker.base}/ops/ui/dlq")
    letter = page.locator(f"tr.dead-letter[data-id='{transfer_id}/@validator']")
    assert await letter.locator("td.stage").inner_text() == "validator"
    await letter.locator("button.replay").click()
    assert await page.locator(f"tr.dead-letter[data-id='{transfer_id}/@validator']").count() == 0
    broker.wait(lambda: status_of(broker, transfer_id) == "delivered", what="delivery after the replay")
