"""End to end: Serve with tiny artifacts, the dashboard as `streamlit run`, headless Chromium.

What a person does: send a chat message and watch the reply stream in; run a comparison and
see the table; look at the Models and Benchmarks pages. Screenshots of each page go to
`docs/screenshots/` when `SLIMSERVE_SCREENSHOTS=1` (`make screenshots`), else to a tmp folder.

The browser is the system's Chromium (Debian's `chromium` package; `SLIMSERVE_CHROMIUM`
overrides the path), driven by Playwright, which never downloads a browser of its own here.
The ingress is, in order of preference: `SLIMSERVE_E2E_URL` (one already running, e.g. after
`make demo`); `SLIMSERVE_E2E_CONFIG` + `SLIMSERVE_E2E_ARTIFACTS` (serve a built profile);
else the deployments tests' tiny random-weight store, built here (seconds).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from slimserve.net import free_port

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("SLIMSERVE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (or set "
        "SLIMSERVE_CHROMIUM) to run the browser test",
    ),
]
LONG = 60_000  # ms: the first page load and the first generation on a busy 2-core machine


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)
    return value


def deployments_helpers():
    """The deployments tests' tiny-store builder (one source for test artifacts)."""
    path = ROOT / "tests" / "deployments" / "serve_helpers.py"
    spec = importlib.util.spec_from_file_location("_deployments_test_helpers", path)
    assert spec and spec.loader, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ingress_url(request, tmp_path_factory) -> Iterator[str]:
    if url := os.environ.get("SLIMSERVE_E2E_URL"):
        yield url.rstrip("/")
        return
    request.getfixturevalue("ray_session")
    from ray import serve
    from ray.serve.config import HTTPOptions

    from deployments.app import build_app

    config, artifacts = (
        os.environ.get("SLIMSERVE_E2E_CONFIG"),
        os.environ.get("SLIMSERVE_E2E_ARTIFACTS"),
    )
    if not (config and artifacts):
        import yaml

        helpers = deployments_helpers()
        base = tmp_path_factory.mktemp("e2e")
        profile = base / "deploytest.yaml"
        profile.write_text(yaml.safe_dump(helpers.PROFILE, sort_keys=False))
        helpers.build_tiny_store(base / "store", profile)
        config, artifacts = str(profile), str(base / "store")
    port = free_port()
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port, request_timeout_s=60))
    # One SSE frame per token (serve_config.yaml merges 20 ms): the chat test watches the
    # reply grow, and a 0.8 s reply in a few frames can reach the page as one or two renders.
    defaults = {"num_cpus": 0.15, "stream_min_interval_ms": 0}
    args = {"config": config, "artifacts_dir": artifacts, "defaults": defaults}
    serve.run(build_app(args), name="dashboard-e2e", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def dashboard_url(ingress_url, tmp_path_factory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    env = {
        **os.environ,
        "SLIMSERVE_URL": ingress_url,
        "SLIMSERVE_REPORTS_DIR": os.environ.get("SLIMSERVE_REPORTS_DIR", str(ROOT / "reports")),
    }
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"),
        "--server.headless", "true", "--server.address", "127.0.0.1",
        "--server.port", str(port), "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal",
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"streamlit exited {proc.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(f"{url}/_stcore/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 60, "the dashboard to start")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    sync_playwright = sync_api.sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    if os.environ.get("SLIMSERVE_SCREENSHOTS") == "1":
        folder = ROOT / "docs" / "screenshots"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 960})
    page = context.new_page()
    page.set_default_timeout(LONG)
    yield page
    context.close()


def settled(page) -> None:
    """Wait until Streamlit has finished running the script (the status widget is gone)."""
    page.wait_for_function(
        "!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=LONG
    )


def snapshot(page, path: Path, max_height: int | None = None) -> None:
    """Screenshot of the whole page: Streamlit scrolls an inner container, not the document,
    so `full_page` alone would cut it at the viewport; grow the viewport to the content, up to
    `max_height` pixels (the top of a page too long to show whole)."""
    height = page.evaluate(
        "document.querySelector('[data-testid=\"stMainBlockContainer\"]').scrollHeight"
    )
    height = max(960, int(height) + 80)
    page.set_viewport_size({"width": 1440, "height": min(height, max_height or height)})
    settled(page)
    page.screenshot(path=str(path))


