"""The web console in a real headless browser (Debian's chromium and chromium-driver, driven
by selenium) against the API served over real HTTP, a real Celery worker and three simulated
devices: sign in, see the fleet online, run a provisioning job and watch it finish live (its
events arrive over server-sent events), start a short federated learning job and see its
accuracy curve. Every page passes a simple accessibility check (labels, names, lang, heading
order) and is saved as a screenshot under build/test-artifacts/console/."""

from __future__ import annotations

import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.fleet import register_devices
from tests.fixtures.helpers import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "build" / "test-artifacts" / "console"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

#: run in each page: what a person with a screen reader or keyboard would miss
A11Y_CHECK = """
const out = [];
if (!document.documentElement.lang) out.push('html has no lang');
if (!document.title) out.push('no title');
for (const el of document.querySelectorAll('input, select, textarea')) {
  if (el.type === 'hidden') continue;
  const named = el.getAttribute('aria-label') || el.closest('label') ||
    (el.id && document.querySelector('label[for="' + el.id + '"]'));
  if (!named) out.push('unlabelled ' + el.tagName + ' ' + (el.name || el.id));
}
for (const el of document.querySelectorAll('img')) if (!el.hasAttribute('alt')) out.push('img without alt');
for (const el of document.querySelectorAll('svg[role=img]'))
  if (!el.getAttribute('aria-label')) out.push('svg image without a name');
for (const el of document.querySelectorAll('button, a')) if (!el.textContent.trim() && !el.getAttribute('aria-label'))
  out.push('unnamed ' + el.tagName);
let last = 0;
for (const h of document.querySelectorAll('h1, h2, h3, h4')) {
  const n = +h.tagName[1];
  if (n > last + 1) out.push('heading ' + h.tagName + ' skips a level: ' + h.textContent);
  last = n;
}
if (document.querySelectorAll('h1').length !== 1) out.push('not exactly one h1');
if (!document.querySelector('main')) out.push('no main landmark');
return out;
"""


@pytest.fixture()
def served(api: Any) -> Iterator[str]:
    """The app under test on a real loopback HTTP server (threaded: event streams stay open)."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, api.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


@pytest.fixture()
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs chromium and chromium-driver (scripts/bootstrap test installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        opts.add_argument(arg)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class Console:
    """The browser on the console: pages by path, checked and photographed."""

    def __init__(self, driver: Any, base: str) -> None:
        self.d, self.base = driver, base
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for stale in ARTIFACTS.glob("failure.*"):
            stale.unlink()

    def open(self, path: str) -> None:
        self.d.get(self.base + path)

    def css(self, selector: str) -> list[Any]:
        return list(self.d.find_elements("css selector", selector))

    def text(self, selector: str) -> str:
        found = self.css(selector)
        return str(found[0].text) if found else ""

    def shoot(self, name: str) -> None:
        """Check the page's accessibility basics, then save a screenshot of it."""
        problems = self.d.execute_script(A11Y_CHECK)
        assert problems == [], f"{name}: {problems}"
        self.d.save_screenshot(str(ARTIFACTS / f"{name}.png"))

    def wait(self, check: Any, timeout: float, what: str) -> Any:
        """*check* until it holds; on a timeout, the page (saved as failure.png/.html) says where it was."""
        try:
            return wait_until(check, timeout, what, interval=0.2)
        except AssertionError as exc:
            self.d.save_screenshot(str(ARTIFACTS / "failure.png"))
            (ARTIFACTS / "failure.html").write_text(self.d.page_source)
            raise AssertionError(f"{exc}; at {self.d.current_url}: {self.text('main')[:1500]}") from None


