"""The edit studio in a real browser: headless Chromium, driven by selenium, on the page that
`fisedit serve` (the tiny model, anonymous on localhost) serves at `/`.

One session, as a person would use it: send a bad setting, generate (anonymously), enter an
API key, edit twice, show the edited region, switch versions, download the recipe and the
mask, cancel an edit, meet a stale version and a busy service, reload, and look at the page
360 px wide.
Checked in the DOM and in the HTTP traffic Chrome logs.

FISEDIT_UPDATE_SCREENSHOT=1 also writes the README's screenshot, docs/studio.png."""

import base64
import io
import json
import os
import select
import shutil
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import httpx2 as httpx
import numpy as np
import pytest
from PIL import Image
from polling import wait_until

from fisedit.service.config import HttpConfig

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT_ENV = "FISEDIT_UPDATE_SCREENSHOT"
START_TIMEOUT = 240
TIMEOUT = 120
STEPS = 2  # the fewest a session may have: one dense step finds the region, one is sparse
API_KEY = "studio-test-key"
BUSY_SLOTS = HttpConfig().max_in_flight_per_tenant  # fisedit serve's bound per tenant
PROMPTS = [
    "a photo of a cat sitting on a wooden bench",
    "a photo of a dog sitting on a wooden bench",
    "a photo of a dog sitting on a red bench",
]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,1000",
]


