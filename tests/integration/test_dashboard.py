"""The status page (``/dashboard``) in a real browser: Debian's headless Chromium through Selenium,
against the in-process stack. The page asks for the admin key and shows nothing without it; with
it (from the URL's fragment, which it then removes) it draws every live worker and registered
adapter from ``/v1/status`` and follows the load as it changes, with no console error and no
Content-Security-Policy violation. A screenshot of it under load is left in ``test-artifacts/``.

Selenium's calls block, so each runs in a thread: the gateway serving the page runs on this
test's event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from dlora.common import subjects
from dlora.common.messages import MovePlan, MoveRequest, PlanMethod, PlanTrigger
from tests.integration.conftest import ADMIN_KEY, Stack
from tests.integration.test_gateway import post

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "test-artifacts" / "dashboard.png"

# Injected before any page script (CDP runs it outside the page's CSP): every CSP violation the
# page causes is kept in window.__csp for the test to read.
RECORD_CSP = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__csp.push(e.violatedDirective + " " + e.blockedURI + " " + (e.sourceFile || "") + ":" + e.lineNumber);
});
"""

# What the page shows, read in one call (its rows are redrawn every poll).
SNAPSHOT = """
const visible = (id) => { const e = document.getElementById(id); return !!e && !e.hidden; };
const rows = (table, key) => Array.from(document.querySelectorAll("#" + table + " tbody tr")).map((tr) => {
  const row = {id: tr.dataset[key]};
  tr.querySelectorAll("td[data-field]").forEach((td) => { row[td.dataset.field] = td.textContent.trim(); });
  return row;
});
return {
  url: location.href,
  login: visible("login"),
  content: visible("content"),
  message: document.getElementById("login-message").textContent,
  banner: visible("banner") ? document.getElementById("banner").textContent : "",
  updated: document.getElementById("updated").textContent,
  workers: rows("workers", "worker"),
  adapters: rows("adapters", "adapter"),
  migrations: document.querySelectorAll("#migrations > li").length,
  csp: window.__csp || null,
};
"""

Snapshot = dict[str, Any]


def _chromium() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_CSP})
    return driver


@pytest.fixture
async def browser() -> AsyncIterator[webdriver.Chrome]:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.fail(
            f"{CHROMIUM} and {CHROMEDRIVER} are missing: Debian's chromium and chromium-driver packages, "
            "which `make chromium` installs (`make test` runs it)"
        )
    driver = await asyncio.to_thread(_chromium)
    try:
        yield driver
    finally:
        await asyncio.to_thread(driver.quit)


async def snapshot(driver: webdriver.Chrome) -> Snapshot:
    return await asyncio.to_thread(driver.execute_script, SNAPSHOT)


