"""End to end in a real browser: the Streamlit server on a free local port, Debian's Chromium
driven by Playwright.

One session uploads a Flickr8k photo of dogs and expects a caption about a dog, clicks a word
and sees its overlays, searches a word on the Embeddings page, uploads a broken file and sees
the error, then a good photo again. Ten more pages, each uploading a different photo, then
caption at the same time. The time
from handing a file to the upload widget until its caption is on screen is measured (warm
model) and written to test-artifacts/browser_timings.json with the screenshots.

Skips, saying why, without Chromium, Playwright, the Flickr8k folder or a trained model.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync"]
WARM_TARGET_S = 1.5
PAGES = 10  # sessions that upload at the same time
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- preconditions

def _requirements():
    """(dog photo paths, other photo paths) or pytest.skip with the reason."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    from app.services import photos, registry

    if photos.flickr_dataset() is None:
        pytest.skip("Flickr8k not found at ../shared/data/flickr8k")
    models = [m for m in registry.list_models() if not m.error]
    if not models:
        pytest.skip(f"no trained model in {registry.models_dir()} (the browser test needs a real captioner)")
    dogs = photos.find_photos_mentioning("dog", "test", min_refs=5)
    if len(dogs) < 2:
        pytest.skip("no Flickr8k test photo whose five references all mention a dog")
    others = [n for n in photos.flickr_test_photos() if n not in dogs][:PAGES]
    ds = photos.flickr_dataset()
    return [ds.path(n) for n in dogs[:2]], [ds.path(n) for n in others]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    dogs, others = _requirements()
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "streamlit_server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(REPO / "app" / "main.py"),
                             "--server.port", str(port), "--server.address", "127.0.0.1", "--server.headless", "true",
                             "--browser.gatherUsageStats", "false"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"streamlit did not start; see {ARTIFACTS / 'streamlit_server.log'}")
            time.sleep(0.5)
        yield {"url": url, "dogs": dogs, "others": others}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


# --------------------------------------------------------------------------- helpers

CAPTION_JS = "() => { const e = document.querySelector('.best-caption'); return e && e.textContent.trim().length > 0 }"


def open_app(browser, url: str, timeout_s: float = 240):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(url)
    # The default sample photo is captioned first: this also loads (warms) the model.
    page.wait_for_function(CAPTION_JS, timeout=timeout_s * 1000)
    return page


def sidebar(page):
    return page.locator('[data-testid="stSidebar"]')


def choose_upload(page) -> None:
    sidebar(page).locator("label").filter(has_text=re.compile(r"^Upload$")).first.click()
    sidebar(page).locator("input[type=file]").wait_for(state="attached")
    page.wait_for_function("() => !document.querySelector('.best-caption')", timeout=60_000)


def upload(page, file) -> float:
    """Give the uploader a file (path or payload); seconds until a caption is on screen (or -1)."""
    t0 = time.perf_counter()
    sidebar(page).locator("input[type=file]").set_input_files(file)
    page.wait_for_function(CAPTION_JS + "", timeout=120_000)
    return time.perf_counter() - t0


def caption_text(page) -> str:
    return page.locator(".best-caption").first.inner_text().strip()


def wait_caption_changed(page, old: str, timeout_s: float = 120) -> float:
    t0 = time.perf_counter()
    page.wait_for_function(
        "(old) => { const e = document.querySelector('.best-caption');"
        " return e && e.textContent.trim().length > 0 && e.textContent.trim() !== old }", arg=old,
        timeout=timeout_s * 1000)
    return time.perf_counter() - t0


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


# --------------------------------------------------------------------------- the tests

# --------------------------------------------------------------------------- screenshot tour (issue 26)

WORD_BUTTONS = '[class*="st-key-word-"] button, [class*="st-key-cmp-word-"] button'
WORDS_JS = """() => [...document.querySelectorAll('""" + WORD_BUTTONS.replace("'", '"') + """')]
  .filter(b => b.innerText.trim().length > 0).map(b => ({
  text: b.innerText.trim(),
  outside: b.getBoundingClientRect().right > b.closest('[data-testid="stElementContainer"]').getBoundingClientRect().right + 1,
  active: (b.getAttribute('data-testid') || '').endsWith('Active') || b.getAttribute('aria-pressed') === 'true'
          || b.getAttribute('aria-checked') === 'true' || b.getAttribute('kind') === 'pillsActive',
  clipped: b.innerText.includes('…') || [b, ...b.querySelectorAll('*')].some(
      e => e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflow !== 'visible')}))"""


def word_buttons(page) -> list[dict]:
    """The main area's word buttons: text, whether selected, whether cut short."""
    return page.evaluate(WORDS_JS)


def plain_word(label: str) -> str:
    """'dog · 0.83' or 'brown (2) · 0.41' -> the word."""
    return re.sub(r" \(\d+\)$", "", label.split(" · ")[0]).strip()


