"""Two versions of aihub served at once and driven in turn: what a change does to a stream's
first token, judged against the code before it in the same minutes.

    uv run python bench/compare.py HEAD~1            # that revision against the working tree
    uv run python bench/compare.py main my-branch --rounds 80

Each revision is checked out in a temporary git worktree and served by its own `aihub serve`
(its own data folder, the same fake OpenAI upstream). Each round sends one ideas stream through
each server and one to the upstream directly, the servers' order alternating from round to
round: driven in a fixed order, the one that always came second ran up to 0.5 ms faster here.
A full `stream_overhead.py` run cannot tell a 0.3 ms change from the machine's drift between
two runs; this can, because both versions see the same drift. Besides the two medians it prints
the median of the rounds' own differences, with a bootstrap 95% interval: a change whose
interval holds zero is not told apart from the noise.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _support import ROOT, free_port, register, start, stop, wait_ready
from stream_overhead import Arm, aihub_arm, aihub_env, direct_arm, inherited_env, run_burst


def checkout(revision: str, scratch: Path) -> Path:
    """The source folder of `revision` (a worktree under `scratch`); `.` is the working tree."""
    if revision == ".":
        return ROOT / "src"
    folder = scratch / f"tree-{len(list(scratch.glob('tree-*')))}"
    subprocess.run(
        ["git", "worktree", "add", "--quiet", "--detach", str(folder), revision],
        cwd=ROOT,
        check=True,
    )
    return folder / "src"


def summary(arm: Arm, direct: float) -> str:
    ttfts = sorted(sample.ttft for sample in arm.samples)
    quartiles = statistics.quantiles(ttfts, n=4)
    median = statistics.median(ttfts)
    added = (median - direct) * 1000
    return (
        f"TTFT p50 {median * 1000:5.2f} ms (added {added:5.2f} ms), "
        f"p25-p75 {quartiles[0] * 1000:.2f}-{quartiles[2] * 1000:.2f} ms, "
        f"{len(ttfts)} streams, {arm.failures} failures"
    )


async def measure(args: argparse.Namespace, upstream: str, bases: dict[str, str]) -> dict[str, Arm]:
    """The rounds, against the servers `main` started: the upstream's direct arm and each
    version's (`bases`: their URLs, by name)."""
    await wait_ready(f"{upstream}/health")
    specs = {"direct": direct_arm(upstream)}
    for name, base in bases.items():
        await wait_ready(f"{base}/api/health", timeout=60)
        specs[name] = aihub_arm(base, await register(base), args.wire)
    arms = {name: Arm(name) for name in specs}
    for spec in specs.values():  # connection pools, first-use imports
        await run_burst(Arm("warm-up"), spec, streams=5, arrival=0.1)
    for round_ in range(args.rounds):
        servers = ["before", "after"] if round_ % 2 == 0 else ["after", "before"]
        for name in ["direct", *servers]:
            await asyncio.sleep(args.pause)  # each stream starts cold, as a lone one does
            await run_burst(arms[name], specs[name], streams=1, arrival=0)
    return arms


def paired_change(before: Arm, after: Arm) -> tuple[float, float, float] | None:
    """The median of each round's difference (after - before, the two streams a second apart
    at most, so the machine's drift cancels) with a bootstrap 95% interval; None if a stream
    failed (the rounds no longer pair up)."""
    if before.failures or after.failures or len(before.samples) != len(after.samples):
        return None
    rounds = zip(before.samples, after.samples, strict=True)
    changes = [new.ttft - old.ttft for old, new in rounds]
    draw, resamples = random.Random(0), 2000
    medians = sorted(
        statistics.median(draw.choices(changes, k=len(changes))) for _ in range(resamples)
    )
    low, high = medians[int(resamples * 0.025)], medians[int(resamples * 0.975) - 1]
    return statistics.median(changes), low, high


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="a git revision")
    parser.add_argument("after", nargs="?", default=".", help="a git revision (default: .)")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--pause", type=float, default=0.4, help="seconds between streams")
    parser.add_argument("--wire", choices=["markdown", "json"], default="markdown")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="aihub-compare-"))
    env = inherited_env()
    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    fake = ["-m", "tests.fakes.openai", "--port", str(upstream_port), "--tokens", "5"]
    processes = [start([sys.executable, *fake], env, scratch / "upstream.log")]
    versions = {"before": args.before, "after": args.after}
    bases: dict[str, str] = {}
    finished = False
    try:
        for name, revision in versions.items():
            source = checkout(revision, scratch)
            bases[name] = f"http://127.0.0.1:{free_port()}"
            server_env = {
                **aihub_env(env, upstream=upstream, data_dir=scratch / f"data-{name}"),
                "PYTHONPATH": str(source),
            }
            command = [sys.executable, "-m", "aihub.cli", "serve"]
            command += ["--port", bases[name].rsplit(":", 1)[1]]
            processes.append(start(command, server_env, scratch / f"aihub-{name}.log"))
        arms = asyncio.run(measure(args, upstream, bases))
        medians = {
            name: statistics.median(sample.ttft for sample in arm.samples)
            for name, arm in arms.items()
        }
        print(f"direct: {summary(arms['direct'], medians['direct'])}")
        for name, revision in versions.items():
            print(f"{name} ({revision}): {summary(arms[name], medians['direct'])}")
        change = medians["after"] - medians["before"]
        print(f"after - before: {change * 1000:+.2f} ms at the median")
        if paired := paired_change(arms["before"], arms["after"]):
            median, low, high = paired
            print(
                f"after - before, round by round: {median * 1000:+.2f} ms at the median "
                f"(95% interval {low * 1000:+.2f} to {high * 1000:+.2f} ms)"
            )
        finished = True
        return 0 if not any(arm.failures for arm in arms.values()) else 1
    finally:
        logs = sorted(scratch.glob("*.log"))
        stop(processes, logs, failed=not finished)
        for tree in scratch.glob("tree-*"):
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
