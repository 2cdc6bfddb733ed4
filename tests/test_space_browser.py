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

from vlm_patterns.families import FAMILIES as REGISTRY  # noqa: E402

SPACE = Path(__file__).resolve().parents[1] / "spaces"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FAMILIES = list(REGISTRY)  # the registry's families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerURL(str):
    """The server's address, and its process id."""

    pid: int


@pytest.fixture(scope="module")
def server():
    """The Space on a free port; `server.pid` is its process."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(SPACE / "app.py"), "--port", str(port), "--concurrency", "2", "--queue-size", "8",
         "--sessions", "8"],
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
    url = ServerURL(url)
    url.pid = process.pid
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
        page.locator(f"#stats-{family}").get_by_text("tokens").wait_for(timeout=90_000)
    page.screenshot(path=str(tmp_path / "space.png"), full_page=True)
    for family in FAMILIES:
        stats = page.locator(f"#stats-{family}").inner_text()
        tokens = int(stats.split("visual tokens: ")[1].split(" ")[0])
        assert tokens > 0, stats
        chat = page.locator(f"#chat-{family}").inner_text()
        assert "What color is the square?" in chat and len(chat.split("What color is the square?")[1].strip()) > 0
    assert page.locator("#view-llava img").count() == 1  # the pattern's picture is drawn
    assert "yellow" in page.locator("#legend-qwen2_vl").inner_text()  # and says what it shows
    assert "newline" in page.locator("#legend-fuyu").inner_text()

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


# --------------------------------------------------------------------------------------------------------------
# What the Space serves: only what it wrote itself, uploads never as inline pages, and only the host's model sets.


def test_no_file_outside_what_the_app_wrote_is_served(server):
    import tempfile

    import httpx

    secret = Path(tempfile.mkdtemp()) / "someone-elses.txt"
    secret.write_text("private")
    for path in (secret, Path("/etc/passwd"), SPACE / "app.py"):
        response = httpx.get(f"{server}gradio_api/file={path}")
        assert response.status_code == 403, (path, response.status_code)
    assert httpx.get(f"{server}gradio_api/file={SPACE / 'examples' / 'color-0.png'}").status_code == 200


def test_uploaded_pages_are_never_served_inline(server):
    import httpx

    for name, body in [("page.html", b"<script>alert(1)</script>"), ("drawing.svg", b"<svg onload='alert(1)'/>")]:
        upload = httpx.post(f"{server}gradio_api/upload", files={"files": (name, body)})
        assert upload.status_code == 200, upload.text
        (path,) = upload.json()
        served = httpx.get(f"{server}gradio_api/file={path}")
        assert served.status_code == 200 and served.content == body
        assert "html" not in served.headers["content-type"] and "svg" not in served.headers["content-type"]
        assert served.headers["content-disposition"].startswith("attachment"), served.headers


def test_only_the_hosts_model_sets_are_served(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    message = {"text": "How many shapes are there?", "files": []}
    with pytest.raises(Exception, match="hub|not offered|choices"):
        client.predict(message, None, "hub", 4, 0.0, 1.0, 32, api_name="/respond")


@pytest.mark.parametrize("kind", ["empty", "text", "huge"])
def test_bad_uploads_are_explained_in_every_column(server, tmp_path, kind):
    import PIL.Image
    from gradio_client import Client, handle_file

    path = tmp_path / "upload.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("just some words, not an image")
    else:
        PIL.Image.new("L", (20000, 20000)).save(path, optimize=True)  # 400 MP, a few hundred KB as PNG
    client = Client(server, verbose=False)
    result = client.predict({"text": "What is it?", "files": []}, handle_file(str(path)), "embedded", 4, 0.0, 1.0, 32,
                            api_name="/respond")  # fmt: skip
    expected = {"empty": "empty", "text": "not a readable image", "huge": "above the limit"}[kind]
    for chat in result[:4]:
        reply = chat[-1]["content"]
        reply = reply if isinstance(reply, str) else str(reply)
        assert chat[-1]["role"] == "assistant" and expected in reply, chat[-1]
        assert "/tmp" not in reply and str(tmp_path) not in reply  # no server paths in what visitors read


def test_server_memory_is_flat_over_many_chats(server):
    """Every API client is a new chat that never closes; beyond --sessions the oldest go, so memory stays flat."""
    from gradio_client import Client, handle_file

    def rss_kb() -> int:
        status = Path(f"/proc/{server.pid}/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))

    image = handle_file(str(SPACE / "examples" / "color-0.png"))

    def chat() -> None:
        client = Client(server, verbose=False, download_files=False)
        client.predict({"text": "What color is the square?", "files": []}, image, "embedded", 4, 0.0, 1.0, 32,
                       api_name="/respond")  # fmt: skip

    for _ in range(20):  # warm up: models loaded, allocator pools and the session store filled
        chat()
    before = rss_kb()
    for _ in range(150):
        chat()
    grown = rss_kb() - before
    assert grown < 20_000, f"{grown} kB over 150 chats"  # 0.3 MB per chat (45 MB here) before sessions were bounded