IDLE_JS = """() => {
  const busy = document.querySelector('[data-testid="stStatusWidget"], [data-testid="stSpinner"], [data-stale="true"]');
  const now = performance.now();
  if (busy) { window.__idleSince = null; return false; }
  if (window.__idleSince == null) window.__idleSince = now;
  return now - window.__idleSince > 750;
}"""


def idle(page) -> None:
    """Wait until the app's script run is over: no running indicator, no spinner and no element
    left over from the previous run (Streamlit marks those data-stale until the run ends), for
    0.75 s on end. The running indicator alone is not enough: in this app it never showed (probed
    every 30 ms through a 9 s run), and a check made while the run was still going saw the word
    buttons of the sample's caption and of the Flickr8k photo's at once (CI, once)."""
    page.evaluate("() => { window.__idleSince = null; }")
    page.wait_for_function(IDLE_JS, timeout=300_000, polling=100)


def check_words(page, where: str) -> list[dict]:
    """The fixed points of the word control: none cut short, each with its probability, the first
    content word selected."""
    from app.services import captions

    page.locator(WORD_BUTTONS).first.wait_for(timeout=120_000)
    words = word_buttons(page)
    assert words, f"{where}: no word buttons"
    assert not [w["text"] for w in words if w["clipped"] or w["outside"]], f"{where}: clipped words {words}"
    assert all(re.search(r" · [01]\.\d\d$", w["text"]) for w in words), f"{where}: words without probability {words}"
    plain = [plain_word(w["text"]) for w in words]
    active = [i for i, w in enumerate(words) if w["active"]]
    assert active == [captions.first_content_word(plain)], f"{where}: selected {active}, words {plain}"
    return words


METRIC_LABELS_JS = """() => [...document.querySelectorAll('[data-testid="stMetricLabel"]')].map(l => ({
  text: l.innerText.trim(),
  clipped: l.innerText.includes('…') || [l, ...l.querySelectorAll('*')].some(
      e => e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflow !== 'visible')}))"""


def check_metric_labels(page, where: str) -> None:
    """Every st.metric label on the page is shown whole (not cut to "CIDEr-D (this ph…")."""
    page.locator('[data-testid="stMetricLabel"]').first.wait_for(timeout=120_000)
    labels = page.evaluate(METRIC_LABELS_JS)
    assert labels and not [m["text"] for m in labels if m["clipped"]], f"{where}: clipped metric labels {labels}"


def test_tour_at_two_widths(server, browser):
    """Every page at 1400 and 800 px wide, screenshots in test-artifacts/tour_*.png. On the
    Caption page (a Flickr8k dog photo from the example row): no word or metric label cut short, the first
    content word selected, the faithfulness badge after the check; on the Explain page the same
    word control and the random-order band in the deletion/insertion figure."""
    for width in (1400, 800):
        page = browser.new_page(viewport={"width": width, "height": 1000})
        page.set_default_timeout(120_000)
        try:
            _tour(page, server, width)
        except Exception:
            shot(page, f"tour_{width}_failed")  # what the page showed when an expectation was not met
            raise
        page.close()


def _tour(page, server, width: int) -> None:
    if True:
        page.goto(server["url"])
        page.wait_for_function(CAPTION_JS, timeout=300_000)
        shot(page, f"tour_{width}_01_caption_sample")
        old = caption_text(page)
        page.get_by_role("button", name="Flickr8k 1").click()  # the example row's first Flickr8k photo
        wait_caption_changed(page, old)
        page.get_by_text("Grad-CAM (HiResCAM) for").first.wait_for()
        page.locator(".colour-scale").first.wait_for()
        idle(page)  # check and click once the page's run is over, as a person would
        check_words(page, f"caption page at {width} px")
        check_metric_labels(page, f"caption page at {width} px")
        page.get_by_role("button", name="Check this map's faithfulness").click()
        page.get_by_text(re.compile(r"faithfulness: (faithful|inside the random band|worse than random)")).first.wait_for()
        page.get_by_text("A faithful map is not a correct caption").first.wait_for()
        shot(page, f"tour_{width}_02_caption_flickr_badge")

        page.get_by_role("link", name=re.compile("Explain")).click()
        page.get_by_text("each map on its own").first.wait_for()
        shot(page, f"tour_{width}_03_explain_gallery")
        page.locator('[data-testid="stButtonGroup"] button', has_text="Methods side by side").click()
        page.get_by_text("Deletion / insertion against random orders").wait_for()
        idle(page)
        check_words(page, f"explain page at {width} px")
        page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=300_000)
        page.get_by_text("mean ± 1 SD").first.wait_for()  # the band's legend entry
        shot(page, f"tour_{width}_04_explain_side_by_side")
        page.locator('[data-testid="stButtonGroup"] button', has_text="Beam-search tree").click()
        page.get_by_text(re.compile("(Each step keeps|Guided decoding keeps two banks)")).first.wait_for()
        shot(page, f"tour_{width}_05_explain_beam_tree")

        page.get_by_role("link", name=re.compile("Encoder")).click()
        page.get_by_text("ImageNet top-5").wait_for()
        page.locator(".colour-scale").first.wait_for()
        shot(page, f"tour_{width}_06_encoder")
        page.get_by_role("link", name=re.compile("Embeddings")).click()
        page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=300_000)
        shot(page, f"tour_{width}_07_embeddings")
        page.get_by_role("link", name=re.compile("Model")).click()
        page.get_by_text("Intended use").first.wait_for()
        shot(page, f"tour_{width}_08_model_card")
        page.get_by_role("tab", name="Training curves").click()
        page.locator('[data-testid="stPlotlyChart"]').first.wait_for()
        shot(page, f"tour_{width}_09_model_curves")
        assert page.locator('[data-testid="stException"]').count() == 0