async def until(driver: webdriver.Chrome, ok: Callable[[Snapshot], bool], what: str, timeout: float = 10) -> Snapshot:
    """The page's first snapshot for which ``ok`` holds, polled; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        snap = await snapshot(driver)
        if ok(snap):
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed {what}; it shows {snap}")
        await asyncio.sleep(0.1)


async def browser_log(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """The console entries since the last call (reading drains them)."""
    return await asyncio.to_thread(driver.get_log, "browser")


def by_id(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {r["id"]: r for r in rows}


def stepping(worker: dict[str, str]) -> bool:
    """A worker row with requests whose worker has run a step: before its first (its adapters
    still loading under load) it shows them waiting, its mode ``idle``."""
    return bool(count(worker["running"]) + count(worker["waiting"])) and worker["mode"].split()[0] != "idle"


def count(text: str) -> int:
    return int(text.replace(",", "")) if text not in ("", "–") else 0


async def test_dashboard_asks_for_the_key_then_follows_the_cluster_under_load(
    stack: Stack, browser: webdriver.Chrome
) -> None:
    page = stack.url + "/dashboard"
    workers = {w.s.worker_id for w in stack.workers}

    # The page is static and locked down; the data needs the admin key.
    async with aiohttp.ClientSession() as http:
        async with http.get(page) as r:
            assert r.status == 200 and r.content_type == "text/html"
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
            assert ADMIN_KEY not in await r.text()
        async with http.get(stack.url + "/v1/status") as r:
            assert r.status == 401
        async with http.get(stack.url + "/v1/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
            assert r.status == 200
            status = await r.json()
    adapters = {a["name"] for a in status["adapters"]}
    assert {"lora-0", "lora-1", "lora-2", "lora-3", stack.gateway.base_name} <= adapters

    # (a) Without a key: the form, and no data.
    await asyncio.to_thread(browser.get, page)
    snap = await until(browser, lambda s: s["login"], "the login form")
    assert not snap["content"] and snap["workers"] == [] and snap["adapters"] == []

    # A wrong key is refused: the form again, with a message, and still no data.
    def submit(key: str) -> None:
        field = browser.find_element(By.ID, "key-input")
        field.send_keys(key)
        browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()

    await asyncio.to_thread(submit, "not-the-key")
    snap = await until(browser, lambda s: s["login"] and "refused" in s["message"], "the refusal")
    assert not snap["content"] and snap["workers"] == [] and snap["adapters"] == []
    refused = await browser_log(browser)  # only the 401 itself may be logged for it
    assert all("401" in e["message"] for e in refused if e["level"] == "SEVERE"), refused
    # A gateway with no admin_key refuses every key: said so, not "that key" (code reading: a helper)
    settings, auth = stack.gateway.auth.s, stack.gateway.auth
    auth.s = msgspec.structs.replace(settings, admin_key="")
    try:
        await asyncio.to_thread(submit, "any-key")
        snap = await until(browser, lambda s: s["login"] and "no admin_key configured" in s["message"], "page off")
    finally:
        auth.s = settings
    await browser_log(browser)  # (its 401, logged)

    # A key no header can carry (a user's trial: "Connection lost", retried for ever): said so.
    await asyncio.to_thread(browser.get, "about:blank")
    await asyncio.to_thread(browser.get, f"{page}#key=%E2%82%AC-key")
    snap = await until(browser, lambda s: s["login"] and "cannot carry" in s["message"], "the unsendable key")
    assert not snap["content"]

    # (b) The key in the fragment: every live worker and registered adapter, and the key gone from the URL.
    await asyncio.to_thread(browser.get, "about:blank")  # a fresh load, not a same-document jump
    await asyncio.to_thread(browser.get, f"{page}#key={ADMIN_KEY}")
    snap = await until(
        browser,
        lambda s: {r["id"] for r in s["workers"]} == workers and {r["id"] for r in s["adapters"]} == adapters,
        "every worker and adapter",
    )
    assert not snap["login"] and snap["content"] and snap["updated"].startswith("Last update")
    assert "#" not in snap["url"] and ADMIN_KEY not in snap["url"], snap["url"]
    before = by_id(snap["adapters"])
    assert count(before["lora-1"]["requests"]) == 0 and before["lora-1"]["ttft"] == "–"

    # (c) Load: the page follows it while it runs, and counts it when it is over. Waves of
    # requests go until the page has shown a worker stepping through them (a wave on the tiny model can
    # end between two polls), within a bound.
    wave = [{"model": "lora-1", "prompt": "kalo", "max_tokens": 128}] * 6 + [
        {"model": "lora-2", "prompt": "kalo remi", "max_tokens": 128}
    ] * 2
    sent, busy = 0, None  # waves sent; the first snapshot that showed a worker stepping
    deadline = time.monotonic() + 15
    while busy is None and time.monotonic() < deadline:
        load = asyncio.gather(*(post(stack, "/v1/completions", b) for b in wave))
        sent += 1
        while not load.done():
            snap = await snapshot(browser)
            if busy is None and any(stepping(w) for w in snap["workers"]):
                busy = snap
                # (e) The page under load, for a person to look at.
                SCREENSHOT.parent.mkdir(exist_ok=True)
                assert await asyncio.to_thread(browser.save_screenshot, str(SCREENSHOT))
            await asyncio.wait([load], timeout=0.1)
        assert all(code == 200 for code, _ in load.result()), load.result()
    assert busy is not None, f"the page never showed a worker stepping during {sent} waves of load"
    # A worker at work shows the mode its last step ran in, what is merged, and its KV cache in use.
    working = [w for w in busy["workers"] if stepping(w)]
    assert all(w["mode"].split()[0] in ("merged", "unmerged", "mixed") for w in working), working
    assert all(w["merged"] in ("–", "lora-1", "lora-2") and w["kv"].endswith("%") for w in working), working
    snap = await until(
        browser,
        lambda s: (
            count(by_id(s["adapters"])["lora-1"]["requests"]) == 6 * sent
            and count(by_id(s["adapters"])["lora-2"]["requests"]) == 2 * sent
        ),
        "the load's requests counted",
    )
    after = by_id(snap["adapters"])
    assert count(after["lora-1"]["tokens"]) > 0 and after["lora-1"]["ttft"] != "–" and after["lora-1"]["e2e"] != "–"
    assert count(after["lora-0"]["requests"]) == 0 and after["lora-1"]["errors"] == "0"
    # The adapters that ran are loaded on a worker now, and the page says where.
    assert any(tier in after["lora-1"]["placement"] for tier in ("gpu", "cpu")), after["lora-1"]

    # (f) A migration plan, as the migrator publishes it, appears as it happens.
    plan = MovePlan(
        plan_id="plan-under-test",
        created=time.time(),
        moves=[MoveRequest(request_id="req-moved", adapter="lora-1", to_worker="w1", ship_kv=True)],
        method=PlanMethod.ILP,
        trigger=PlanTrigger.QUEUE_DELAY,
        solve_seconds=0.004,
        makespan_before_s=3.0,
        makespan_after_s=2.0,
    )
    await stack.nc.publish(subjects.MOVES, msgspec.json.encode(plan))
    snap = await until(browser, lambda s: s["migrations"] == 1, "the migration plan")
    shown = await asyncio.to_thread(browser.find_element(By.ID, "migrations").get_attribute, "textContent")
    assert all(part in shown for part in ("queue-delay", "ilp", "req-moved", "w1", "kv", "3.00 s → 2.00 s")), shown

    # (d) Nothing went wrong in the page.
    snap = await snapshot(browser)
    assert snap["csp"] == [], snap["csp"]
    assert snap["banner"] == ""
    log = await browser_log(browser)
    assert not [e for e in log if e["level"] == "SEVERE"], log
    assert not [e for e in log if "Content Security Policy" in e["message"]], log
