"""The web console against real services: one-time login links and sessions (single use,
expiry, HTTP-only SameSite=Strict cookie, GET only), scopes through the cookie, the
listing endpoints, the self-hosted API docs, the packaged assets, `beliefstore console`,
and, in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
selenium), the console itself and `/docs` with no network beyond loopback.

Without a browser the browser tests are skipped with the reason. Screenshots go to
`tests/artifacts/` (gitignored).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from beliefstore.access.consolesessions import COOKIE_NAME, ConsoleSessions
from beliefstore.access.keys import KeyStore, split_token
from beliefstore.cli.demo import SENTIMENT, TRIAGE
from beliefstore.events.producer import BeliefProducer, Receipt
from beliefstore.settings import Settings
from beliefstore.timefmt import now_millis
from tests.conftest import wait_caught_up
from tests.test_cli import cli_env, flat, run

ARTIFACTS = Path(__file__).parent / "artifacts"
SUBJECT = "customer-console"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SUPPORT_VALUES = ["frustrated", "unauthorized_recurring_charge", "direct", "high", "angry",
                  "confused"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Demo:
    """The demo's scenario (`beliefstore.cli.demo`) on real services, and the API."""

    url: str
    admin_key: str
    settings: Settings
    producer: BeliefProducer
    keys: KeyStore
    receipts: list[Receipt]

    def link(self, key: str | None = None, subject: str | None = SUBJECT) -> str:
        r = httpx.post(self.url + "/console/login-links", headers=bearer(key or self.admin_key),
                       json={"subject_id": subject} if subject else {}, timeout=30)
        assert r.status_code == 201, r.text
        return r.json()["url"]

    @contextmanager
    def session(self, key: str | None = None) -> Iterator[httpx.Client]:
        """An HTTP client logged in through a one-time link (cookie only, no bearer)."""
        with httpx.Client(base_url=self.url, timeout=30) as client:
            r = client.get(self.link(key))
            assert r.status_code == 303, r.text
            assert client.cookies.get(COOKIE_NAME)
            yield client


def play_demo(producer: BeliefProducer, subject: str) -> list[Receipt]:
    """The demo's events for ``subject``: triage's observations, its retraction of the
    billing one, and the sentiment agent's observations."""
    now = now_millis()
    receipts = []
    retract_me = None
    for context, attribute, value, confidence, evidence, minutes in TRIAGE:
        r = producer.observe(subject, context, attribute, value, confidence, "triage_agent",
                             evidence=evidence, occurred_at=now - minutes * 60_000)
        receipts.append(r)
        retract_me = r if attribute == "plan_status" else retract_me
    assert retract_me is not None
    receipts.append(producer.retract(subject, retract_me.event_id, "triage_agent",
                                     reason="read from another customer's account",
                                     occurred_at=now - 5 * 60_000))
    for context, attribute, value, confidence, evidence, minutes in SENTIMENT:
        receipts.append(producer.observe(subject, context, attribute, value, confidence,
                                         "sentiment_agent", evidence=evidence,
                                         occurred_at=now - minutes * 60_000))
    return receipts


@pytest.fixture
def demo(settings, producer, projector, key_store, api_key, api_url) -> Demo:
    receipts = play_demo(producer, SUBJECT)
    wait_caught_up(settings, receipts)
    return Demo(api_url, api_key, settings, producer, key_store, receipts)


# -- the assets are package data -------------------------------------------------------------


def test_console_and_docs_assets_ship_with_the_package():
    static = files("beliefstore.api") / "static"
    for path in ("console/index.html", "console/console.js", "console/api.js", "console/chart.js",
                 "console/live.js", "console/format.js", "console/console.css",
                 "vendor/uplot-1.6.32/uPlot.iife.min.js", "vendor/uplot-1.6.32/LICENSE",
                 "vendor/swagger-ui-dist-5.35.0/swagger-ui-bundle.js",
                 "vendor/swagger-ui-dist-5.35.0/swagger-ui.css",
                 "vendor/swagger-ui-dist-5.35.0/LICENSE", "vendor/redoc-2.5.4/redoc.standalone.js",
                 "vendor/redoc-2.5.4/LICENSE"):
        item = static.joinpath(*path.split("/"))
        assert item.is_file(), path
        assert len(item.read_bytes()) > 100, path
    # A non-editable install ships them: pyproject's package-data covers every file.
    import tomllib

    root = Path(__file__).parent.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["beliefstore.api"]
    shipped = {p for pattern in patterns for p in (root / "api").glob(pattern) if p.is_file()}
    on_disk = {p for p in (root / "api" / "static").rglob("*") if p.is_file()}
    assert on_disk and on_disk <= shipped, sorted(map(str, on_disk - shipped))


