"""Which code issued the device time: group a profile trace's kernels by their Python callers.

    python bench/trace_callers.py RUN_DIR/profile/rank0_trace.json.gz [--match copy|cat|fill] [--top 30]

Reads a trace written by ``train.profile_from_step`` with ``train.profile_with_stack=true`` and
prints, per (kernel, operator, caller) group, the device time per profiled step and the kernel
count. A kernel is tied to the host thread that launched it through its ``correlation`` id; the
operators and Python frames open around that launch are its callers. Kernels launched by autograd's
backward thread have no Python frames of their own: they are attributed to the Python frames of the
forward operator with the same autograd sequence number (marked ``bwd of``).
Without GPU kernels in the trace (a CPU run) the operators' own host time is grouped instead.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from pathlib import Path

KERNEL_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
KEEP_FRAMES = re.compile(r"(hpframe/|deepspeed/|torch/optim/)")


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def _frames(stack: list[dict]) -> list[str]:
    """The project / DeepSpeed / optimizer Python frames of a host stack, innermost last."""
    out = []
    for e in stack:
        if e.get("cat") == "python_function" and KEEP_FRAMES.search(e["name"]):
            m = re.search(r"((?:hpframe|deepspeed|torch/optim)/[^ ]*\(\d+\)): (\w+)", e["name"])
            out.append(f"{m.group(1)} {m.group(2)}" if m else e["name"])
    return out


def _ops(stack: list[dict]) -> list[str]:
    return [e["name"] for e in stack if e.get("cat") == "cpu_op"]


def analyse(trace: dict, match: str | None, steps: int) -> list[tuple[str, float, int]]:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    host = collections.defaultdict(list)
    kernels = []
    for e in events:
        cat = e.get("cat")
        if cat in KERNEL_CATS:
            kernels.append(e)
        elif cat in ("cpu_op", "python_function", "cuda_runtime", "cuda_driver", "user_annotation"):
            host[e["tid"]].append(e)
    launch_stack: dict[int, tuple[list[str], list[str], int | None]] = {}  # correlation -> (ops, frames, bwd seq)
    fwd_frames: dict[int, list[str]] = {}  # autograd sequence number -> frames of the forward op
    leaf_ops: list[tuple[str, float, list[str]]] = []
    for tid, es in host.items():
        es.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack: list[dict] = []
        for e in es:
            end = e["ts"] + e.get("dur", 0)
            while stack and stack[-1]["ts"] + stack[-1].get("dur", 0) < end:
                stack.pop()
            cat = e.get("cat")
            if cat in ("cuda_runtime", "cuda_driver"):
                corr = e.get("args", {}).get("correlation")
                if corr is not None:
                    bwd = next((s for s in reversed(stack) if s["name"].startswith("autograd::engine::evaluate_function")), None)
                    seq = bwd.get("args", {}).get("Sequence number") if bwd else None
                    launch_stack[corr] = (_ops(stack), _frames(stack), seq)
            elif cat == "cpu_op":
                seq = e.get("args", {}).get("Sequence number")
                frames = _frames(stack)
                if seq is not None and frames and seq not in fwd_frames:
                    fwd_frames[seq] = frames
                leaf_ops.append((e["name"], e.get("dur", 0.0), frames))
            stack.append(e)
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    if kernels:
        for k in kernels:
            corr = k.get("args", {}).get("correlation")
            ops, frames, seq = launch_stack.get(corr, ([], [], None))
            label = _short(k["name"])
            if match and not re.search(match, label + " " + " ".join(ops), re.IGNORECASE):
                continue
            op = next((o for o in reversed(ops) if o.startswith("aten::")), ops[-1] if ops else "?")
            if not frames and seq is not None and seq in fwd_frames:
                frames = ["bwd of"] + fwd_frames[seq][-3:]
            key = f"{label} | {op} | " + " < ".join(reversed(frames[-4:]))
            groups[key][0] += k.get("dur", 0.0)
            groups[key][1] += 1
    else:
        for name, dur, frames in leaf_ops:
            if match and not re.search(match, name, re.IGNORECASE):
                continue
            key = f"{name} | " + " < ".join(reversed(frames[-4:]))
            groups[key][0] += dur
            groups[key][1] += 1
    rows = [(k, v[0] / 1e3 / steps, int(v[1] / steps)) for k, v in groups.items()]
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--match", default=None, help="regex on kernel name and operators (e.g. 'copy|cat|fill')")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps in the trace (train.profile_num_steps)")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    opener = gzip.open if a.trace.suffix == ".gz" else open
    with opener(a.trace, "rt") as f:
        trace = json.load(f)
    rows = analyse(trace, a.match, a.steps)
    total = sum(r[1] for r in rows)
    print(f"{'ms/step':>8} {'n/step':>7}  kernel | operator | callers (innermost first); total {total:.2f} ms/step")
    for key, ms, n in rows[: a.top]:
        print(f"{ms:8.2f} {n:7d}  {key}")


if __name__ == "__main__":
    main()