_wait = partial(wait_until, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, tiny_model_dir, process_group, free_port):
    """`fisedit serve` in its own process group (its Ray included), stopped by stopping that
    group."""
    root = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "fisedit.cli", "serve", "--port", str(port)]
    command += ["--store", str(root / "store"), "--model", tiny_model_dir]
    log, url = root / "serve.log", f"http://127.0.0.1:{port}"
    options = dict(env=env, cwd=root, stderr=subprocess.STDOUT)
    with log.open("wb") as out, process_group(command, stdout=out, **options) as server:

        def ready() -> bool:
            assert server.poll() is None, f"fisedit serve exited:\n{log.read_text()[-3000:]}"
            try:
                return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        _wait(ready, "ready service", timeout=START_TIMEOUT)
        _wait(lambda: f"FISEdit studio at {url}/," in log.read_text(), "the printed address")
        yield url


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(tmp_path_factory, downloads):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    prefs = {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    options.add_experimental_option("prefs", prefs)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    driver.set_script_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


class Traffic:
    """The page's HTTP exchanges, from Chrome's performance log: method, path, request
    headers and body, status and content type of every request to the service."""

    def __init__(self, driver, base_url: str) -> None:
        self.driver, self.base_url = driver, base_url
        self.requests: dict[str, dict] = {}

    def exchanges(self) -> list[dict]:
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            params = message.get("params", {})
            if message["method"] == "Network.requestWillBeSent":
                request = params["request"]
                if request["url"].startswith(self.base_url):
                    self.requests[params["requestId"]] = {
                        "method": request["method"],
                        "path": urlsplit(request["url"]).path,
                        "headers": {k.lower(): v for k, v in request["headers"].items()},
                        "body": request.get("postData"),
                    }
            elif (
                message["method"] == "Network.responseReceived"
                and params["requestId"] in self.requests
            ):
                response = params["response"]
                self.requests[params["requestId"]].update(
                    status=response["status"], type=response["mimeType"]
                )
        return [r for r in self.requests.values() if "status" in r]

    def find(self, method: str, suffix: str) -> list[dict]:
        found = self.exchanges()
        return [r for r in found if r["method"] == method and r["path"].endswith(suffix)]


class SlowRequest:
    """A POST whose body stops halfway, so the service holds it in flight (one of its
    tenant's slots) until `finish` sends the rest: an invalid generation, refused with 422
    at once, so nothing is computed."""

    HEAD, REST = b'{"prompt": "a red car", ', b'"steps": 1}'

    def __init__(self, base_url: str) -> None:
        address = urlsplit(base_url)
        self.socket = socket.create_connection((address.hostname, address.port), TIMEOUT)
        length = len(self.HEAD) + len(self.REST)
        self.socket.sendall(
            b"POST /v1/sessions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (address.netloc.encode(), length, self.HEAD)
        )

    def refused(self) -> bool:
        """Answered before its body arrived: the service had no slot for it."""
        if select.select([self.socket], [], [], 0)[0]:
            self.socket.close()
            return True
        return False

    def finish(self) -> int:
        """Sends the rest of the body; the status of the answer."""
        self.socket.sendall(self.REST)
        with self.socket, self.socket.makefile("rb") as answer:
            return int(answer.readline().split()[1])


def _text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def _idle(driver) -> bool:
    return driver.execute_script("return document.body.dataset.busy === 'false'")


def _versions(driver) -> list:
    return driver.find_elements("css selector", "#version-strip .version")


def _loaded(driver, selector: str) -> bool:
    """Every image the selector matches has loaded with a non-zero size."""
    return driver.execute_script(
        "const images = [...document.querySelectorAll(arguments[0])];"
        "return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0);",
        selector,
    )


def _submit(driver, element_id: str, text: str, *then: str) -> None:
    """Types into a prompt box and presses Enter, as a person submits (then other keys)."""
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("id", element_id)
    box.clear()
    box.send_keys(text, Keys.ENTER, *then)


def _watch_progress(driver) -> None:
    """Records every value the progress bar takes (and when it shows), for the checks."""
    driver.execute_script(
        "window.progressSeen = [];"
        "const bar = document.getElementById('progress');"
        "new MutationObserver(() => window.progressSeen.push("
        "  bar.hidden ? 'hidden' : bar.hasAttribute('value') ? bar.value : 'indeterminate'"
        ")).observe(bar, {attributes: true});"
    )


def _progress_seen(driver) -> list:
    return driver.execute_script("const seen = window.progressSeen; window.progressSeen = [];"
                                 "return seen;")  # fmt: skip


def _edit(driver, prompt: str, count: int) -> None:
    _submit(driver, "edit-prompt", prompt)
    _wait(lambda: len(_versions(driver)) == count and _idle(driver), f"version {count - 1}")
    _wait(lambda: _loaded(driver, "#current-image, #version-strip img"), "loaded images")


def _screenshot(driver, path: Path) -> None:
    """The whole page, as tall as it is, in a PNG."""
    size = driver.execute_script(
        "const page = document.documentElement;"
        "return {width: page.scrollWidth, height: page.scrollHeight};"
    )
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {"captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "scale": 1, **size}},
    )
    path.write_bytes(base64.b64decode(shot["data"]))


def _session_id(driver) -> str:
    return driver.execute_script("return location.hash").removeprefix("#session=")


def _metrics(driver) -> dict[str, str]:
    ids = ("mask-ratio", "mac-fraction", "latency", "dense", "cache-path")
    return {name: _text(driver, f"m-{name}") for name in ids}


def _percent(text: str) -> float:
    assert text.endswith(" %"), text
    return float(text.removesuffix(" %"))


def test_a_session_in_the_studio(browser, base_url, downloads, tmp_path):
    from selenium.webdriver.common.keys import Keys

    driver, traffic = browser, Traffic(browser, base_url)
    driver.get(f"{base_url}/")
    assert driver.title == "FISEdit studio"
    assert [r["status"] for r in traffic.find("GET", "/studio/studio.js")] == [200]

    # Focus follows the page's order: the key, then the generation form.
    driver.execute_script("document.getElementById('api-key').focus()")
    order = []
    for _ in range(9):
        driver.switch_to.active_element.send_keys(Keys.TAB)
        order.append(driver.switch_to.active_element.get_attribute("id"))
    assert order == [
        "key-save", "key-forget", "prompt", "negative-prompt",
        "seed", "steps", "guidance", "scheduler", "generate-button",
    ]  # fmt: skip

    # A setting out of range: the service's 422 names the field, which gets the focus.
    steps = driver.find_element("id", "steps")
    steps.clear()
    steps.send_keys("1")
    driver.find_element("id", "generate-button").click()
    error = _wait(lambda: _text(driver, "error"), "error message")
    assert error.startswith("Invalid input (422): steps:"), error
    assert steps.get_attribute("aria-invalid") == "true"
    assert driver.switch_to.active_element.get_attribute("id") == "steps"
    assert [r["status"] for r in traffic.find("POST", "/v1/jobs")] == [422]
    _screenshot(driver, tmp_path / "1-validation-error.png")

    # Generate (Enter in the prompt box submits), with the progress bar on the job's events,
    # and a seed past 2^53, which JavaScript numbers cannot hold: the service gets its digits.
    steps.clear()
    steps.send_keys(str(STEPS))
    seed = driver.find_element("id", "seed")
    seed.clear()
    seed.send_keys(str(2**60 + 1))
    _watch_progress(driver)
    _submit(driver, "prompt", PROMPTS[0])
    _wait(lambda: len(_versions(driver)) == 1 and _idle(driver), "generated version")
    _wait(lambda: _loaded(driver, "#current-image, #version-strip img"), "loaded images")
    assert not driver.find_element("id", "error").is_displayed()
    assert _text(driver, "status") == "Generation done: version 0."
    seen = _progress_seen(driver)
    assert "indeterminate" in seen and 1 in seen and seen[-1] == "hidden", seen
    image = driver.find_element("id", "current-image")
    assert image.get_attribute("alt") == f"Version 0: {PROMPTS[0]}"
    assert driver.find_element("id", "edit-prompt").get_attribute("value") == PROMPTS[0]
    base = _metrics(driver)
    assert base["mask-ratio"] == "100.0 %" and base["mac-fraction"] == "100.0 %", base
    assert base["latency"].endswith(" s") and base["dense"].endswith(" s"), base
    assert driver.find_element("id", "overlay-toggle").get_attribute("disabled")
    (sent,) = [
        json.loads(r["body"]) for r in traffic.find("POST", "/v1/jobs") if r["status"] == 201
    ]
    assert int(sent["seed"]) == 2**60 + 1
    _screenshot(driver, tmp_path / "2-generated.png")

    # So far anonymously, as `fisedit serve` allows. Now an API key, entered once: kept for
    # the tab, not shown, sent with every later call.
    anonymous = [r for r in traffic.exchanges() if r["path"].startswith("/v1/")]
    assert anonymous and not any("authorization" in r["headers"] for r in anonymous)
    driver.find_element("id", "api-key").send_keys(API_KEY, Keys.ENTER)
    assert driver.execute_script("return sessionStorage.getItem('fisedit.apiKey')") == API_KEY
    assert driver.find_element("id", "api-key").get_attribute("value") == ""
    assert "key is set" in _text(driver, "key-state")

    # Two edits, each a job whose events the page reads; each is a new version in the strip.
    _edit(driver, PROMPTS[1], 2)
    _edit(driver, PROMPTS[2], 3)
    assert _text(driver, "status") == "Edit done: version 2."
    assert "indeterminate" in _progress_seen(driver)
    edited = _metrics(driver)
    assert 0 < _percent(edited["mask-ratio"]) < 100, edited
    assert 0 < _percent(edited["mac-fraction"]) < 100, edited
    assert edited["cache-path"] == "hit", edited
    assert driver.find_element("id", "edit-prompt").get_attribute("value") == PROMPTS[2]
    pressed = [b.get_attribute("aria-pressed") for b in _versions(driver)]
    assert pressed == ["false", "false", "true"]

    # The edited region over the image: the pixels of the version's mask.png, coloured where
    # it is set (the region the sparse steps recomputed).
    driver.find_element("id", "overlay-toggle").click()
    overlay = driver.find_element("id", "mask-overlay")
    _wait(overlay.is_displayed, "mask overlay")
    covered = driver.execute_script(
        "const c = document.getElementById('mask-overlay');"
        "const alpha = c.getContext('2d').getImageData(0, 0, c.width, c.height).data"
        "  .filter((_, i) => i % 4 === 3);"
        "return [c.width, alpha.filter(a => a > 0).length / alpha.length];"
    )
    assert covered[0] > 0 and 0 < covered[1] < 1, covered
    mask_png = httpx.get(f"{base_url}/v1/sessions/{_session_id(driver)}/versions/2/mask.png")
    mask = np.array(Image.open(io.BytesIO(mask_png.content)))
    assert covered == [mask.shape[1], pytest.approx((mask > 127).mean())]
    _screenshot(driver, tmp_path / "3-overlay.png")
    if os.environ.get(SCREENSHOT_ENV):
        _screenshot(driver, ROOT / "docs" / "studio.png")

    # Switching versions: the base has no edited region, version 1 has its own. A draft typed
    # in the edit box stays while versions are looked through; an empty box takes the prompt
    # of the version on show.
    box = driver.find_element("id", "edit-prompt")
    box.send_keys(" at dusk")
    _versions(driver)[0].click()
    _wait(lambda: image.get_attribute("alt") == f"Version 0: {PROMPTS[0]}", "version 0 shown")
    assert box.get_attribute("value") == f"{PROMPTS[2]} at dusk"
    assert not overlay.is_displayed()
    assert driver.find_element("id", "overlay-toggle").get_attribute("disabled")
    assert _metrics(driver) == base
    box.clear()
    _versions(driver)[1].click()
    _wait(lambda: image.get_attribute("alt") == f"Version 1: {PROMPTS[1]}", "version 1 shown")
    assert box.get_attribute("value") == PROMPTS[1]
    _wait(overlay.is_displayed, "version 1's mask overlay")
    assert _loaded(driver, "#current-image")
    _screenshot(driver, tmp_path / "4-version-1.png")

    # Downloads: version 1's image, its mask and its recipe (the base settings, its one edit).
    for button in ("download-image", "download-mask", "download-recipe"):
        driver.find_element("id", button).click()
    name = f"fisedit-{_session_id(driver)[:8]}-v1"
    files = [downloads / f"{name}{suffix}" for suffix in (".png", "-mask.png", "-recipe.json")]
    _wait(lambda: all(file.exists() for file in files), "the downloads")
    image_file, mask_file, recipe_file = files
    assert Image.open(image_file).size == (image.get_property("naturalWidth"),) * 2
    assert Image.open(mask_file).size == tuple(covered[:1] * 2)
    recipe = json.loads(recipe_file.read_text())
    assert recipe["params"]["prompt"] == PROMPTS[0] and recipe["params"]["steps"] == STEPS
    assert [e["params"]["prompt"] for e in recipe["edits"]] == [PROMPTS[1]]

    # An edit of an older version than the newest branches off it: version 3, made from
    # version 1, after version 2, which stays.
    assert _text(driver, "edit-extends") == "(branches off v1)"
    _edit(driver, "a photo of a cat sitting on a red bench", 4)
    assert _text(driver, "status") == "Edit done: version 3."
    assert json.loads(traffic.find("POST", "/edits")[-1]["body"])["from_version"] == 1
    labels = [b.find_element("css selector", "span").text for b in _versions(driver)]
    assert labels == ["v0", "v1", "v2", "v3 from v1"]
    assert _versions(driver)[3].get_attribute("aria-pressed") == "true"
    assert _text(driver, "edit-extends") == "(extends v3)"

    # Escape cancels the edit just sent: queued or running, unless it has finished.
    _submit(driver, "edit-prompt", "a photo of a dog sitting on a blue bench", Keys.ESCAPE)
    _wait(lambda: _idle(driver) and "cancel" in _text(driver, "status").lower(), "cancel")
    status = _text(driver, "status")
    if status == "Edit cancelled.":
        assert len(_versions(driver)) == 4
    else:
        assert status == "Too late to cancel: it had finished. Edit done: version 4.", status
        assert len(_versions(driver)) == 5

    # The HTTP traffic: jobs for the generation and edits (asynchronous), their event
    # streams, the files, the cancel, all with the API key.
    exchanges = traffic.exchanges()
    assert [r["status"] for r in traffic.find("POST", "/v1/jobs")] == [422, 201]
    edits = traffic.find("POST", "/edits")
    assert [r["status"] for r in edits] == [202] * 4
    assert all(r["headers"]["prefer"] == "respond-async" for r in edits)
    streams = traffic.find("GET", "/events")
    assert len(streams) == 5 and {(r["status"], r["type"]) for r in streams} == {
        (200, "text/event-stream")
    }
    assert [r["status"] for r in traffic.find("POST", "/cancel")] == [200]
    images = {r["path"].split("/versions/")[1] for r in traffic.find("GET", "/image.png")}
    assert {"0/image.png", "1/image.png", "2/image.png"} <= images
    assert {r["status"] for r in traffic.find("GET", ".png")} == {200}
    assert [r["status"] for r in traffic.find("GET", "/versions/1/recipe.json")] == [200]
    keyed = [r for r in exchanges if r["path"].startswith("/v1/")][len(anonymous) :]
    assert all(r["headers"].get("authorization") == f"Bearer {API_KEY}" for r in keyed)

    # Someone else edits the session behind the page's back: the page's next edit extends a
    # stale version, gets 409, says so and reloads the history, which holds the other edit.
    session_id, known = _session_id(driver), len(_versions(driver))
    elsewhere = httpx.post(
        f"{base_url}/v1/sessions/{session_id}/edits",
        json={"prompt": "a photo of a dog sitting on a green bench"},
        timeout=TIMEOUT,
    )
    assert elsewhere.status_code == 200, elsewhere.text
    _submit(driver, "edit-prompt", "a photo of a dog sitting on a yellow bench")
    error = _wait(lambda: _text(driver, "error"), "stale version message")
    assert error.startswith(f"Stale version (409): extends: session {session_id} is at version")
    _wait(lambda: len(_versions(driver)) == known + 1 and _idle(driver), "reloaded history")
    assert image.get_attribute("alt") == f"Version {known}: {elsewhere.json()['prompt']}"
    typed = driver.find_element("id", "edit-prompt").get_attribute("value")
    assert typed == "a photo of a dog sitting on a yellow bench"  # kept, to submit again
    assert [r["status"] for r in traffic.find("POST", "/edits")][-1] == 409

    # A busy tenant: requests whose bodies are still arriving hold all of its in-flight slots.
    # The page's edit is refused with 429 and the page says when to retry; a reload's reads
    # are retried after Retry-After, and pass once the slots are free.
    _wait(lambda: _loaded(driver, "#current-image, #version-strip img"), "a quiet page")
    history = f"/v1/sessions/{session_id}"
    reloads_before = len(traffic.find("GET", history))
    holders: list[SlowRequest] = []

    def tenant_full() -> bool:
        for holder in [h for h in holders if h.refused()]:  # another request had the slot
            holders.remove(holder)
        holders.extend(SlowRequest(base_url) for _ in range(BUSY_SLOTS - len(holders)))
        return httpx.get(f"{base_url}/v1/jobs").status_code == 429

    def refused_reloads() -> list[int]:
        statuses = [r["status"] for r in traffic.find("GET", history)][reloads_before:]
        return [status for status in statuses if status == 429]

    _wait(tenant_full, "a tenant with every slot taken")
    _submit(driver, "edit-prompt", "a photo of a dog sitting on a purple bench")
    error = _wait(lambda: _text(driver, "error"), "busy message")
    assert error == "Too many requests in flight for your key (429). Retry in 2 s."
    driver.refresh()  # the page itself is served under load; its reads are refused
    _wait(refused_reloads, "a refused read")
    assert [holder.finish() for holder in holders] == [422] * BUSY_SLOTS
    _wait(lambda: len(_versions(driver)) == known + 1, "reopened session")
    assert [r["status"] for r in traffic.find("GET", history)][-1] == 200
    _wait(lambda: _loaded(driver, "#current-image, #version-strip img"), "loaded images")
    assert _text(driver, "status") == "Session loaded."
    assert "key is set" in _text(driver, "key-state")

    # The messages for the refusals a loaded service answers, from the bodies and headers
    # the API sends them with.
    refusals = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "const refusal = (status, msg) => failureOf(new Response("
        "  JSON.stringify({detail: [{loc: [], msg, type: 'busy'}]}),"
        "  {status, headers: {'Retry-After': '2'}})).then(describe);"
        "Promise.all([refusal(401, 'missing or unknown API key'),"
        "  refusal(429, 'over 8 requests in flight; retry later'),"
        "  refusal(503, 'the service is at capacity; retry later')]).then(done);"
    )
    assert refusals == [
        "The API key is missing or unknown (401): enter a valid key above.",
        "Too many requests in flight for your key (429). Retry in 2 s.",
        "The service is busy or unavailable (503): the service is at capacity; retry later. "
        "Retry in 2 s.",
    ]

    # The page's event-stream reader, on a stream cut mid-line and mid-CRLF, with the per-step
    # events the service sends while a job computes.
    stream = (
        'event: step\r\ndata: {"step": 1, "steps": 2, "edit": null}\r\n\r\n'
        ': a comment\nevent: end\ndata: {"state": "succeeded"}\n\n'
    )
    crlf = stream.index("\r\n\r\n") + 1
    cuts = [[0, 9], [9, crlf], [crlf, crlf + 2], [crlf + 2, len(stream)]]
    events = driver.execute_async_script(
        "const [text, cuts, done] = arguments;"
        "const encoder = new TextEncoder();"
        "const body = new ReadableStream({start(stream) {"
        "  for (const cut of cuts) stream.enqueue(encoder.encode(text.slice(...cut)));"
        "  stream.close();"
        "}});"
        "(async () => {"
        "  const seen = [];"
        "  for await (const event of serverEvents(new Response(body))) seen.push(event);"
        "  done(seen);"
        "})();",
        stream,
        cuts,
    )
    assert events == [
        {"event": "step", "data": {"step": 1, "steps": 2, "edit": None}, "id": None},
        {"event": "end", "data": {"state": "succeeded"}, "id": None},
    ]

    # A job that goes away while the page follows it (its session deleted elsewhere): the
    # stream's error event is the message, not a lost connection.
    message = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "const realFetch = window.fetch;"
        "window.fetch = async () => new Response("
        "  'event: started\\ndata: {}\\n\\nevent: error\\ndata: ' + JSON.stringify({status: 404,"
        "  detail: [{loc: ['path', 'job_id'], msg: \"unknown job 'gone'\", type: 'not_found'}]})"
        "  + '\\n\\n');"
        "runJob('Edit', async () => 'gone').then(() => done('ended'),"
        "  (error) => done(describe(error))).finally(() => { window.fetch = realFetch; });"
    )
    assert message == "Error 404: job_id: unknown job 'gone'"

    # A stream the service ends with `continue` (open past its request timeout): the page
    # opens it again after the last event it had, and the job's end comes on the second.
    followed = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "const realFetch = window.fetch;"
        "const streams = ['id: 1\\nevent: queued\\ndata: {}\\n\\nid: 2\\nevent: started\\n"
        "data: {}\\n\\nevent: continue\\ndata: {}\\n\\n', 'id: 3\\nevent: succeeded\\n"
        'data: {}\\n\\nevent: end\\ndata: {"state": "succeeded"}\\n\\n\'];'
        "const asked = [];"
        "window.fetch = async (path, init) => {"
        "  asked.push(init.headers['Last-Event-ID'] || null);"
        "  return new Response(streams.shift());"
        "};"
        "runJob('Edit', async () => 'long').then((end) => done([end.state, asked]),"
        "  (error) => done(describe(error))).finally(() => { window.fetch = realFetch; });"
    )
    assert followed == ["succeeded", [None, "2"]]

    # 360 px wide: one column, nothing wider than the screen.
    driver.set_window_size(360, 900)
    _wait(lambda: driver.execute_script("return window.innerWidth") <= 360, "narrow window")
    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - window.innerWidth"
    )
    assert overflow <= 0
    _screenshot(driver, tmp_path / "5-narrow.png")
