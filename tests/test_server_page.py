"""The web page, driven in a real headless browser (Debian's chromium and chromedriver, through selenium) against
the real server: upload an image, type an instruction, see the expected edit at rank 1; click a hit to search
with its image; a bad upload shows an error message. `make test` installs the browser; without it the test is
skipped with the reason, except under RETRIEVAL_REQUIRE_BROWSER=1 (CI), where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import run_cli

from evaluation.bench.serve import ServerProcess
from evaluation.shapesworld import make_shapesworld
from retrieval.search import open_index

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = os.environ.get("RETRIEVAL_SCREENSHOT")  # also save the result page there (docs/serve-page.png)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        reason = "chromium and chromedriver are not installed (`make test` installs them with apt where it may)"
        if os.environ.get("RETRIEVAL_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    os.environ["SE_OFFLINE"] = "true"  # selenium must not look for drivers online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100",
                 "--disable-gpu", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def edits(tmp_path_factory):
    """ShapesWorld's tgit gallery (every edit of every test scene) indexed with fuselip-tiny, and one instruction
    query whose right edit the engine ranks first among that scene's edits (the page must show the same)."""
    root = tmp_path_factory.mktemp("page")
    make_shapesworld(root / "shapes", n=60, seed=3, train_pairs=False, progress=False)
    tgit = root / "shapes" / "tasks" / "tgit"
    run_cli("index", "build", tgit / "candidates.jsonl", "--model", "fuselip-tiny", "--out", root / "edits",
            "--device", "cpu")
    searcher = open_index(root / "edits", device="cpu")
    for line in (tgit / "queries.jsonl").read_text().splitlines():
        query = json.loads(line)
        image = (tgit / query["image"]).resolve()
        where = f"id LIKE '{query['id'].rsplit('-', 2)[0]}-%'"
        top = searcher.search(image=image, text=query["text"], k=1, where=where)[0]
        if query["type"] == "rotate" and top.id in query["positives"]:
            return root, {"image": image, "text": query["text"], "where": where, "expected": top.id}
    raise AssertionError("fuselip-tiny ranks no rotation right among its scene's edits")


def wait_for(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def shown_hits(driver) -> list[dict]:
    """The result cards as the page shows them, read in one go (the grid is replaced by each search)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#results li.hit')].map(li => ({rank: li.dataset.rank, "
        "id: li.dataset.id, score: parseFloat(li.querySelector('.score').textContent), "
        "thumb: li.querySelector('img.thumb') ? li.querySelector('img.thumb').naturalWidth : 0}))")


def test_page_search_click_and_error(browser, edits, tmp_path):
    from selenium.webdriver.common.by import By

    root, query = edits
    with ServerProcess(["--index", f"edits={root / 'edits'}", "--device", "cpu"]) as server:
        browser.get(f"http://127.0.0.1:{server.port}/")
        wait_for(browser, lambda d: d.find_element(By.ID, "about").text)
        assert "fuselip-tiny" in browser.find_element(By.ID, "about").text

        browser.find_element(By.ID, "file").send_keys(str(query["image"]))
        wait_for(browser, lambda d: d.find_element(By.ID, "preview").is_displayed())
        browser.find_element(By.ID, "text").send_keys(query["text"])
        browser.find_element(By.ID, "where").send_keys(query["where"])
        browser.find_element(By.ID, "search").click()
        wait_for(browser, lambda d: shown_hits(d) and shown_hits(d)[0]["thumb"] > 0)  # its thumbnail loaded too
        first = shown_hits(browser)[0]
        assert first["rank"] == "1" and first["id"] == query["expected"]
        assert not browser.find_element(By.ID, "error").is_displayed()
        shot = tmp_path / "page.png"
        browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if SCREENSHOT:
            shutil.copyfile(shot, SCREENSHOT)

        browser.find_element(By.CSS_SELECTOR, "#results li.hit img.thumb").click()  # search with its image alone
        wait_for(browser, lambda d: d.find_element(By.ID, "text").get_attribute("value") == ""
                 and shown_hits(d) and shown_hits(d)[0]["score"] > 0.999)  # it finds itself first
        assert browser.find_element(By.ID, "preview").is_displayed()

        bad = tmp_path / "not-an-image.png"
        bad.write_text("these are not pixels")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        browser.find_element(By.ID, "search").click()
        wait_for(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "cannot decode image" in browser.find_element(By.ID, "error").text
        assert shown_hits(browser) == []

        browser.find_element(By.ID, "clear-image").click()
        browser.find_element(By.ID, "search").click()  # no image and no text
        wait_for(browser, lambda d: "needs an image, a text" in d.find_element(By.ID, "error").text)
