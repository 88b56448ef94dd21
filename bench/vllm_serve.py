"""Bounded load test of `vllm serve` with vtprune's plugin, pruned and unpruned, on 127.0.0.1 only.

For each setting (unpruned vLLM LLaVA, then the method at each budget) it starts `vllm serve CHECKPOINT` on a local
port, waits until it is healthy, sends one warm-up request, then lets N concurrent clients send a fixed number of
OpenAI-style streaming chat requests (an image as a data URL + a testbed question), stops the server and prints one
row: requests/s, median and p90 time to first token, median latency, accuracy. It stops by itself.

    python bench/vllm_serve.py --checkpoint DIR [--clients 4] [--requests 32] [--method fastervlm]
                               [--budgets 0.5,0.25,0.125]

Run it with the vLLM environment's python (scripts/vllm_env.sh); DIR from `python -m vtprune.vllm.export`.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(checkpoint: str, port: int, overrides: dict | None, log, extra_args=()) -> subprocess.Popen:
    command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", checkpoint, "--host", HOST,
               "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
               "--compilation-config", '{"mode": 0}', "--limit-mm-per-prompt", '{"image": 1}',
               "--served-model-name", "model", *extra_args]
    if overrides is not None:
        command += ["--hf-overrides", json.dumps(overrides)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_healthy(server: subprocess.Popen, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {server.returncode} (see its log)")
        try:
            connection = http.client.HTTPConnection(HOST, port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"vllm serve was not healthy after {timeout:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def chat_request(port: int, image_url: str, question: str, max_tokens: int,
                 extra: dict | None = None) -> tuple[float, float, str]:
    """One streaming chat completion: (seconds to the first content token, seconds in all, the answer). extra: more
    fields of the request body (e.g. {"mm_processor_kwargs": {"vtprune": {"keep": 0.5}}})."""
    body = json.dumps({
        "model": "model", "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                  {"type": "text", "text": question}]}],
        **(extra or {}),
    })
    start = time.perf_counter()
    connection = http.client.HTTPConnection(HOST, port, timeout=600)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first, text = None, []
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
        if delta:
            first = first if first is not None else time.perf_counter() - start
            text.append(delta)
    return (first if first is not None else time.perf_counter() - start), time.perf_counter() - start, "".join(text)


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def load(port: int, samples, urls, clients: int, requests: int, max_tokens: int) -> dict:
    """`requests` chat requests from `clients` threads (each takes the next index until none is left)."""
    results, errors, lock = [None] * requests, [], threading.Lock()
    counter = iter(range(requests))

    def client():
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            sample = samples[index % len(samples)]
            try:
                results[index] = chat_request(port, urls[index % len(samples)], sample.question, max_tokens)
            except Exception as error:  # noqa: BLE001 - reported in the row
                with lock:
                    errors.append(str(error))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    done = [(i, r) for i, r in enumerate(results) if r is not None]
    ttft = sorted(r[0] for _, r in done)
    correct = sum(r[2].strip() == samples[i % len(samples)].answer for i, r in done)
    return {
        "requests": len(done), "errors": len(errors), "seconds": seconds,
        "rps": len(done) / seconds, "ttft_median": statistics.median(ttft) if ttft else float("nan"),
        "ttft_p90": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))] if ttft else float("nan"),
        "latency_median": statistics.median(r[1] for _, r in done) if done else float("nan"),
        "accuracy": correct / len(done) if done else float("nan"), "first_error": errors[0] if errors else "",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a directory from `python -m vtprune.vllm.export`")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--method", default="fastervlm", choices=["fastervlm", "visionzip", "divprune", "random"])
    parser.add_argument("--budgets", default="0.5,0.25,0.125", help="fractions of each image's visual tokens")
    parser.add_argument("--no-debias", action="store_true", help="without padding debiasing")
    parser.add_argument("--max-tokens", type=int, default=3)
    parser.add_argument("--startup-timeout", type=float, default=600)
    args = parser.parse_args()
    if args.clients < 1 or args.requests < 1:
        parser.error("--clients and --requests must be >= 1")
    budgets = [float(b) for b in args.budgets.split(",")]
    if any(not 0 < b <= 1 for b in budgets):
        parser.error("--budgets are fractions in (0, 1]")

    from vtprune.testbed.data import make_split

    samples = make_split("test", min(args.requests, 64))
    urls = [data_url(s.image) for s in samples]
    settings = [("unpruned (vLLM LLaVA)", None)]
    for budget in budgets:
        options = {"method": args.method, "keep": budget, "debias_padding": not args.no_debias}
        if args.method in ("divprune", "random"):
            options.pop("debias_padding")
        settings.append((f"{args.method} {budget:.1%}", {"architectures": ["VtpruneLlavaForConditionalGeneration"],
                                                        "vtprune": options}))
    rows = []
    for label, overrides in settings:
        port = free_port()
        with tempfile.NamedTemporaryFile("w+", prefix="vllm_serve_", suffix=".log", delete=False) as log:
            server = start_server(args.checkpoint, port, overrides, log)
            try:
                wait_healthy(server, port, args.startup_timeout)
                chat_request(port, urls[0], samples[0].question, args.max_tokens)  # warm-up
                row = load(port, samples, urls, args.clients, args.requests, args.max_tokens)
            finally:
                stop_server(server)
        rows.append((label, row))
        print(f"# {label}: {row['requests']} requests in {row['seconds']:.1f} s, {row['errors']} errors "
              f"{row['first_error'][:200]} (server log {log.name})", file=sys.stderr, flush=True)
    print(f"\n{args.clients} concurrent clients, {args.requests} requests per setting, max_tokens {args.max_tokens}, "
          f"testbed-lm (144 visual tokens per image), 127.0.0.1\n")
    print("| setting | requests/s | TTFT median (ms) | TTFT p90 (ms) | latency median (ms) | accuracy | errors |")
    print("|---|---|---|---|---|---|---|")
    for label, row in rows:
        print(f"| {label} | {row['rps']:.2f} | {1000 * row['ttft_median']:.0f} | {1000 * row['ttft_p90']:.0f} | "
              f"{1000 * row['latency_median']:.0f} | {row['accuracy']:.2f} | {row['errors']} |")
    return 0 if all(row["errors"] == 0 for _, row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
