"""The web page at / in headless Chromium (Debian's chromium and chromium-driver): upload, see the label.

The screenshot goes to the test's temporary folder; to refresh the one in the docs:

    VITKIT_SCREENSHOT=docs/img/serve_page.png python -m pytest tests/test_web_page.py
"""

import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

import vitkit
from vitkit.data import load_data

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from vitkit.serve import BackgroundServer, create_app, load_predictor  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (see the README set-up)")


@pytest.fixture(scope="module")
def run_dir(digits16_run):
    return digits16_run  # conftest.py: trained once per session


@pytest.fixture(scope="module")
def url(run_dir):
    with BackgroundServer(create_app(load_predictor(run_dir))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=980,800",
                "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    # An explicit driver path: selenium would otherwise try to download one.
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def _digit_png(run_dir, path: Path) -> str:
    """The first validation digit the run classifies with confidence, as a 192 px PNG; its label."""
    val, run = load_data("digits").val, vitkit.load_run(run_dir)
    for i in range(len(val.labels)):
        im = Image.fromarray(val.images[i, 0].numpy()).resize((192, 192), Image.BICUBIC)
        [[(label, prob)]] = run.predict([im], topk=1)
        if label == str(int(val.labels[i])) and prob > 0.7:
            im.save(path)
            return label
    raise AssertionError("the run classifies no digit with confidence")


def _open(browser, url):
    browser.get(url)
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "vit_pico_conv4_28" in d.find_element(By.ID, "model").text)  # /health answered
    return wait


def test_upload_shows_prediction_and_attention(browser, url, run_dir, tmp_path):
    label = _digit_png(run_dir, tmp_path / "digit.png")
    wait = _open(browser, url)
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "digit.png"))
    first = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#predictions li .label")))
    assert first.text == label
    rows = browser.find_elements(By.CSS_SELECTOR, "#predictions li")
    assert len(rows) == 5 and all(r.find_element(By.CLASS_NAME, "prob").text.endswith("%") for r in rows)
    assert "error" not in browser.find_element(By.ID, "status").get_attribute("class")
    # The overlay canvas holds the attention map: painted, and not one flat colour.
    wait.until(lambda d: d.execute_script("""
        const c = document.getElementById('overlay'), px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let painted = 0; const seen = new Set();
        for (let i = 0; i < px.length; i += 4) { if (px[i + 3]) painted++; seen.add(px[i] * 65536 + px[i + 1] * 256 + px[i + 2]); }
        return painted === px.length / 4 && seen.size > 4;"""))

    shot = tmp_path / "serve_page.png"
    assert browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0
    if os.environ.get("VITKIT_SCREENSHOT"):
        Path(os.environ["VITKIT_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, os.environ["VITKIT_SCREENSHOT"])


def test_bad_upload_shows_the_servers_message(browser, url, tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture")
    wait = _open(browser, url)
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "notes.txt"))
    wait.until(lambda d: "error" in d.find_element(By.ID, "status").get_attribute("class"))
    status = browser.find_element(By.ID, "status").text
    assert "Error 415" in status and "'notes.txt' is not an image" in status
    assert not browser.find_elements(By.CSS_SELECTOR, "#predictions li")


def test_page_is_self_contained(url):
    import httpx

    html = httpx.get(url + "/").text
    assert "<script>" in html and "<style>" in html
    assert "http://" not in html and "https://" not in html and "src=" not in html  # nothing fetched from elsewhere
    assert io.StringIO(html).readline().startswith("<!doctype html>")