# Records every distinct text the first reply shows while it streams in (a new session starts
# with an empty conversation, so message 0 is ours and message 1 the assistant's).
WATCH_STREAM = """() => {
  window.__seen = new Set();
  new MutationObserver(() => {
    const msgs = document.querySelectorAll('[data-testid="stChatMessage"]');
    const content = msgs.length > 1 &&
      msgs[1].querySelector('[data-testid="stChatMessageContent"]');  // the assistant's reply
    if (content) window.__seen.add(content.innerText.trim());
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def test_chat_streams_a_reply(page, dashboard_url, shots):
    page.goto(dashboard_url)
    page.get_by_role("heading", name="Chat").wait_for()
    page.get_by_label("max tokens").fill("96")  # long enough to watch it grow; fits 128
    page.get_by_label("max tokens").press("Enter")
    settled(page)
    page.evaluate(WATCH_STREAM)
    box = page.get_by_test_id("stChatInputTextArea")
    box.fill("Hello there")
    box.press("Enter")
    caption = page.get_by_test_id("stCaptionContainer").filter(has_text="tokens/s")
    caption.wait_for()
    messages = page.get_by_test_id("stChatMessage")
    assert messages.count() == 2
    reply = messages.nth(1).get_by_test_id("stText").inner_text()
    assert reply.strip(), "the reply is empty"
    text = caption.inner_text()
    ttft = re.search(r"TTFT (\d+) ms|TTFT (\d+\.\d+) s", text)
    rate = re.search(r"([\d.,]+) tokens/s · ([\d,]+) tokens\b", text)
    assert ttft and rate, text
    # The dashboard read a stream: its first text came long before the whole reply could have
    # (TTFT is stamped by the dashboard's client at the first SSE frame with text).
    ttft_s = int(ttft[1]) / 1e3 if ttft[1] else float(ttft[2])
    total_s = int(rate[2].replace(",", "")) / float(rate[1].replace(",", ""))
    assert ttft_s < 0.5 * total_s, text
    # And the page showed the reply before it was finished. How many partial states the page
    # shows depends on how fast the browser renders (on a busy 2-core machine Streamlit can
    # deliver a 0.8 s reply in one or two renders), so at least one before the caption.
    seen = page.evaluate("[...window.__seen]")
    growing = {s for s in seen if s and "tokens/s" not in s}  # text before the final caption
    assert growing, f"the reply never showed before it finished (texts seen: {seen})"
    assert not page.get_by_test_id("stException").count()
    snapshot(page, shots / "chat.png")


def test_compare_shows_the_table(page, dashboard_url, shots):
    page.goto(f"{dashboard_url}/compare")
    page.get_by_role("heading", name="Compare").wait_for()
    page.get_by_test_id("stFormSubmitButton").get_by_role("button").click()
    page.get_by_test_id("stDataFrame").wait_for()
    page.get_by_test_id("stVegaLiteChart").first.wait_for()
    settled(page)
    assert page.get_by_text("reference", exact=False).count() >= 1
    assert not page.get_by_test_id("stException").count()
    errors = page.get_by_test_id("stMain").get_by_test_id("stAlert")
    assert not errors.count(), errors.all_inner_texts()
    snapshot(page, shots / "compare.png")


def test_models_page_draws_the_lineage(page, dashboard_url, shots):
    page.goto(f"{dashboard_url}/models")
    page.get_by_role("heading", name="Models").wait_for()
    page.locator('[data-testid="stGraphVizChart"] svg').wait_for()
    page.get_by_test_id("stDataFrame").wait_for()
    settled(page)
    assert "teacher" in page.locator('[data-testid="stGraphVizChart"] svg').text_content()
    assert not page.get_by_test_id("stException").count()
    snapshot(page, shots / "models.png")


def test_benchmarks_page_renders(page, dashboard_url, shots):
    page.goto(f"{dashboard_url}/benchmarks")
    page.get_by_role("heading", name="Benchmarks").wait_for()
    reports = page.get_by_test_id("stMain").get_by_test_id("stExpander")
    reports.or_(page.get_by_text("No results yet: run make bench")).first.wait_for()
    settled(page)
    assert not page.get_by_test_id("stException").count()
    quality_for_speed(page, shots / "quality.png")
    snapshot(page, shots / "benchmarks.png", max_height=2400)  # every report: 10,000 px


def quality_for_speed(page, path: Path) -> None:
    """The committed `reports/eval.json` drawn at the top of the page: the chart (one point
    per variant) and its table beside it; `path` gets that part of the page."""
    heading = page.get_by_role("heading", name="Quality for speed")
    heading.wait_for()
    if page.get_by_text("No quality report yet").count():
        pytest.fail("reports/eval.json is committed, so the quality chart must be drawn")
    chart = page.get_by_test_id("stVegaLiteChart").first
    chart.locator("canvas, svg").first.wait_for()
    table = page.get_by_test_id("stMain").get_by_test_id("stDataFrame").first
    table.wait_for()
    settled(page)
    top, bottom = heading.bounding_box(), chart.bounding_box()
    assert top is not None and bottom is not None and bottom["height"] > 100
    y = max(0.0, top["y"] - 16)
    page.screenshot(
        path=str(path),
        clip={"x": 0, "y": y, "width": 1440, "height": bottom["y"] + bottom["height"] + 24 - y},
    )
