"""The Space end to end: started on localhost, driven in headless Chromium (Debian's chromium + Playwright), and
loaded with concurrent requests through gradio_client."""

import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

SPACE = Path(__file__).resolve().parents[1] / "spaces"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FAMILIES = ("llava", "qwen2_vl", "fuyu", "flamingo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(SPACE / "app.py"), "--port", str(port), "--concurrency", "2", "--queue-size", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if process.poll() is not None:
                pytest.fail("the app exited:\n" + process.stdout.read())
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("the app did not start within 120 s")
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: apt-get install chromium (see .ci/run)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


def ask(page, question: str, files: list[str]):
    page.locator("#prompt input[type=file]").set_input_files(files)
    page.locator("#prompt textarea").fill(question)
    page.wait_for_timeout(500)  # the upload lands in the textbox
    page.locator("#prompt textarea").press("Enter")


def test_all_four_columns_answer_in_a_browser(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(server)
    page.locator("#prompt textarea").wait_for(timeout=60_000)
    ask(page, "What color is the square?", [str(SPACE / "examples" / "color-0.png")])
    for family in FAMILIES:
        page.locator(f"#stats-{family}").get_by_text("tok/s").wait_for(timeout=90_000)
    page.screenshot(path=str(tmp_path / "space.png"), full_page=True)
    for family in FAMILIES:
        stats = page.locator(f"#stats-{family}").inner_text()
        tokens = int(stats.split("visual tokens: ")[1].split(" ")[0])
        assert tokens > 0, stats
        chat = page.locator(f"#chat-{family}").inner_text()
        assert "What color is the square?" in chat and len(chat.split("What color is the square?")[1].strip()) > 0
    assert page.locator("#view-llava img").count() == 1  # the pattern's picture is drawn

    page.get_by_role("button", name="New chat").click()
    page.wait_for_timeout(500)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    ask(page, "How many shapes are there?", [str(broken)])
    page.locator("#chat-qwen2_vl").get_by_text("not a readable image", exact=False).wait_for(timeout=60_000)
    for family in FAMILIES:
        assert "⚠️" in page.locator(f"#chat-{family}").inner_text()
    page.close()


def test_concurrent_requests_are_queued_and_all_answered(server):
    from gradio_client import Client, handle_file

    image = str(SPACE / "examples" / "count-0.png")

    def one(i: int):
        client = Client(server, verbose=False)
        started = time.time()
        message = {"text": "How many shapes are there?", "files": []}
        result = client.predict(message, handle_file(image), "embedded", 4, 0.0, 1.0, 32, api_name="/respond")
        return time.time() - started, result

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(one, range(6)))
    for seconds, result in outcomes:
        chats, stats = result[:4], result[4:8]
        assert all(chat and chat[-1]["role"] == "assistant" for chat in chats)
        assert all("visual tokens" in s for s in stats)
        assert seconds < 120