def _show_example_dog(page, server) -> None:
    """Open the app and show the example row's first Flickr8k photo, its Grad-CAM drawn and the run over."""
    page.goto(server["url"])
    page.wait_for_function(CAPTION_JS, timeout=300_000)
    old = caption_text(page)
    page.get_by_role("button", name="Flickr8k 1").click()
    wait_caption_changed(page, old)
    page.get_by_text("Grad-CAM (HiResCAM) for").first.wait_for()
    idle(page)


def test_faithfulness_button_in_a_fresh_session_on_a_photo_another_session_showed(server, browser):
    """The Caption page's faithfulness button works in a new session on a photo another session
    has already shown (every per-photo result then comes from the shared cache). Its click used to
    do nothing in Chromium (not in AppTest) while the Caption page defined an st.cache_data function
    of its own (recognition): a hit on the entry another session wrote lost the click; the same
    function cached in app/ui.py, or not cached, did not (both bisected with this test)."""
    first = browser.new_page(viewport={"width": 1400, "height": 1000})
    first.set_default_timeout(120_000)
    _show_example_dog(first, server)
    second = browser.new_page(viewport={"width": 1400, "height": 1000})
    second.set_default_timeout(120_000)
    try:
        _show_example_dog(second, server)
        second.get_by_role("button", name="Check this map's faithfulness").click()
        second.get_by_text(re.compile(r"faithfulness: (faithful|inside the random band|worse than random)")
                           ).first.wait_for(timeout=180_000)
    except Exception:
        shot(second, "faithfulness_second_session_failed")
        raise
    finally:
        first.close()
        second.close()


def test_end_to_end(server, browser):
    timings: dict[str, object] = {}
    page = open_app(browser, server["url"])
    shot(page, "01_start_sample")
    choose_upload(page)

    # 1. A photo of dogs: caption about a dog, on screen quickly.
    dog = server["dogs"][0]
    timings["upload_dog_s"] = upload(page, str(dog))
    text = caption_text(page)
    timings["dog_caption"] = text
    page.get_by_text("Grad-CAM (HiResCAM) for").first.wait_for(timeout=60_000)
    shot(page, "02_dog_caption")
    assert re.search(r"\bdogs?\b", text), f"caption of {dog.name} does not mention a dog: {text!r}"

    # 2. Click a word: its overlays appear.
    buttons = page.locator('[data-testid="stButtonGroup"] button')
    buttons.first.wait_for(timeout=60_000)
    page.get_by_text("Grad-CAM (HiResCAM) for").first.wait_for(timeout=60_000)
    labels = [b.inner_text().strip() for b in buttons.all()]
    assert labels, "no clickable words"
    # A repeated word is labelled "brown (2)"; the overlay's title names the plain word.
    words = [plain_word(w) for w in labels]  # "dog · 0.83" -> "dog"
    pick = next((i for i, w in enumerate(words) if w in ("dog", "dogs")), min(1, len(words) - 1))
    word = words[pick]
    buttons.nth(pick).click()
    page.get_by_text(f"Grad-CAM (HiResCAM) for “{word}”").wait_for(timeout=60_000)
    if page.get_by_text("has no attention").count() == 0:
        page.get_by_text(f"attention for “{word}”").wait_for(timeout=60_000)
    shot(page, "03_word_overlay")

    # 3. Embeddings: search a word, its neighbours are listed.
    page.get_by_role("link", name=re.compile("Embeddings")).click()
    box = page.get_by_label("Search a word")
    box.wait_for(timeout=300_000)
    box.fill("dog")
    box.press("Enter")
    page.get_by_text("Nearest neighbours of “dog”").wait_for(timeout=300_000)
    page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=60_000)
    shot(page, "04_embeddings_search")

    # 4. Back to Caption; a broken file gets a clear error, the app stays usable.
    page.get_by_role("link", name=re.compile("Caption")).click()
    page.wait_for_function(CAPTION_JS, timeout=120_000)
    sidebar(page).locator("input[type=file]").set_input_files(
        {"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": b"\xff\xd8\xff\xe0 this is not really a JPEG"})
    err = page.locator('[data-testid="stAlert"]').filter(has_text="Cannot use this file")
    err.first.wait_for(timeout=60_000)
    assert "broken.jpg" in err.first.inner_text()
    shot(page, "05_broken_file_error")

    # 5. A good photo again: captioned, error gone.
    good = server["dogs"][1]
    timings["upload_good_again_s"] = upload(page, str(good))
    assert page.locator('[data-testid="stAlert"]').filter(has_text="Cannot use this file").count() == 0
    timings["good_again_caption"] = caption_text(page)
    shot(page, "06_good_photo_again")
    page.close()

    timings["warm_target_s"] = WARM_TARGET_S
    (ARTIFACTS / "browser_timings.json").write_text(json.dumps(timings, indent=2))
    print("\nbrowser timings:", json.dumps(timings))
    worst = max(timings["upload_dog_s"], timings["upload_good_again_s"])
    if worst > WARM_TARGET_S:
        # Reported, not failed: a loaded CI machine must not make the suite flaky.
        print(f"warning: warm caption latency {worst:.2f} s is over the {WARM_TARGET_S} s target")


