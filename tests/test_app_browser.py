"""The app in a real browser: ``python -m kldb.app`` on 127.0.0.1 and Debian's chromium driven by Playwright.

The test picks two classes, generates (8 steps, 2 images per row), checks the galleries against the records the same
call writes (the zip behind the Download button), triggers two bad inputs and reads their messages, and saves a
screenshot. ``KLDB_APP_SCREENSHOT=docs/app_screenshot.png`` makes the README's screenshot: the same test with the
app's own settings (40 steps, 4 images of "three and eight"), the screenshot also written there.

Without chromium or Playwright it is skipped, except in CI (``CI=true``), where it fails: CI installs both (.ci/run,
the test extra).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("KLDB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
README_SCREENSHOT = os.environ.get("KLDB_APP_SCREENSHOT")
CLASSES = ("three", "eight") if README_SCREENSHOT else ("five", "seven")
STEPS, IMAGES = (40, 4) if README_SCREENSHOT else (8, 2)
#: Seconds to wait: for the app to load its world and answer, and for one Generate. Both are far above what the test
#: takes on an idle 2-core machine; they bound it on a busy one.
START_TIMEOUT, GENERATE_TIMEOUT = 240, 180


def require_browser() -> None:
    """Skip when Playwright or chromium is missing, except in CI, where that is a failure."""
    problems = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("playwright is not installed (the test extra)")
    if not Path(CHROMIUM).is_file():
        problems.append(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    if problems:
        reason = "the browser test cannot run: " + "; ".join(problems)
        if IN_CI:
            pytest.fail(reason + "; in CI it must run")
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """``python -m kldb.app`` on a free port of 127.0.0.1: the digits world (its tiny stand-in if it is not trained)."""
    require_browser()
    from kldb.digits import WORLD_PATH

    port = free_port()
    command = [sys.executable, "-m", "kldb.app", "--host", "127.0.0.1", "--port", str(port)]
    if not (WORLD_PATH / "model_index.json").is_file():
        command.append("--tiny")
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            if process.poll() is not None:
                raise AssertionError(f"kldb.app exited with {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"kldb.app did not answer within {START_TIMEOUT} s:\n{log.read_text()}"
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl+C, as a user stops it
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
    # the sessions' files go with the process
    root = re.search(r"Session files under (\S+) \(removed on exit\)", log.read_text())
    assert root is not None and not Path(root[1]).exists(), log.read_text()


def test_generate_in_the_browser_matches_the_records_and_errors_are_messages(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # each page update; a busy CI machine answers slower than Playwright's 5 s
    started = time.monotonic()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page.goto(app_url)
            expect(page.locator("#generate")).to_be_visible(timeout=60_000)

            # 1. pick two classes by typing in the searchable multi-select; the prompt follows them
            page.locator("#classes .remove-all").click()
            search = page.locator("#classes input[role=combobox]")
            for name in CLASSES:
                search.fill(name[:3])
                page.get_by_role("option", name=name, exact=True).click()
            expect(page.locator("#prompt textarea")).to_have_value(" and ".join(CLASSES))
            page.locator("#steps input").fill(str(STEPS))
            page.locator("#num-images input").fill(str(IMAGES))
            page.locator("#num-images input").press("Tab")

            # 2-3. generate; wait for both galleries and the download
            page.locator("#generate").click()
            captions = {}
            for row, gallery in (("prompt_only", "#gallery-prompt-only"), ("guided", "#gallery-guided")):
                labels = page.locator(f"{gallery} .caption-label")
                expect(labels).to_have_count(IMAGES, timeout=GENERATE_TIMEOUT * 1000)
                expect(page.locator(f"{gallery} img")).to_have_count(IMAGES)
                captions[row] = labels.all_inner_texts()
            expect(page.locator("#download")).to_be_enabled()

            # 4. the images and captions are those of the records this call wrote (the zip behind Download)
            with page.expect_download() as download_info:
                page.locator("#download").click()
            archive = zipfile.ZipFile(io.BytesIO(Path(download_info.value.path()).read_bytes()))
            records = json.loads(archive.read("results.json"))
            assert records["settings"]["classes"] == list(CLASSES) and records["settings"]["steps"] == STEPS
            assert records["settings"]["prompt"] == " and ".join(CLASSES)
            for row, shown in captions.items():
                recorded = [image for image in records["images"] if image["row"] == row]
                assert len(recorded) == IMAGES and all(image["file"] in archive.namelist() for image in recorded)
                assert shown == [image["caption"] for image in recorded]
                assert [float(re.match(r"KLDB = (\d+\.\d{3})", text)[1]) for text in shown] == [
                    round(image["kldb"], 3) for image in recorded
                ]
            medians = page.locator("#medians").inner_text()
            for row in ("prompt_only", "guided"):
                assert f"{records['rows'][row]['median_kldb']:.4f}".rstrip("0") in medians

            # 6. the screenshot (for the README when asked)
            screenshot = tmp_path / "app_screenshot.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.stat().st_size > 10_000
            if README_SCREENSHOT:
                shutil.copyfile(screenshot, README_SCREENSHOT)

            # 5. bad input: no class picked; a run folder that does not exist. Messages, not tracebacks
            page.locator("#classes .remove-all").click()
            page.locator("#generate").click()
            expect(page.get_by_text("Expected argument `classes` to name at least one class")).to_be_visible()
            page.get_by_role("tab", name="Audit").click()
            page.locator("#run-dir textarea").fill(str(tmp_path / "no-such-run"))
            page.locator("#open-run").click()
            expect(page.get_by_text("Expected argument `run_dir` to be an existing run folder")).to_be_visible()
            assert "Traceback" not in page.content()
            page.screenshot(path=str(tmp_path / "app_errors.png"), full_page=True)
        finally:
            browser.close()
    print(f"browser test: {time.monotonic() - started:.1f} s after the app answered")


def test_audit_and_image_tabs_in_the_browser(app_url, tmp_path):
    """The Audit tab runs a 2-image sweep in the background, shows its progress, then Table 1 and the plots; the image
    tab pushes an uploaded image and shows it before and after."""
    import PIL.Image
    import PIL.ImageDraw
    from playwright.sync_api import expect, sync_playwright

    from kldb.runfolder import read_manifest

    expect.set_options(timeout=30_000)
    image = PIL.Image.new("RGB", (32, 32), "black")
    PIL.ImageDraw.Draw(image).text((12, 10), "3", fill="white")
    image.save(tmp_path / "three.png")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(app_url)
            page.get_by_role("tab", name="Audit").click()
            page.locator("#alphas textarea").fill("0, 0.2")
            page.locator("#sweep-seeds input").fill("1")
            page.locator("#sweep-steps input").fill(str(STEPS))
            page.locator("#sweep-steps input").press("Tab")
            page.locator("#start-sweep").click()
            expect(page.locator("#sweep-status")).to_contain_text("of 2 images")
            expect(page.locator("#sweep-status")).to_contain_text("Sweep done", timeout=GENERATE_TIMEOUT * 1000)
            run = Path(page.locator("#run-dir textarea").input_value())
            records = read_manifest(run)
            assert sorted(r.alpha for r in records) == [0.0, 0.2] and {r.num_inference_steps for r in records} == {
                STEPS
            }
            expect(page.locator("#table1")).to_contain_text("Table 1")
            expect(page.locator("#report-plots img")).to_have_count(3)
            page.screenshot(path=str(tmp_path / "app_audit.png"), full_page=True)

            page.get_by_role("tab", name="From an image").click()
            page.locator("#edit-image input[type=file]").set_input_files(str(tmp_path / "three.png"))
            page.locator("#edit").click()
            expect(page.locator("#edit-after img")).to_have_count(1, timeout=GENERATE_TIMEOUT * 1000)
            expect(page.locator("#edit-before img")).to_have_count(1)
            expect(page.locator("#edit-scores")).to_contain_text("Before: KLDB = ")
            expect(page.locator("#edit-scores")).to_contain_text("After: KLDB = ")
            page.screenshot(path=str(tmp_path / "app_image.png"), full_page=True)
        finally:
            browser.close()
