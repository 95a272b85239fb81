"""The operators' dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright).

The broker runs as `relais run --demo-target` (embedded log); the demo target fails on demand.
Screenshots go to test-artifacts/ (git-ignored) so a failed run can be looked at.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.support.processes import REPO, free_port
from tests.support.producers import TOKEN_A, write_producers, write_targets

pytestmark = pytest.mark.browser
REQUIRED = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ARTIFACTS = REPO / "test-artifacts"
OPERATOR, VIEWER = "browser-operator-token", "browser-viewer-token"


def _unavailable(why: str) -> None:
    if REQUIRED:
        pytest.fail(f"browser tests are required in CI: {why}")
    pytest.skip(why)


@dataclass
class Broker:
    base: str
    target: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _wait(condition: Any, broker: Broker | None, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if broker is not None:
            assert broker.proc.poll() is None, broker.tail()
        try:
            value = condition()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("timed out" + ("\n" + broker.tail() if broker else ""))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    tmp = tmp_path_factory.mktemp("dashboard")
    http_port, target_port = free_port(), free_port()
    ops = tmp / "operators.yaml"
    olga, victor = (hashlib.sha256(t.encode()).hexdigest() for t in (OPERATOR, VIEWER))
    ops.write_text(f"operators:\n  - {{id: olga, role: operator, token_sha256: {olga}}}\n"
                   f"  - {{id: victor, role: viewer, token_sha256: {victor}}}\n")
    env = {**os.environ, "RELAIS_HTTP_PORT": str(http_port), "RELAIS_EMBEDDED_LOG_PATH": str(tmp / "log.db"),
           "RELAIS_DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/ledger.db", "RELAIS_BLOB_DIR": str(tmp / "blobs"),
           "RELAIS_PRODUCERS_FILE": str(write_producers(tmp / "producers.yaml")), "RELAIS_OPERATORS_FILE": str(ops),
           "RELAIS_TARGETS_FILE": str(write_targets(tmp / "t.yaml", {"demo": f"http://127.0.0.1:{target_port}/fhir"})),
           "RELAIS_RETRY_DELAYS_S": "[0.2, 0.4]", "RELAIS_MAX_ATTEMPTS": "2", "RELAIS_LOG_FORMAT": "json",
           "RELAIS_TOPIC_PARTITIONS": "2", "RELAIS_ALERT_INTERVAL_S": "1"}
    env.pop("RELAIS_KAFKA_BOOTSTRAP", None)
    log = tmp / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run", "--demo-target", "--demo-target-port",
                                 str(target_port)], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    b = Broker(f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{target_port}", proc, log)
    try:
        _wait(lambda: httpx.get(f"{b.base}/readyz", timeout=2).status_code == 200, b)
        _wait(lambda: httpx.get(f"{b.target}/healthz", timeout=2).status_code == 200, b)
        yield b
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


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


def send(broker: Broker) -> str:
    bundle = orjson.loads((REPO / "examples/bundle-ssiad.json").read_bytes())
    answer = httpx.post(f"{broker.base}/fhir", content=orjson.dumps(bundle), timeout=30,
                        headers={"Authorization": f"Bearer {TOKEN_A}", "Content-Type": "application/fhir+json",
                                 "X-Relais-Target": "demo"})
    assert answer.status_code == 202, answer.text
    return answer.headers["X-Relais-Transfer-Id"]


def ops_get(broker: Broker, path: str) -> Any:
    return httpx.get(f"{broker.base}{path}", headers={"Authorization": f"Bearer {OPERATOR}"}, timeout=10).json()


async def login(page: Any, broker: Broker, token: str) -> None:
    await page.goto(f"{broker.base}/ops/ui")
    assert "/ops/ui/login" in page.url
    await page.fill("input[name=token]", token)
    await page.click("form[action='/ops/ui/login'] button")
    await page.wait_for_url(f"{broker.base}/ops/ui")


async def test_failing_target_then_replay_from_the_dlq_page(broker: Broker, page: Any) -> None:
    httpx.post(f"{broker.target}/_faults", json={"status": 500, "count": -1}, timeout=10).raise_for_status()
    transfer_id = send(broker)
    _wait(lambda: any(d["transfer_id"] == transfer_id for d in ops_get(broker, "/ops/dead-letters")["items"]), broker)

    await login(page, broker, OPERATOR)
    row = page.locator("tr.target-row[data-target=demo]")
    assert await row.get_attribute("data-health") == "failing"
    assert "en échec" in await row.inner_text()
    assert await page.locator("#dlq-size .big").inner_text() == "1"
    await page.screenshot(path=str(ARTIFACTS / "overview-failing-target.png"), full_page=True)

    await page.click("a[hreflang=en]")  # the English toggle, remembered afterwards
    assert "failing" in await page.locator("tr.target-row[data-target=demo]").inner_text()
    await page.click("a[hreflang=fr]")

    httpx.delete(f"{broker.target}/_faults", timeout=10).raise_for_status()  # the target is back
    await page.click("nav a[href='/ops/ui/dlq']")
    letter = page.locator(f"tr.dead-letter[data-id='{transfer_id}/demo']")
    assert await letter.count() == 1
    await page.screenshot(path=str(ARTIFACTS / "dlq-before-replay.png"), full_page=True)
    await letter.locator("button.replay").click()
    assert "Rejoué" in await page.locator(".flash").inner_text()

    await page.goto(f"{broker.base}/ops/ui/transfers/{transfer_id}")
    for _ in range(150):
        if await page.locator("h1 .s-delivered").count():
            break
        await asyncio.sleep(0.2)
        await page.reload()
    assert await page.locator("h1 .s-delivered").count() == 1, broker.tail()
    assert await page.locator("table.timeline tr.k-replayed").count() == 1
    await page.screenshot(path=str(ARTIFACTS / "transfer-delivered-after-replay.png"), full_page=True)
    received = httpx.get(f"{broker.target}/_received", timeout=10).json()
    assert len(received) >= 1
    await page.goto(f"{broker.base}/ops/ui/dlq")
    assert await page.locator(f"tr.dead-letter[data-id='{transfer_id}/demo']").count() == 0


async def test_viewer_sees_no_action_buttons_and_pause_resume(broker: Broker, page: Any) -> None:
    await login(page, broker, VIEWER)
    await page.goto(f"{broker.base}/ops/ui/targets/demo")
    assert await page.locator("form[action$='/pause']").count() == 0
    await page.goto(f"{broker.base}/ops/ui/dlq")
    assert await page.locator("button.replay").count() == 0
    await page.context.clear_cookies()

    await login(page, broker, OPERATOR)
    await page.goto(f"{broker.base}/ops/ui/targets/demo")
    await page.fill("input[name=reason]", "maintenance")
    await page.click("form[action$='/pause'] button")
    assert await page.locator("h1 .badge.paused").count() == 1
    assert ops_get(broker, "/ops/targets/demo")["paused"] is True
    await page.screenshot(path=str(ARTIFACTS / "target-paused.png"), full_page=True)
    await page.click("form[action$='/resume'] button")
    assert await page.locator("h1 .badge.paused").count() == 0
    await page.goto(f"{broker.base}/ops/ui/transfers?status=delivered")
    assert await page.locator("table.transfers tbody tr").count() >= 1
    await page.screenshot(path=str(ARTIFACTS / "transfers-browser.png"), full_page=True)