def test_console_in_a_browser(api: Any, worker: Any, sim_devices: Any, served: str, browser: Any, flush: None) -> None:
    ids = register_devices(api, sim_devices(3, privilege=["user", "root", "root"]), site="lab")
    # the FL client and the data shards, while the browser works, on the two root devices: they run
    # as this user, who can run the venv's Python (numpy); the "user" account cannot reach it
    trainers = ids[1:]
    _, install = api.call("POST", "/api/v1/fl/install", json={"devices": trainers, "python": sys.executable})
    for _ in range(2):  # two health samples per device: a line in each sparkline
        _, sweep = api.call("POST", "/api/v1/health/sweep", json={})
        assert api.wait_job(sweep["id"])["state"] == "succeeded"
    ui = Console(browser, served)

    ui.open("/ui/fleet")  # not signed in: the sign-in page
    assert "/ui/sign-in" in browser.current_url
    ui.shoot("sign-in")
    ui.css("#token")[0].send_keys(api.admin)
    ui.css("form.narrow button")[0].click()
    ui.wait(lambda: ui.css("#devices"), 30, "the fleet page after signing in")
    ui.open("/ui/fleet")
    rows = ui.css("#devices tbody tr")
    # online, or degraded where this shared test machine's load per CPU is past the threshold: up either way
    states = [r.find_element("css selector", ".state").text for r in rows]
    assert len(rows) == 3 and set(states) <= {"online", "degraded"}, [r.text for r in rows]
    assert len(ui.css("#devices svg.spark polyline")) == 3  # a line of health samples per device
    ui.shoot("fleet")

    ui.css("#devices tbody tr a")[0].click()
    ui.wait(lambda: ui.css("#provision-form"), 30, "the device page")
    assert "What its privilege allows" in browser.page_source
    ui.shoot("device")
    ui.css("#playbook option[value='facts']")[0].click()
    ui.css("#provision-form button")[0].click()
    ui.wait(lambda: "/ui/jobs/job_" in browser.current_url, 30, "the provisioning job's page")
    assert ui.css("[data-stream]"), "the job had finished before its page opened: nothing to watch live"
    ui.wait(lambda: ui.text("#job-state") == "succeeded" and ui.css("#results tr[data-host]"), 120,
            "the provisioning job to finish, live")  # fmt: skip
    assert len(ui.css("#events li")) >= 2
    ui.shoot("job")

    installed = api.wait_job(install["id"], 60)
    assert installed["state"] == "succeeded", (installed.get("error"), installed.get("results"))
    _, part = api.call("POST", "/api/v1/fl/partition", json={"devices": trainers})
    assert api.wait_job(part["id"], 60)["state"] == "succeeded"
    ui.open("/ui/fl")
    for d in trainers:
        ui.css(f"#fl-start input[value='{d}']")[0].click()
    for field, value in (("#fl-rounds", "3"), ("#fl-python", sys.executable)):
        ui.css(field)[0].clear()
        ui.css(field)[0].send_keys(value)
    ui.css("#fl-start button")[0].click()
    ui.wait(lambda: "/ui/fl/job_" in browser.current_url, 30, "the FL job's page")
    ui.wait(lambda: ui.text("#job-state") == "succeeded" and len(ui.css("#rounds tbody tr td")) > 8, 180,
            "the FL job to finish and its page to show it")  # fmt: skip
    points = ui.css("#accuracy-chart svg circle")
    assert len(points) == 3, browser.page_source[-3000:]
    assert ui.css("a[download]")  # the global model
    ui.shoot("fl-job")

    _, cl = api.call("POST", "/api/v1/clusters", json={"name": "lab", "profile": "direct", "target_level": 0})
    for d in ids:
        api.call("POST", f"/api/v1/clusters/{cl['id']}/devices", json={"device_id": d})
    for name, path in (("jobs", "/ui/jobs"), ("clusters", "/ui/clusters"), ("cluster", f"/ui/clusters/{cl['id']}"),
                       ("fl", "/ui/fl"), ("deployments", "/ui/deployments"), ("tokens", "/ui/tokens")):  # fmt: skip
        ui.open(path)
        ui.shoot(name)
    assert "POST /ui/provision" in ui.text("#audit")  # the console's actions are audited