def test_ten_pages_caption_at_once(server, browser):
    """PAGES sessions, each with its own photo, upload at once: every one gets its own caption
    (the one a single session gets for that photo), and none shows an error."""
    photos = server["others"][:PAGES]
    if len(photos) < PAGES:
        pytest.skip(f"fewer than {PAGES} other Flickr8k test photos")
    from app.services import captions, registry
    from app.services.photos import MODEL_SIDE, decode_image, display_copy

    pages = []
    t0 = time.perf_counter()
    for _ in range(PAGES):  # open all first: their first runs overlap too
        p = browser.new_page(viewport={"width": 1200, "height": 900})
        p.set_default_timeout(240_000)
        p.goto(server["url"])
        pages.append(p)
    for p in pages:
        p.wait_for_function(CAPTION_JS, timeout=300_000)
    for p in pages:
        choose_upload(p)
    start = time.perf_counter()
    for p, f in zip(pages, photos):  # hand over all files, then wait for all captions
        sidebar(p).locator("input[type=file]").set_input_files(str(f))
    texts = []
    for p, f in zip(pages, photos):
        # This page's own photo is on screen (its name under the image), and its run is over.
        p.get_by_text(f.name).first.wait_for(timeout=300_000)
        p.wait_for_function(CAPTION_JS, timeout=300_000)
        idle(p)
        texts.append(caption_text(p))
        assert p.locator('[data-testid="stAlert"]').filter(has_text="Cannot use").count() == 0
        assert p.locator('[data-testid="stException"]').count() == 0
    elapsed = time.perf_counter() - start
    shot(pages[-1], "07_concurrent_page10")
    for p in pages:
        p.close()
    assert all(texts) and len(texts) == PAGES
    # Each page shows the caption of its own photo, not a neighbour's: the app's first model with
    # the sidebar's defaults (beam 3, N-best 3, the model's length penalty and re-ranking).
    model = next(m for m in registry.list_models() if not m.error)
    cap = registry.load_captioner(str(model.path))
    for f, text in zip(photos, texts):
        im = display_copy(decode_image(Path(f).read_bytes()), MODEL_SIDE)
        want = captions.caption(cap, im, 3, model.length_penalty, 3, rerank=model.rerank).text
        assert text == want, (f.name, text, want)
    out = ARTIFACTS / "browser_timings.json"
    d = json.loads(out.read_text()) if out.is_file() else {}
    d["ten_pages_all_captioned_s"] = elapsed
    d["ten_pages_open_s"] = start - t0
    d["ten_pages_captions"] = texts
    out.write_text(json.dumps(d, indent=2))
    print(f"\n{PAGES} pages:", elapsed, texts)


def test_every_app_cache_has_a_limit():
    """A public demo's caches must not grow with the photos, words and models people try: every
    st.cache_data / st.cache_resource in the app names max_entries (bench/bench_memory.py
    measures what that bounds). Needs no browser: a look at the source."""
    import ast

    unbounded = []
    for path in sorted((REPO / "app").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for dec in node.decorator_list:
                    call = dec if isinstance(dec, ast.Call) else None
                    name = ast.unparse(call.func if call else dec)
                    if name.endswith(("cache_data", "cache_resource")):
                        kws = {k.arg for k in call.keywords} if call else set()
                        if "max_entries" not in kws:
                            unbounded.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not unbounded, unbounded
