"""Imagined dialogues per minute vs concurrency, against a fake OpenAI-compatible server with fixed latency.

Every request to the fake server takes ``--latency-ms`` (default 200 ms), like a remote LLM that answers
quickly; a dialogue costs one dialogue request, one critique request and a share of a persona request.
The server runs in a child process so its work does not compete with the client's event loop.
Target: at concurrency 16 at least 10x the sequential rate.

    .venv/bin/python bench/imagine_concurrency.py            # full run, updates BENCHMARKS.md
    .venv/bin/python bench/imagine_concurrency.py --quick    # smaller, prints only
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import platform
import time

from preamble import ROOT  # noqa: F401 (before the project imports: the root importable, HF offline)
from rich.console import Console
from rich.table import Table

from bench.benchmarks_md import reproduce_command, write_section
from imagine.backends import make_backend
from imagine.engine import ImaginationEngine, ImagineConfig
from imagine.task import load_task

SECTION = "Imagination engine: dialogues per minute vs concurrency"
console = Console()


def _serve(latency_s: float, ports: multiprocessing.Queue, stop: multiprocessing.Event) -> None:  # type: ignore[type-arg]
    from tests.fakes.openai_server import FakeOpenAIServer, ImaginationResponder

    async def main() -> None:
        async with FakeOpenAIServer(ImaginationResponder(), latency_s=latency_s) as server:
            ports.put(server.port)
            while not stop.is_set():
                await asyncio.sleep(0.05)

    asyncio.run(main())


async def measure(base_url: str, concurrency: int, n: int, critique: bool) -> dict[str, float]:
    """Imagine ``n`` dialogues (not stored) at ``concurrency``; rate and request counts."""
    backend = make_backend("openai", base_url=base_url, model="fake", concurrency=concurrency, max_retries=0)
    config = ImagineConfig(concurrency=concurrency, critique=critique, seed=concurrency, run_id=f"bench-{concurrency}")
    engine = ImaginationEngine(load_task("travel"), backend, config=config)
    started, cpu_started = time.perf_counter(), time.process_time()
    report = await engine.run(n)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    await backend.aclose()
    if report.accepted != n:
        raise SystemExit(f"concurrency {concurrency}: only {report.accepted}/{n} accepted: {dict(report.rejected)}")
    return {
        "dialogues": n,
        "seconds": elapsed,
        "per_minute": n / elapsed * 60,
        "requests": report.usage["requests"],
        "requests_per_s": report.usage["requests"] / elapsed,
        "cpu_ms_per_request": cpu / report.usage["requests"] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=200.0, help="fake server latency per request")
    parser.add_argument("--levels", default="1,4,16,64", help="concurrency levels")
    parser.add_argument("--per-worker", type=int, default=6, help="dialogues per concurrent worker (at least 12)")
    parser.add_argument("--no-critique", action="store_true", help="skip the critique request")
    parser.add_argument("--quick", action="store_true", help="fewer dialogues; print only")
    parser.add_argument("--no-append", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    per_worker = 2 if args.quick else args.per_worker
    minimum = 4 if args.quick else 12

    ports: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    stop = multiprocessing.Event()
    server = multiprocessing.Process(target=_serve, args=(args.latency_ms / 1000, ports, stop), daemon=True)
    server.start()
    try:
        base_url = f"http://127.0.0.1:{ports.get(timeout=60)}/v1"
        rows = []
        for level in levels:
            n = max(minimum, per_worker * level)
            result = asyncio.run(measure(base_url, level, n, critique=not args.no_critique))
            rows.append((level, result))
            console.print(f"concurrency {level}: {result['per_minute']:.0f} dialogues/min")
    finally:
        stop.set()
        server.join(5)

    sequential = rows[0][1]["per_minute"]
    table = Table(title=f"Imagined dialogues per minute (fake server, {args.latency_ms:.0f} ms per request)")
    columns = (
        "concurrency",
        "dialogues",
        "seconds",
        "dialogues/min",
        "requests/s",
        "client CPU ms/request",
        "speed-up",
    )
    for column in columns:
        table.add_column(column, justify="right")
    lines = [
        "| concurrency | dialogues | seconds | dialogues/min | requests/s | client CPU ms/request | speed-up vs 1 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level, r in rows:
        speedup = r["per_minute"] / sequential
        cells = (
            str(level),
            str(int(r["dialogues"])),
            f"{r['seconds']:.2f}",
            f"{r['per_minute']:.0f}",
            f"{r['requests_per_s']:.1f}",
            f"{r['cpu_ms_per_request']:.1f}",
            f"{speedup:.1f}x",
        )
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    if args.quick or args.no_append:
        return
    markdown = "\n".join(
        [
            f"The real `openai` client and the whole pipeline (persona → dialogue → critique, parsing, de-duplication) "
            f"against `tests/fakes/openai_server.py` answering every request after {args.latency_ms:g} ms "
            f"(server in a child process). Each dialogue costs about 2.1 requests. Measured "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()} with 2 shared CPU cores; "
            "target: >= 10x the sequential rate at concurrency 16.",
            "",
            *lines,
            "",
            f"Reproduce: `{reproduce_command(__file__)}`",
        ]
    )
    write_section(SECTION, markdown, replace=True)  # the latest run describes the engine as it is
    console.print("updated BENCHMARKS.md")


if __name__ == "__main__":
    main()