# -- login links, sessions, cookie --------------------------------------------------------------


def test_login_link_is_single_use_and_sets_a_strict_http_only_cookie(demo):
    url = demo.link()
    key_id, secret = split_token(demo.admin_key)
    assert secret not in url and demo.admin_key not in url
    assert urlparse(url).path == "/console/login"
    token = parse_qs(urlparse(url).query)["token"][0]
    assert len(token) >= 40

    first = httpx.get(url, timeout=30)
    assert first.status_code == 303
    assert first.headers["location"] == f"/console/#/s/{SUBJECT}"
    cookie = first.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=")
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/"):
        assert attribute.lower() in cookie.lower(), cookie
    session = first.cookies[COOKIE_NAME]
    assert secret not in cookie and session not in url

    again = httpx.get(url, timeout=30)
    assert again.status_code == 401
    assert "used already" in again.text

    jar = {COOKIE_NAME: session}
    model = httpx.get(f"{demo.url}/v1/subjects/{SUBJECT}/self-model", cookies=jar, timeout=30)
    assert model.status_code == 200
    assert model.json()["contexts"]["support"]
    me = httpx.get(demo.url + "/console/me", cookies=jar, timeout=30).json()
    assert me["authenticated"] and me["caller"]["key_id"] == key_id and me["caller"]["admin"]

    # CSRF: the cookie authenticates GETs only.
    post = httpx.post(demo.url + "/v1/observations", cookies=jar, timeout=30, json={
        "subject_id": SUBJECT, "context": "support", "attribute": "issue", "value": "x",
        "confidence": 0.5, "source": "triage_agent"})
    assert post.status_code == 401
    assert "only authenticates GET" in post.json()["detail"]
    assert httpx.post(demo.url + "/console/logout", cookies=jar, timeout=30).status_code == 403
    out = httpx.post(demo.url + "/console/logout", cookies=jar, timeout=30,
                     headers={"X-Beliefstore-Console": "1"})
    assert out.status_code == 204
    after = httpx.get(f"{demo.url}/v1/subjects/{SUBJECT}/self-model", cookies=jar, timeout=30)
    assert after.status_code == 401
    assert not httpx.get(demo.url + "/console/me", cookies=jar, timeout=30).json()[
        "authenticated"]


def test_login_link_expires_and_unknown_ones_fail(demo, catalog):
    sessions = ConsoleSessions.of_catalog(catalog)
    key_id, _ = split_token(demo.admin_key)
    expired = sessions.create_link(key_id, SUBJECT, ttl_s=-1)
    r = httpx.get(f"{demo.url}/console/login", params={"token": expired.token}, timeout=30)
    assert r.status_code == 401 and "expired" in r.text
    assert COOKIE_NAME not in r.headers.get("set-cookie", "")
    fresh = sessions.create_link(key_id, None)
    assert sessions.redeem_link("not-a-token") is None
    assert sessions.redeem_link(fresh.token) is not None
    assert sessions.redeem_link(fresh.token) is None
    assert httpx.get(f"{demo.url}/console/login", timeout=30).status_code == 401
    # an expired session cookie is refused like no session at all
    stale = sessions.open_session(key_id, ttl_s=-1)
    assert sessions.session_key(stale) is None
    r = httpx.get(f"{demo.url}/v1/subjects/{SUBJECT}/self-model", cookies={COOKIE_NAME: stale},
                  timeout=30)
    assert r.status_code == 401 and "log in again" in r.json()["detail"]
    live = sessions.open_session(key_id)
    assert sessions.session_key(live) == key_id
    assert sessions.end_session(live) and not sessions.end_session(live)
    # Only a key can ask for a link, never a session cookie.
    with demo.session() as client:
        assert client.post("/console/login-links", json={}).status_code == 401
    assert httpx.post(demo.url + "/console/login-links", json={}, timeout=30).status_code == 401


