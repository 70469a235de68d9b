"""The web playground (/ui) in a real browser: Debian's chromium, driven by Playwright, against a
real ``clipserve serve`` with the tiny models. What the page shows is compared with what the API
answers for the same inputs; the page may ask nothing of any other host."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.integration.ui_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    TIMEOUT_MS,
    Playground,
    artifacts_dir,
    data_uri,
)

from clipserve.api.routes.ui import CONTENT_SECURITY_POLICY
from clipserve.api.security import hash_key
from clipserve.testing.servers import clipserve_process

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the HTTP tests below still run
    sync_playwright = None

PROMPTS = ["an astronaut", "a cup of coffee"]  # the tiny model scores both above 0 for chelsea


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_registry: dict[str, Any]
) -> Iterator[str]:
    root = tmp_path_factory.mktemp("ui-server")
    config = root / "models.json"
    config.write_text(json.dumps(tiny_registry))
    env = {
        "CLIPSERVE_DEFAULT_MODEL": "tiny",
        "CLIPSERVE_COLLECTIONS__DATA_DIR": str(root / "collections"),
    }
    with clipserve_process(config, env=env) as (base, _process):
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if sync_playwright is None:
        pytest.skip("the playwright package is not installed (pip install 'clipserve[dev]')")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian package chromium; .ci/run installs it)")
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=TIMEOUT_MS
        )
        yield launched
        launched.close()


def _playground(browser: Any, base: str) -> Iterator[Playground]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    playground = Playground(context.new_page(), base)
    playground.watch()
    playground.open()
    try:
        yield playground
        assert playground.foreign_requests() == []
        assert playground.problems == []
    finally:
        context.close()


@pytest.fixture
def playground(browser: Any, server: str) -> Iterator[Playground]:
    """The playground open on the tiny-model server; at the end, no foreign request was made and
    no script or Content-Security-Policy error happened."""
    yield from _playground(browser, server)


@pytest.fixture
def photo(tmp_path: Path, photo_bytes: Callable[..., bytes]) -> Path:
    path = tmp_path / "chelsea.jpg"
    path.write_bytes(photo_bytes("chelsea"))
    return path


def _upload(page: Any, *paths: Path) -> None:
    page.set_input_files("#files", [str(p) for p in paths])
    for path in paths:
        expect(page.locator(f'#image-list li[data-name="{path.name}"] .thumb')).to_be_visible()


def _screenshot(page: Any, folder: Path, name: str) -> Path:
    path = artifacts_dir(folder) / f"ui-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def _matrix(page: Any, model: str) -> Any:
    return page.locator(f'#score-results .matrix[data-model="{model}"]')


# --- the page's HTTP side -------------------------------------------------------------------------


def test_page_and_files_are_served_with_a_strict_policy(server: str) -> None:
    with httpx.Client(base_url=server, timeout=10) as client:
        redirect = client.get("/ui")
        assert redirect.status_code == 307
        page = client.get("/ui", follow_redirects=True)
        assert str(page.url) == server + "/ui/"
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert 'src="app.js"' in page.text
        for name, content_type in (("app.js", "text/javascript"), ("style.css", "text/css")):
            answer = client.get(f"/ui/{name}")
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith(content_type)
        for answer in (page, client.get("/ui/app.js")):
            assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert answer.headers["cache-control"] == "no-cache"
        for missing in ("/ui/nope.js", "/ui/..%2Fapp.py", "/ui/ui.py", "/ui/__init__.py"):
            answer = client.get(missing)
            assert answer.status_code == 404, missing
            assert answer.json()["error"] == "Not Found"


# --- in the browser -------------------------------------------------------------------------------


def test_score_matrix_shows_the_apis_scores(
    playground: Playground, photo: Path, tmp_path: Path
) -> None:
    page = playground.page
    page.fill("#api-key", "a-key-for-the-test")  # this server has no keys; the page sends it
    expect(page.locator("#model")).to_have_value("tiny")
    _upload(page, photo)
    page.fill("#score-prompts", "\n".join(PROMPTS))
    page.click("#score-run")
    cells = _matrix(page, "tiny").locator("td[data-score]")
    expect(cells).to_have_count(len(PROMPTS))

    expected = httpx.post(
        playground.base + "/v1/score",
        json={
            "model": "tiny",
            "images": [data_uri(photo.read_bytes(), "image/jpeg")],
            "texts": PROMPTS,
        },
        timeout=10,
    ).json()
    for j, score in enumerate(expected["scores"][0]):
        cell = _matrix(page, "tiny").locator(f'td[data-row="0"][data-col="{j}"]')
        assert float(cell.get_attribute("data-score")) == pytest.approx(score, abs=1e-3)
        assert cell.inner_text() == f"{score:.2f}"
    expect(_matrix(page, "tiny").locator("h3 .latency")).to_contain_text("ms")
    expect(page.locator("#call-log li").first).to_contain_text("POST /v1/score → 200")

    (call,) = playground.calls_to("/v1/score")
    assert call.all_headers()["authorization"] == "Bearer a-key-for-the-test"
    stored = page.evaluate("[sessionStorage.getItem('clipserve.apiKey'), localStorage.length]")
    assert stored == ["a-key-for-the-test", 0]

    _screenshot(page, tmp_path, "score-desktop")
    page.set_viewport_size({"width": 375, "height": 812})
    _screenshot(page, tmp_path, "score-phone")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scroll


def test_compare_models_side_by_side(playground: Playground, photo: Path) -> None:
    page = playground.page
    _upload(page, photo)
    page.check("#compare")
    page.select_option("#model-compare", "tiny-siglip")
    page.click("#score-run")
    for model in ("tiny", "tiny-siglip"):
        expect(_matrix(page, model).locator("td[data-score]")).to_have_count(2)


def test_classify_bars_are_probabilities(
    playground: Playground, photo: Path, tmp_path: Path
) -> None:
    page = playground.page
    _upload(page, photo)
    page.focus("#tab-score")
    page.keyboard.press("ArrowRight")  # the tabs follow the keyboard pattern of ARIA tabs
    expect(page.locator("#tab-classify")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#tab-classify")).to_be_focused()
    expect(page.locator("#panel-score")).to_be_hidden()
    page.fill("#classify-labels", "cat\ndog\nrocket")
    page.click("#classify-run")
    bars = page.locator('#classify-results article[data-model="tiny"] .bars li')
    expect(bars).to_have_count(3)
    probabilities = [float(p) for p in bars.evaluate_all("b => b.map(e => e.dataset.probability)")]
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
    assert probabilities == sorted(probabilities, reverse=True)
    expect(page.locator("#classify-results .kind")).to_have_text("softmax over the labels (CLIP)")
    _screenshot(page, tmp_path, "classify-desktop")

    page.select_option("#model", "tiny-siglip")
    page.click("#classify-run")
    expect(page.locator('#classify-results article[data-model="tiny-siglip"] .kind')).to_have_text(
        "sigmoid per label (SigLIP)"
    )


def test_create_collection_add_images_and_search(
    playground: Playground, photo: Path, tmp_path: Path, photo_bytes: Callable[..., bytes]
) -> None:
    page = playground.page
    rocket = tmp_path / "rocket.png"
    rocket.write_bytes(photo_bytes("rocket", "PNG"))
    _upload(page, photo, rocket)
    page.click("#tab-search")
    page.fill("#collection-name", "ui-photos")
    page.select_option("#collection-model", "tiny")
    page.click("#collection-create-run")
    expect(page.locator("#search-status")).to_contain_text("Created ui-photos")
    expect(page.locator("#search-collection")).to_have_value("ui-photos")
    page.click("#collection-add")
    expect(page.locator("#search-status")).to_contain_text("Added 2 to ui-photos")
    page.fill("#search-text", "a photo of a cat")
    page.click("#search-run")
    hits = page.locator("#search-results li")
    expect(hits).to_have_count(2)

    expected = httpx.post(
        playground.base + "/v1/collections/ui-photos/search",
        json={"text": "a photo of a cat", "top_k": 2},
        timeout=10,
    ).json()["results"]
    for hit, want in zip(hits.all(), expected, strict=True):
        assert hit.get_attribute("data-id") == want["id"]
        assert float(hit.get_attribute("data-score")) == pytest.approx(want["score"], abs=1e-5)
        assert want["metadata"]["name"] == want["id"]
        assert want["metadata"]["thumbnail"].startswith("data:image/jpeg;base64,")
    expect(hits.first.locator("img.thumb")).to_be_visible()
    _screenshot(page, tmp_path, "search-desktop")


def test_a_broken_image_shows_the_apis_error(
    playground: Playground, photo: Path, tmp_path: Path
) -> None:
    page = playground.page
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"these bytes are not an image at all")
    _upload(page, photo, broken)
    expect(page.locator('#image-list li[data-name="broken.png"] .placeholder')).to_have_text(
        "not an image"
    )
    page.fill("#score-prompts", PROMPTS[0])
    page.click("#score-run")
    expected = httpx.post(
        playground.base + "/v1/score",
        json={
            "model": "tiny",
            "images": [
                data_uri(photo.read_bytes(), "image/jpeg"),
                data_uri(broken.read_bytes(), "image/png"),
            ],
            "texts": PROMPTS[:1],
        },
        timeout=10,
    ).json()
    error = expected["images"][1]["error"]
    assert error
    matrix = _matrix(page, "tiny")
    expect(matrix.locator('tr[data-row="1"] th .error-text')).to_have_text(error)
    expect(matrix.locator('tr[data-row="1"] td.empty')).to_have_count(1)
    expect(matrix.locator('tr[data-row="0"] td[data-score]')).to_have_count(1)


def test_live_charts_poll_metrics_only_while_visible(
    playground: Playground, tmp_path: Path
) -> None:
    page = playground.page
    page.click("#tab-live")
    expect(page.locator("#live-charts .chart")).to_have_count(4)
    expect(page.locator("#chart-queue .now")).to_contain_text("queued 0")
    # A rate needs two scrapes (3 s apart).
    expect(page.locator("#chart-throughput polyline")).to_have_count(1, timeout=TIMEOUT_MS)
    _screenshot(page, tmp_path, "live-desktop")
    page.evaluate(
        "Object.defineProperty(document, 'hidden', {value: true, configurable: true});"
        "document.dispatchEvent(new Event('visibilitychange'))"
    )
    scrapes = len(playground.calls_to("/metrics"))
    page.wait_for_timeout(3500)  # longer than the polling interval
    assert len(playground.calls_to("/metrics")) == scrapes


def test_keyed_server_page_opens_without_a_key_and_captions_with_the_typed_one(
    browser: Any, serve: Callable[..., str], make_settings: Callable[..., Any], photo: Path
) -> None:
    """With API keys on (fake models: quick), the page itself needs no key; the key typed into
    it reaches the API; the Caption panel (the fake "blip") shows captions and their scores."""
    key = "playground-secret"
    base = serve(make_settings(auth={"api_keys": [hash_key(key)]}))
    assert httpx.get(base + "/ui/", timeout=10).status_code == 200
    assert httpx.get(base + "/v1/system/models", timeout=10).status_code == 401
    for playground in _playground(browser, base):
        page = playground.page
        expect(page.locator("#global-status")).to_contain_text("type the API key")
        page.fill("#api-key", key)
        page.locator("#api-key").dispatch_event("change")
        expect(page.locator("#global-status")).to_contain_text("default")
        expect(page.locator("#tab-caption")).to_be_visible()
        _upload(page, photo)
        page.click("#tab-caption")
        page.click("#caption-run")
        caption = page.locator('#caption-results li[data-index="0"]')
        expect(caption.locator(".score")).to_be_visible()

        headers = {"Authorization": f"Bearer {key}"}
        image = data_uri(photo.read_bytes(), "image/jpeg")
        with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
            text = client.post("/api/v1/caption", json={"images": [image]}).json()
            text = text["captions"][0]["caption"]
            scored = client.post("/v1/score", json={"images": [image], "texts": [text]}).json()
        expect(caption.locator(".caption")).to_have_text(text)
        shown = float(caption.locator(".score").get_attribute("data-score"))
        assert shown == pytest.approx(scored["scores"][0][0], abs=1e-3)
        _screenshot(page, photo.parent, "caption-desktop")
        # The browser logs the first, keyless listing's 401 as a failed load: that one only.
        assert [p for p in playground.problems if "401" not in p] == []
        playground.problems.clear()
