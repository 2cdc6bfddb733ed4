"""`vlm-patterns serve` under load: throughput at 1 and at 16 concurrent clients, and the server's memory over 200
sequential requests, measured in one run against one server process.

    python benchmarks/serve.py                     # the four shipped models, an image question each request
    python benchmarks/serve.py --readme README.md  # also fill the README's <!-- bench:serve --> table

Each request is one image question to one family (the four in turn), non-streamed, answered greedily; a client is
a thread with its own `openai` client. Throughput counts answered requests per second of wall time; any error is
counted and printed. Memory is the server's resident set (VmRSS) after a warm-up and after 200 more requests.
"""

import argparse
import base64
import concurrent.futures
import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import PIL.Image
import PIL.ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vlm_patterns.families import FAMILIES  # noqa: E402
from vlm_patterns.publishing import write_readme_section  # noqa: E402


def image_uri() -> str:
    image = PIL.Image.new("RGB", (120, 90), "white")
    draw = PIL.ImageDraw.Draw(image)
    draw.ellipse((15, 20, 55, 60), fill=(220, 40, 40))
    draw.rectangle((70, 25, 105, 60), fill=(50, 80, 220))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def start_server(max_in_flight: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "vlm_patterns", "serve", "--port", str(port),
                                "--max-in-flight", str(max_in_flight)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not start within 300 s")


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Load:
    def __init__(self, url: str, max_tokens: int):
        self.url, self.max_tokens, self.uri = url, max_tokens, image_uri()
        self.families = list(FAMILIES)

    def ask(self, api, index: int) -> int:
        """One request; the completion tokens it got."""
        answer = api.chat.completions.create(
            model=self.families[index % len(self.families)], max_tokens=self.max_tokens,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": self.uri}},
                                                   {"type": "text", "text": "What color is the circle?"}]}],
        )  # fmt: skip
        return answer.usage.completion_tokens

    def run(self, clients: int, requests_each: int) -> dict:
        errors: list[str] = []

        def client(offset: int) -> int:
            api = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=300)
            tokens = 0
            for i in range(requests_each):
                try:
                    tokens += self.ask(api, offset + i)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(f"{type(e).__name__}: {e}")
            return tokens

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            tokens = sum(pool.map(client, range(clients)))
        seconds = time.perf_counter() - started
        total = clients * requests_each
        return dict(clients=clients, requests=total, seconds=seconds, requests_per_second=(total - len(errors)) / seconds,
                    tokens_per_second=tokens / seconds, errors=errors)  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests-per-client", type=int, default=8, help="at 16 clients (default: %(default)s)")
    parser.add_argument("--single", type=int, default=32, help="requests of the one client (default: %(default)s)")
    parser.add_argument(
        "--sequential", type=int, default=200, help="requests for the memory check (default: %(default)s)"
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="per answer (default: %(default)s)")
    parser.add_argument("--readme", help="also replace the <!-- bench:serve --> table in this README")
    args = parser.parse_args(argv)

    process, url = start_server(max_in_flight=64)
    try:
        load = Load(url, args.max_tokens)
        load.run(4, 2)  # warm-up: every model's first request, and some allocator churn
        one = load.run(1, args.single)
        sixteen = load.run(16, args.requests_per_client)
        before = resident_mb(process.pid)
        sequential = load.run(1, args.sequential)
        after = resident_mb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)

    ratio = sixteen["requests_per_second"] / one["requests_per_second"]
    table = "\n".join([
        "| clients | requests | errors | requests/s | answer tokens/s |",
        "|---|---|---|---|---|",
        *(f"| {r['clients']} | {r['requests']} | {len(r['errors'])} | {r['requests_per_second']:.2f} | "
          f"{r['tokens_per_second']:.1f} |" for r in (one, sixteen)),
        "",
        f"16 clients against 1: **{ratio:.2f}x** the requests per second. Server memory over "
        f"{sequential['requests']} sequential requests: {before:.0f} MB -> {after:.0f} MB "
        f"({after - before:+.0f} MB; {len(sequential['errors'])} errors).",
    ])  # fmt: skip
    print(table)
    for run in (one, sixteen, sequential):
        for error in run["errors"][:5]:
            print("error:", error)
    if args.readme:
        write_readme_section(args.readme, "bench:serve", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