def test_session_applies_the_keys_scopes_and_dies_with_the_key(demo, make_key):
    billing_only = make_key("billing_agent", "billing", "")
    with demo.session(billing_only) as client:
        model = client.get(f"/v1/subjects/{SUBJECT}/self-model")
        # billing's only observation was retracted: nothing this key may read is believed,
        # and support is left out.
        assert model.status_code == 200 and model.json()["contexts"] == {}
        trace = client.get(f"/v1/subjects/{SUBJECT}/beliefs/support/emotional_state/trace")
        assert trace.status_code == 403
        found = client.get("/v1/subjects", params={"prefix": "customer-"}).json()
        assert [s["contexts"] for s in found] == [["billing"]]
        assert found[0]["beliefs"] == 0 and found[0]["observations"] == 1
        assert client.get(f"/v1/subjects/{SUBJECT}/access-log").status_code == 403
        assert client.get("/console/me").json()["caller"]["read"] == ["billing"]
        demo.keys.revoke(split_token(billing_only)[0])
        assert client.get(f"/v1/subjects/{SUBJECT}/beliefs/billing/plan_status/trace"
                          ).status_code == 401


def test_key_form_login_and_its_failures(demo):
    with httpx.Client(base_url=demo.url, timeout=30) as client:
        bad = client.post("/console/session", json={"key": "bsk_nope"})
        assert bad.status_code == 401 and "malformed" in bad.json()["detail"]
        ok = client.post("/console/session", json={"key": demo.admin_key})
        assert ok.status_code == 200 and ok.json()["agent"] == "triage_agent"
        assert "httponly" in ok.headers["set-cookie"].lower()
        assert client.get(f"/v1/subjects/{SUBJECT}/self-model").status_code == 200


def test_listings_subjects_projections_and_access_log(demo):
    headers = bearer(demo.admin_key)
    found = httpx.get(demo.url + "/v1/subjects", params={"prefix": "customer-c"},
                      headers=headers, timeout=30).json()
    assert [s["subject_id"] for s in found] == [SUBJECT]
    assert found[0]["contexts"] == ["billing", "support"] and found[0]["beliefs"] == 4
    assert found[0]["keys"] == ["billing/plan_status", "support/communication_preference",
                                "support/emotional_state", "support/expertise_level",
                                "support/issue"]
    assert found[0]["observations"] == len(TRIAGE) + len(SENTIMENT)
    assert not found[0]["erased"]
    # LIKE wildcards in the prefix are literal.
    assert httpx.get(demo.url + "/v1/subjects", params={"prefix": "customer_"},
                     headers=headers, timeout=30).json() == []
    assert httpx.get(demo.url + "/v1/subjects", params={"prefix": "customer", "exact": "true"},
                     headers=headers, timeout=30).json() == []
    projections = httpx.get(demo.url + "/v1/projections", headers=headers, timeout=30).json()
    assert [(p["name"], p["active"]) for p in projections] == [("self_model", True)]
    # a read, then the access log shows it
    assert httpx.get(f"{demo.url}/v1/subjects/{SUBJECT}/self-model", headers=headers,
                     timeout=30).status_code == 200
    deadline = time.monotonic() + 30
    while True:
        log = httpx.get(f"{demo.url}/v1/subjects/{SUBJECT}/access-log", headers=headers,
                        timeout=60)
        assert log.status_code == 200, log.text
        if log.json()["records"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    records = log.json()["records"]
    assert records and records[0]["agent"] == "triage_agent"
    assert records[0]["endpoint"] == "self-model"
    assert httpx.get(f"{demo.url}/v1/subjects/{SUBJECT}/access-log", timeout=30).status_code == 401


def test_history_carries_alternatives(demo):
    body = httpx.get(f"{demo.url}/v1/subjects/{SUBJECT}/beliefs/support/emotional_state/history",
                     headers=bearer(demo.admin_key), timeout=30).json()
    last = body["changes"][-1]
    assert last["value"] == "frustrated" and set(last["alternatives"]) == {"angry"}
    assert 0 < last["alternatives"]["angry"] < last["confidence"]


def test_docs_are_served_from_the_package(api_url):
    for page, assets in (("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")),
                         ("/redoc", ("redoc.standalone.js",))):
        html = httpx.get(api_url + page, timeout=30).text
        assert "cdn.jsdelivr.net" not in html and "fonts.googleapis" not in html
        assert "https://" not in html and "http://" not in html
        local = re.findall(r"/static/vendor/[^\"'\s]+", html)
        for asset in assets:
            assert any(path.endswith("/" + asset) for path in local), (asset, local)
        for path in local:
            assert httpx.get(api_url + path, timeout=30).status_code == 200, path
    page = httpx.get(api_url + "/console/", timeout=30)
    assert page.status_code == 200 and "default-src 'self'" in page.headers[
        "content-security-policy"]
    assert "http" not in page.text.replace('http-equiv', '')


