"""Shared helpers of the GPU benchmarks: timing with CUDA events, memory, ceilings, environment, JSON.

Every benchmark in ``bench/`` times device work with CUDA events after a warm-up, repeats it and
reports the median; it draws random inputs (never zeros) and records the environment it ran in.
These helpers need torch but nothing from hpframe.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import torch

#: Dense bf16 peak of one H200 SXM by the datasheet (TFLOP/s); MFU is reported against it.
H200_PEAK_TFLOPS = 989.0


def time_cuda(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    min_reps: int = 3,
    max_reps: int = 20,
    budget_s: float = 2.0,
    inner: int = 1,
) -> dict[str, Any]:
    """Median wall time of ``fn`` in ms, each repetition bracketed by its own pair of CUDA events.

    The number of repetitions adapts to the cost of one call: as many as fit in ``budget_s``
    (at least ``min_reps``, at most ``max_reps``), so slow baselines do not eat the device lease.
    ``inner`` > 1 issues ``fn`` that many times back to back inside each repetition and reports the
    time per call: for a single kernel of about a millisecond, the launch latency that the first
    call of a repetition waits for (the queue is drained between repetitions) is then not a
    few percent of the figure.
    """
    if not torch.cuda.is_available():  # CPU smoke runs of the scripts: host clock, no events
        return _time_host(fn, warmup=warmup, reps=min_reps)

    def call() -> None:  # one repetition: ``inner`` calls
        for _ in range(inner):
            fn()

    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    call()
    torch.cuda.synchronize()
    one = time.perf_counter() - t0
    reps = int(max(min_reps, min(max_reps, budget_s / max(one, 1e-6))))
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "reps": reps,
        "warmup": warmup,
        "inner": inner,
    }


def _time_host(fn: Callable[[], Any], *, warmup: int, reps: int) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps,
            "warmup": warmup}


def peak_gib() -> float:
    """torch.cuda.max_memory_allocated in GiB (0 without CUDA)."""
    return gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0.0


def gib(num_bytes: float) -> float:
    return num_bytes / 2**30


def measure_matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """bf16 n x n x n matmul rate on random data (the measured compute ceiling), TFLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_cuda(lambda: a @ b, warmup=3, min_reps=reps, max_reps=reps)
    del a, b
    return 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12


def measure_copy_gbps(num_bytes: int = 2**31) -> float:
    """Device-to-device copy bandwidth, bytes read plus bytes written, GB/s (the memory ceiling)."""
    src = torch.randn(num_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), warmup=3, min_reps=10, max_reps=10)
    del src, dst
    return 2 * num_bytes / (t["median_ms"] * 1e-3) / 1e9


REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "deepspeed", "transformers", "triton")


def pinned_versions(pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    """{library: version} of the exact pins (``name==version``) in pyproject.toml."""
    import re

    text = pyproject.read_text() if pyproject.is_file() else ""
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r'"([A-Za-z0-9_.-]+)==([^";,\s]+)"', text)}


def source_digest(root: Path = REPO) -> str:
    """sha256 over the Python sources that decide what a run computes (hpframe/, bench/, launch.py) and
    the config tree, path and bytes of each file in sorted order: identifies the code of a run on a
    machine whose copy of the tree has no .git (compare with the digest of a checkout of a commit)."""
    import hashlib

    files = sorted(p for pattern in ("hpframe/**/*.py", "bench/*.py", "launch.py", "conf/**/*.yaml", "recipes/*.yaml",
                                     "hpframe/**/*.yaml")
                   for p in root.glob(pattern) if p.is_file())
    h = hashlib.sha256()
    for p in dict.fromkeys(files):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def git_commit(root: Path = REPO) -> tuple[str | None, str]:
    """(commit, where it came from): $BENCH_COMMIT when set (the device machine's copy of the tree has
    no .git), else ``git rev-parse HEAD`` of ``root`` (with "+dirty" when tracked files differ)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"], "BENCH_COMMIT"
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=False).stdout.strip()
        if len(head) != 40:
            return None, "none"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=False).stdout.strip()
        return head + ("+dirty" if dirty else ""), "git"
    except OSError:
        return None, "none"


def environment() -> dict[str, Any]:
    """What the numbers were measured with, read when called: GPU, library versions (and whether each
    is the version pyproject.toml pins), git commit, a digest of the sources."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, num_gpus=torch.cuda.device_count(), sms=p.multi_processor_count,
                   gpu_mem_gib=round(gib(p.total_memory), 1))
    pins = pinned_versions()
    for mod in LIBRARIES:
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    env["pinned"] = {mod: pins.get(mod) for mod in LIBRARIES if pins.get(mod)}
    # the device's torch (a CUDA build) is not the pinned CPU one: say so in every result
    env["differs_from_pin"] = sorted(mod for mod, want in env["pinned"].items()
                                     if env[mod] is None or env[mod].split("+")[0] != want)
    env["git_commit"], env["git_commit_from"] = git_commit()
    env["source_sha256"] = source_digest()
    return env


def out_dir() -> Path:
    """$OUT on the device machine (files there come back), else bench/results/local."""
    path = Path(os.environ.get("OUT") or Path(__file__).parent / "results" / "local")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(name: str, payload: dict[str, Any]) -> Path:
    path = out_dir() / name
    path.write_text(json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n")
    return path


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in fp32 (NaN anywhere gives NaN, which fails every check)."""
    a, ref = a.detach().reshape(-1), ref.detach().reshape(-1)
    num = den = 0.0
    step = 1 << 28  # in slices, so a 15 GB bf16 tensor needs no fp32 copy of itself
    for i in range(0, max(a.numel(), 1), step):
        a32, r32 = a[i:i + step].double(), ref[i:i + step].double()
        num += float(((a32 - r32) ** 2).sum())
        den += float((r32**2).sum())
    return float(num**0.5 / max(den**0.5, 1e-30))


def row_agreement(a: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Fraction of rows whose relative error is below ``tol``.

    Routers that round their logits to bf16 pick a different k-th expert for a few tokens near a
    tie; those rows differ by a whole expert's share. The row fraction keeps such legitimate
    differences apart from a wrong kernel, which corrupts most rows.
    """
    a32, r32 = a.detach().float().reshape(-1, a.shape[-1]), ref.detach().float().reshape(-1, ref.shape[-1])
    err = (a32 - r32).norm(dim=-1) / r32.norm(dim=-1).clamp_min(1e-30)
    return float((err < tol).float().mean())


def profile_table(fn: Callable[[], Any], *, steps: int = 2, row_limit: int = 25) -> str:
    """torch.profiler table (CUDA time, top ``row_limit`` ops) of ``steps`` calls after one warm-up."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=row_limit, max_name_column_width=60)


def main(argv: list[str] | None = None) -> int:
    """``python3 bench/common.py env FILE [--command CMD]``: write ``{"env": environment(), "command": CMD}``
    to FILE (bench/run_launch_gpu.sh records each launch.py run with it); ``digest`` prints source_digest()."""
    import argparse

    parser = argparse.ArgumentParser(prog="bench/common.py")
    sub = parser.add_subparsers(dest="what", required=True)
    env_p = sub.add_parser("env", help="write the environment JSON of a run")
    env_p.add_argument("file")
    env_p.add_argument("--command", default=None)
    sub.add_parser("digest", help="print the source digest of this tree")
    args = parser.parse_args(argv)
    if args.what == "digest":
        print(source_digest())
        return 0
    Path(args.file).parent.mkdir(parents=True, exist_ok=True)
    Path(args.file).write_text(json.dumps({"env": environment(), "command": args.command}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