def test_console_command_prints_a_one_time_link(demo, tmp_path):
    env = cli_env(demo.settings, tmp_path, demo.url, BELIEFSTORE_API_KEY=demo.admin_key)
    out = run(["console", "--subject", SUBJECT], env, tmp_path)
    assert out.returncode == 0, out.stderr
    url = out.stdout.strip()
    assert url.startswith(demo.url + "/console/login?token=")
    assert demo.admin_key not in out.stdout + out.stderr
    assert "single use" in flat(out.stderr)
    assert httpx.get(url, timeout=30).status_code == 303
    assert httpx.get(url, timeout=30).status_code == 401
    env.pop("BELIEFSTORE_API_KEY")
    missing = run(["console"], env, tmp_path)
    assert missing.returncode == 2 and "BELIEFSTORE_API_KEY is not set" in flat(missing.stderr)
    wrong = run(["console"], {**env, "BELIEFSTORE_API_KEY": "bsk_" + "0" * 16 + "_" + "0" * 48},
                tmp_path)
    assert wrong.returncode == 1 and "401" in flat(wrong.stderr)


def test_erased_subject_shows_no_values_through_the_cookie(demo):
    r = demo.producer.erase(SUBJECT, "privacy-officer", reason="GDPR art. 17 request")
    wait_caught_up(demo.settings, [r])
    with demo.session() as client:
        texts = [client.get(f"/v1/subjects/{SUBJECT}/self-model").text,
                 client.get("/v1/subjects", params={"prefix": SUBJECT}).text,
                 client.get(f"/v1/subjects/{SUBJECT}/beliefs/support/emotional_state/trace").text,
                 client.get(f"/v1/subjects/{SUBJECT}/beliefs/support/emotional_state/history"
                            ).text]
    assert '"erased":true' in texts[1].replace(" ", "")
    for text in texts:
        for value in SUPPORT_VALUES:
            assert value not in text, (value, text[:300])


# -- in a real browser ---------------------------------------------------------------------------


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists():
            return (f"{path} not found: install the browser with `apt-get install -y chromium "
                    f"chromium-driver` ({package})")
    return None


needs_browser = pytest.mark.skipif(_browser_missing() is not None,
                                   reason=_browser_missing() or "")


@pytest.fixture
def browser() -> Iterator[Callable[..., object]]:
    """``browser()`` → a headless Chromium (selenium) that resolves no host name but
    loopback addresses, 1280×800; all are quit afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers = []
    profiles = []

    def start():
        profile = tempfile.mkdtemp(prefix="beliefstore-chromium-")
        profiles.append(profile)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1280,800",
                     f"--user-data-dir={profile}",
                     # No network beyond loopback: every other host name fails to resolve.
                     "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, "
                     "EXCLUDE localhost"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        driver.set_page_load_timeout(60)
        drivers.append(driver)
        desktop(driver)
        return driver

    yield start
    for driver in drivers:
        driver.quit()
    for profile in profiles:
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, condition: Callable[[], object], what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - the page is still changing
            last_error = exc
        time.sleep(0.2)
    shot(driver, f"timeout-{what.replace(' ', '-')[:40]}")
    raise AssertionError(f"timed out waiting for {what} ({last_error}); page text: "
                         f"{driver.find_element('tag name', 'body').text[:800]}")


def shot(driver, name: str, full_page: bool = False) -> Path:
    """A screenshot of the viewport (or the whole page) to tests/artifacts/NAME.png."""
    import base64

    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    if full_page:
        data = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True})["data"]
        path.write_bytes(base64.b64decode(data))
    else:
        driver.save_screenshot(str(path))
    return path


def severe(driver, allowed: tuple[str, ...] = ()) -> list[str]:
    """The browser console's SEVERE entries (errors), minus the ``allowed`` substrings."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not any(a in e["message"] for a in allowed)]


def phone(driver) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})


def desktop(driver) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})


def view_ready(driver, view: str) -> bool:
    main = driver.find_element("id", "main")
    return main.get_attribute("data-view") == view and main.get_attribute("data-ready") == "1"


@needs_browser
def test_console_in_a_browser_login_self_model_chart_trace_live(demo, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    env = cli_env(demo.settings, tmp_path, demo.url, BELIEFSTORE_API_KEY=demo.admin_key)
    out = run(["console", "--subject", SUBJECT], env, tmp_path)
    assert out.returncode == 0, out.stderr
    driver = browser()
    driver.get(out.stdout.strip())
    wait_for(driver, lambda: view_ready(driver, "subject"), "the subject's self-model")
    # the key never reaches the browser's address bar or its readable cookies
    assert "token=" not in driver.current_url and demo.admin_key not in driver.current_url
    assert driver.execute_script("return document.cookie") == ""
    table = driver.find_element(By.ID, "beliefs-support")
    text = table.text
    for value in ("frustrated", "unauthorized_recurring_charge", "direct", "high"):
        assert value in text
    assert "angry 0.1" in text  # the alternative of emotional_state
    assert "sentiment_agent, triage_agent" in text or "triage_agent, sentiment_agent" in text
    assert len(table.find_elements(By.TAG_NAME, "meter")) == 4
    assert "fresh" in text  # minutes old, 30-day half-life
    wait_for(driver, lambda: "served" in driver.find_element(By.ID, "projections").text,
             "the projections")
    assert "self_model" in driver.find_element(By.ID, "projections").text
    wait_for(driver, lambda: driver.find_element(By.ID, "live-mode").text.startswith(
        ("polling", "watch")), "live updates")
    shot(driver, "console-self-model-1280x800")
    shot(driver, "console-self-model-full-page", full_page=True)

    # the access log (admin key)
    driver.find_element(By.XPATH, "//button[contains(., 'access log')]").click()
    wait_for(driver, lambda: "self-model" in driver.find_element(By.ID, "access-log").text,
             "the access log", timeout=40)

    # keyboard: tab to the emotional_state link and follow it with Enter
    link = driver.find_element(By.LINK_TEXT, "emotional_state")
    body = driver.find_element(By.TAG_NAME, "body")
    for _ in range(60):
        if driver.switch_to.active_element == link:
            break
        body.send_keys(Keys.TAB) if driver.switch_to.active_element is None else \
            driver.switch_to.active_element.send_keys(Keys.TAB)
    assert driver.switch_to.active_element == link, "emotional_state not reachable by Tab"
    link.send_keys(Keys.ENTER)
    wait_for(driver, lambda: view_ready(driver, "belief"), "the belief's page")
    wait_for(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#timeline canvas"),
             "the timeline chart")
    chart = driver.find_element(By.CSS_SELECTOR, "#timeline .uplot")
    assert chart.size["width"] > 600 and chart.size["height"] > 200
    # a painted chart: not every pixel of the canvas is the same
    painted = driver.execute_script(
        "const c = document.querySelector('#timeline canvas');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "const s = new Set(); for (let i = 0; i < d.length; i += 4 * 97) s.add(d[i] + ',' + d[i+1]"
        " + ',' + d[i+2] + ',' + d[i+3]); return s.size;")
    assert painted > 3
    legend = driver.find_element(By.CSS_SELECTOR, ".legend").text
    assert "frustrated" in legend and "angry" in legend and "confused" in legend
    history = driver.find_element(By.ID, "history").text
    assert "confused" in history and "frustrated" in history
    trace = driver.find_element(By.ID, "trace")
    trace_text = trace.text
    for expected in ("superseded", "counting", "triage_agent", "sentiment_agent", "p"):
        assert expected in trace_text
    rows = trace.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 3
    assert any(r.text.count("@") for r in rows)
    shot(driver, "console-belief-1280x800")
    shot(driver, "console-belief-full-page", full_page=True)

    # follow the trace: "superseded by <event>" jumps to that event's row
    jump = trace.find_element(By.CSS_SELECTOR, "button.linkish")
    target = jump.text
    jump.click()
    focused = driver.switch_to.active_element
    assert focused.get_attribute("id").startswith("ev-" + target)
    assert "frustrated" in focused.text and "counting" in focused.text

    # phone-sized
    phone(driver)
    time.sleep(0.5)
    assert driver.execute_script("return document.documentElement.scrollWidth") <= 400
    shot(driver, "console-belief-phone")
    shot(driver, "console-belief-phone-full-page", full_page=True)
    desktop(driver)

    # the document itself never scrolls sideways at 1280 px (wide tables scroll in place)
    assert driver.execute_script("return document.documentElement.scrollWidth") <= 1280

    # back to the subject; the retracted billing observation has no belief, but its trace
    # is one link away
    driver.find_element(By.LINK_TEXT, SUBJECT).click()
    wait_for(driver, lambda: view_ready(driver, "subject"), "the subject again")
    driver.find_element(By.CSS_SELECTOR, "#other-keys a").click()
    wait_for(driver, lambda: view_ready(driver, "belief")
             and driver.find_elements(By.ID, "trace"), "the retracted key's trace")
    retracted = driver.find_element(By.ID, "trace").text
    assert "retracted" in retracted and "retraction" in retracted and "active" in retracted
    assert "(no belief" in driver.find_element(By.ID, "belief-value").text

    # a new observation appears live (watch stream, else polling)
    driver.find_element(By.LINK_TEXT, SUBJECT).click()
    wait_for(driver, lambda: view_ready(driver, "subject"), "the subject again")
    wait_for(driver, lambda: driver.find_element(By.ID, "live-mode").text.startswith(
        ("polling", "watch")), "live updates")
    r = demo.producer.observe(SUBJECT, "support", "preferred_channel", "email_only", 0.9,
                              "triage_agent")
    wait_caught_up(demo.settings, [r])
    wait_for(driver, lambda: "email_only" in driver.find_element(By.ID, "self-model").text,
             "the new observation to appear live", timeout=20)
    assert "preferred_channel" in driver.find_element(By.ID, "beliefs-support").text
    shot(driver, "console-live-update-1280x800")
    phone(driver)
    time.sleep(0.5)
    assert driver.execute_script("return document.documentElement.scrollWidth") <= 400
    shot(driver, "console-self-model-phone")
    desktop(driver)

    errors = severe(driver)
    assert not errors, errors


@needs_browser
def test_console_as_of_shows_the_self_model_then(demo, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser()
    driver.get(demo.link(subject=None))
    wait_for(driver, lambda: view_ready(driver, "search"), "the subject search")
    wait_for(driver, lambda: SUBJECT in driver.find_element(By.ID, "subjects").text,
             "the demo subject in the list")
    driver.find_element(By.LINK_TEXT, SUBJECT).click()
    wait_for(driver, lambda: view_ready(driver, "subject"), "the self-model")
    assert "frustrated" in driver.find_element(By.ID, "beliefs-support").text
    # 11.5 minutes ago on the occurred axis: triage had seen confused, then the issue, but
    # not yet frustrated (11 min) nor anything of the sentiment agent (7 min).
    # picked in the form: the instant in the browser's local time, the occurred axis
    driver.execute_script(
        "const d = new Date(Date.now() - 690 * 1000); const p = (n) => String(n).padStart(2, '0');"
        "document.getElementById('as-of').value = `${d.getFullYear()}-${p(d.getMonth() + 1)}-"
        "${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;")
    Select(driver.find_element(By.ID, "axis")).select_by_value("occurred")
    driver.find_element(By.XPATH, "//button[.='Show then']").click()
    wait_for(driver, lambda: "as_of=" in driver.current_url and view_ready(driver, "subject"),
             "the as-of view")
    wait_for(driver, lambda: "Self-model as of" in driver.find_element(By.ID, "self-model").text,
             "the as-of self-model")
    then = driver.find_element(By.ID, "beliefs-support").text
    assert "confused" in then and "unauthorized_recurring_charge" in then
    assert "frustrated" not in then and "expertise_level" not in then
    assert driver.find_element(By.ID, "live-mode").text == "paused (as-of view)"
    shot(driver, "console-as-of-1280x800")
    errors = severe(driver)
    assert not errors, errors


@needs_browser
def test_console_erased_subject_and_context_out_of_scope(demo, browser, make_key):
    from selenium.webdriver.common.by import By

    billing_only = make_key("billing_agent", "billing", "")
    driver = browser()
    driver.get(demo.link(billing_only))
    wait_for(driver, lambda: view_ready(driver, "subject"), "the subject page")
    page = driver.find_element(By.ID, "main").text
    assert "billing" in page
    for value in SUPPORT_VALUES:
        assert value not in page
    assert "support" not in page and "emotional_state" not in page
    shot(driver, "console-billing-only-key")
    # even asked for directly, the support trace is refused
    driver.get(f"{demo.url}/console/#/s/{SUBJECT}/b/support/emotional_state")
    wait_for(driver, lambda: "403" in driver.find_element(By.ID, "main").text, "a 403")
    page = driver.find_element(By.ID, "main").text
    for value in SUPPORT_VALUES:
        assert value not in page
    assert not severe(driver, allowed=("403",))

    r = demo.producer.erase(SUBJECT, "privacy-officer", reason="GDPR art. 17 request")
    wait_caught_up(demo.settings, [r])
    admin = browser()
    admin.get(demo.link())
    wait_for(admin, lambda: admin.find_elements(By.ID, "erased-note"), "the erased note")
    seen = [admin.find_element(By.ID, "main").text]
    shot(admin, "console-erased-subject")
    # every observed key is still one link away from its trace, without values
    keys = admin.find_element(By.ID, "other-keys").text
    assert "support/emotional_state" in keys and "billing/plan_status" in keys
    admin.find_element(By.LINK_TEXT, "support/emotional_state").click()
    wait_for(admin, lambda: view_ready(admin, "belief"), "the erased belief's trace")
    wait_for(admin, lambda: admin.find_elements(By.ID, "trace"), "the trace table")
    seen.append(admin.find_element(By.ID, "main").text)
    assert "erased" in seen[-1]
    admin.get(f"{demo.url}/console/#/")
    wait_for(admin, lambda: SUBJECT in admin.find_element(By.ID, "main").text, "the search")
    seen.append(admin.find_element(By.ID, "main").text)
    for text in seen:
        for value in SUPPORT_VALUES:
            assert value not in text, (value, text)
    errors = severe(admin)
    assert not errors, errors


@needs_browser
def test_docs_render_with_no_network_beyond_loopback(api_url, browser):
    from selenium.webdriver.common.by import By

    driver = browser()
    driver.get(api_url + "/docs")
    wait_for(driver, lambda: len(driver.find_elements(By.CSS_SELECTOR, ".opblock")) >= 10,
             "Swagger UI's operations")
    text = driver.find_element(By.TAG_NAME, "body").text
    assert "/v1/subjects/{subject_id}/self-model" in text.replace("\u200b", "")
    assert "/v1/observations" in text.replace("\u200b", "")
    shot(driver, "docs-swagger-offline")
    driver.get(api_url + "/redoc")
    wait_for(driver, lambda: "self-model" in driver.find_element(By.TAG_NAME, "body").text.lower()
             .replace("\u200b", ""), "ReDoc's operations")
    shot(driver, "docs-redoc-offline")
    errors = severe(driver)
    assert not errors, errors


@needs_browser
def test_login_form_with_a_key(demo, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser()
    driver.get(demo.url + "/console/")
    wait_for(driver, lambda: driver.find_element(By.ID, "main").get_attribute("data-view")
             == "login", "the login form")
    field = driver.switch_to.active_element
    assert field.get_attribute("id") == "key"  # focused: type and press Enter
    field.send_keys(demo.admin_key, Keys.ENTER)
    wait_for(driver, lambda: view_ready(driver, "search"), "the subject search")
    assert demo.admin_key not in driver.current_url
    wait_for(driver, lambda: SUBJECT in driver.find_element(By.ID, "subjects").text,
             "the demo subject")
    shot(driver, "console-search-1280x800")
    driver.find_element(By.XPATH, "//button[.='Log out']").click()
    wait_for(driver, lambda: driver.find_element(By.ID, "main").get_attribute("data-view")
             == "login", "the login form again")
    errors = severe(driver)
    assert not errors, errors


def test_with_authentication_off_the_console_needs_no_login(settings, engine, producer,
                                                            projector):
    from dataclasses import replace as dc_replace

    from beliefstore.embedded import free_port
    from beliefstore.runtime.serve import ApiServer

    receipts = play_demo(producer, SUBJECT)
    wait_caught_up(settings, receipts)
    server = ApiServer(dc_replace(settings, auth=False), "127.0.0.1", free_port()
                       ).start_in_thread()
    try:
        me = httpx.get(server.url + "/console/me", timeout=30).json()
        assert me["authenticated"] and me["caller"]["agent"] == "anonymous"
        assert not me["caller"]["auth"]
        refused = httpx.post(server.url + "/console/login-links", json={}, timeout=30)
        assert refused.status_code == 400 and "no login is needed" in refused.json()["detail"]
        found = httpx.get(server.url + "/v1/subjects", params={"prefix": SUBJECT},
                          timeout=30).json()
        assert found[0]["beliefs"] == 4
    finally:
        server.stop()
