"""The fast tier: snapshots of every rank's shard in host memory, replicated to other nodes (GEMINI-style).

``checkpoint.memory_interval=N`` (0 = off): every N steps ``MemoryTier.snapshot`` copies this rank's
own shard of the training state (``reshard.capture``: its ZeRO partition, TP chunk and expert rows of
the fp32 weights and Adam moments, with the router biases; its RNG states; the loop's client state:
step, consumed tokens, data-loader position) to host memory, and returns (the training stall). A
background thread then writes it as files under the node's shared memory, which outlives the worker
processes::

    {checkpoint.memory_dir}/hpframe-{job}/node{NNN}/step_{step:08d}/
        tensors/rankR.safetensors  layout/rankR.json  rng/rankR.json  client/rankR.json   a part
        commit/rankR.json          the part's commit record: step, fingerprint, file sizes (last)

(``job`` hashes the checkpoint root, so a restarted job finds its snapshots; the fingerprint is the
plan's joined with every rank's ``own_restore.shard_digest``: a snapshot serves the same shard layout
only), and sends the same bytes
to ``checkpoint.memory_replicas`` peers: the rank of the same local index on each of the next nodes
(ring order), which keep them in their node's directory. A part is thus on ``1 + replicas`` distinct
nodes: losing any ``replicas`` nodes loses no part. Only the rank's own shard travels (point-to-point
on a gloo group of the tier's own, from the background thread): no gather. At most one snapshot is in
flight (the next one waits for it). Each node keeps the newest two steps (the one being written and
the last complete one).

Recovery (``find`` then ``load``, collective, before training): the ranks exchange which complete
parts their nodes hold; the newest step whose parts, of every rank, with this fingerprint, are held
somewhere is taken. ``tier`` = ``memory`` when every rank's own part was on its own node, ``peer``
when some came from a replica (a node lost its memory). A rank whose node lacks its own part receives
that part, and only it, from the rank of the same local index on the lowest node holding a replica
(``recovery_moves``), and keeps it in its node's directory; then every rank restores from its own part
alone (``own_restore.restore_own``: the snapshot's layout is this plan's, so the rest of its state comes
from its peers' parts through its tp, dp and embedding groups, as a ZeRO step's all-gather brings the
weights) and gets its own RNG states and client state back. A node that lost its memory thus receives
its own ranks' parts (``gpus_per_node`` of the job's ``W``), and a node that kept it receives nothing.
``MemoryTier.received`` says what this rank received. A node that lost its memory also lost the
replicas it kept for other nodes: after the restore, a background transfer (``replica_gaps``) sends
each such part from its own rank to the replica targets lacking it, so the recovered snapshot is again
on ``1 + replicas`` nodes before training goes far (the next snapshot waits for it), and a second node
loss right after a recovery still finds it (``MemoryTier.rereplicated``: what this rank received).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpframe.checkpoint import own_restore, reshard, store
from hpframe.checkpoint.portable import (RankPart, layout_doc, layout_file, rng_file, rng_state_json, set_rng_state_json,
                                         save_tensors, tensor_file)
from hpframe.errors import UserError
from hpframe.logging import get_logger

log = get_logger(__name__)


def job_dir(memory_dir: str | Path, ckpt_root: str | Path) -> Path:
    """The job's directory in host memory: named by a hash of the (absolute) checkpoint root."""
    key = hashlib.sha256(str(Path(ckpt_root).resolve()).encode()).hexdigest()[:12]
    return Path(memory_dir) / f"hpframe-{key}"


def node_dir(job: Path, node: int) -> Path:
    return job / f"node{node:03d}"


def step_dir(node: Path, step: int) -> Path:
    return node / store.tag_for_step(step)


def client_file(rank: int) -> str:
    return f"client/rank{rank:05d}.json"


def commit_file(rank: int) -> str:
    return f"commit/rank{rank:05d}.json"


def replica_targets(rank: int, gpus_per_node: int, num_nodes: int, replicas: int) -> list[int]:
    """Ranks that keep a replica of ``rank``'s part: same local index, on each of the next ``replicas``
    nodes in ring order (distinct nodes, none its own)."""
    node, local = divmod(rank, gpus_per_node)
    return [((node + j) % num_nodes) * gpus_per_node + local for j in range(1, min(replicas, num_nodes - 1) + 1)]


# ---- a part as files and bytes: what is written to memory and sent to peers -----------------------
def write_own_part(directory: Path, part: RankPart, rng: dict, client_state: dict, step: int, fingerprint: str) -> None:
    """Write this rank's part of ``step`` into ``directory``: the tensors straight from the host
    buffers into their file (``portable.save_tensors``), the layout, RNG and client JSON, then the
    commit record last."""
    r = part.rank
    tpath = directory / tensor_file(r)
    tpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = tpath.with_name(tpath.name + ".tmp")
    save_tensors(part, tmp)
    os.replace(tmp, tpath)
    small = {
        layout_file(r): json.dumps(layout_doc(part), sort_keys=True).encode(),
        rng_file(r): json.dumps(rng).encode(),
        client_file(r): json.dumps(client_state, sort_keys=True, default=str).encode(),
    }
    write_files(directory, r, step, fingerprint, small, written={tensor_file(r): tpath.stat().st_size})


def unpack(t: torch.Tensor) -> dict[str, memoryview]:
    """What ``pack_part`` packed, as views of ``t``'s memory (no copy)."""
    view = memoryview(t.numpy())
    n = int.from_bytes(view[:8], "little")
    sizes = json.loads(bytes(view[8:8 + n]))
    out, pos = {}, 8 + n
    for rel, size in sizes.items():
        out[rel] = view[pos:pos + size]
        pos += size
    return out


def write_files(directory: Path, rank: int, step: int, fingerprint: str, files: dict[str, Any],
                written: dict[str, int] | None = None) -> None:
    """Write one part's files (each via a temporary name), then its commit record last; ``written``
    ({path: size}): files of the part already in place, listed in the record too."""
    for rel, data in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    sizes = {**(written or {}), **{k: len(v) for k, v in files.items()}}
    record = {"step": step, "rank": rank, "fingerprint": fingerprint, "files": sizes}
    path = directory / commit_file(rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, sort_keys=True))
    os.replace(tmp, path)


def complete_parts(node: Path, fingerprint: str) -> dict[int, list[int]]:
    """{step: ranks} whose parts in this node's memory are complete (commit record, every file of the
    recorded size) and of this fingerprint."""
    out: dict[int, list[int]] = {}
    if not node.is_dir():
        return out
    for d in node.iterdir():
        step = store.step_of_tag(d.name)
        if step is None or not (d / "commit").is_dir():
            continue
        for rec_path in sorted((d / "commit").glob("rank*.json")):
            try:
                rec = json.loads(rec_path.read_text())
                ok = rec["step"] == step and rec["fingerprint"] == fingerprint and all(
                    (d / rel).is_file() and (d / rel).stat().st_size == size for rel, size in rec["files"].items())
            except (OSError, ValueError, KeyError, TypeError):
                ok = False
            if ok:
                out.setdefault(step, []).append(int(rec["rank"]))
    return out


def pack_part(directory: Path, rank: int) -> torch.Tensor:
    """``rank``'s part in ``directory`` (the files its commit record lists) as one uint8 tensor, what
    travels to peers: 8-byte header length, JSON header {path: size}, the files in order, each read
    straight into the tensor (one copy)."""
    sizes = json.loads((directory / commit_file(rank)).read_text())["files"]
    header = json.dumps(sizes).encode()
    out = torch.empty(8 + len(header) + sum(sizes.values()), dtype=torch.uint8)
    view = memoryview(out.numpy())
    view[:8] = len(header).to_bytes(8, "little")
    view[8:8 + len(header)] = header
    pos = 8 + len(header)
    for rel, size in sizes.items():
        with open(directory / rel, "rb") as f:
            if f.readinto(view[pos:pos + size]) != size:
                raise OSError(f"{directory / rel}: shorter than the {size} bytes its commit record lists")
        pos += size
    return out


@dataclass(frozen=True)
class Found:
    """A complete snapshot: its step, the tier it counts as, and which nodes hold each rank's part."""

    step: int
    tier: str  # "memory" | "peer"
    holders: dict[int, list[int]]


@dataclass(frozen=True)
class Received:
    """What recovery sent this rank from a replica: the parts (their ranks) and the bytes (packed files)."""

    parts: tuple[int, ...]
    bytes: int


def _ranks_text(ranks: list[int], shown: int = 16) -> str:
    return ", ".join(map(str, ranks[:shown])) + (f", ... ({len(ranks)} in all)" if len(ranks) > shown else "")


def recovery_moves(holders: dict[int, list[int]], gpus_per_node: int, world: int) -> dict[int, int]:
    """{rank: source rank} for every rank whose own node does not hold its part: the source is the
    rank of the same local index on the lowest node holding it (any rank of a node reads the node's
    directory; replicas sit at the same local index, so the sources spread over a node's ranks)."""
    moves = {}
    for r, nodes in sorted(holders.items()):
        if r // gpus_per_node not in nodes:
            src = min(nodes) * gpus_per_node + r % gpus_per_node
            moves[r] = src if src < world else min(nodes) * gpus_per_node
    return moves


def replica_gaps(holders: dict[int, list[int]], gpus_per_node: int, num_nodes: int, replicas: int) -> dict[int, list[int]]:
    """{rank: [replica target ranks whose node lacks that rank's part]}: after a recovery, the replicas a
    wiped node held for others (and its own parts' replicas, where those were lost too) are missing
    until they are sent again."""
    gaps = {}
    for r, nodes in sorted(holders.items()):
        missing = [t for t in replica_targets(r, gpus_per_node, num_nodes, replicas) if t // gpus_per_node not in nodes]
        if missing:
            gaps[r] = missing
    return gaps


@dataclass
class SnapshotStats:
    step: int
    stall_s: float
    waited_s: float


class MemoryTier:
    """One per process; every rank constructs it (a collective: it creates a gloo group)."""

    def __init__(self, engine: Any, *, memory_dir: str | Path, ckpt_root: str | Path, replicas: int, fingerprint: str,
                 timeout_s: float) -> None:
        self.engine, self.timeout_s = engine, timeout_s
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        ranks = engine.plan.ranks
        self.gpn, self.num_nodes = min(ranks.gpus_per_node, self.world), ranks.num_nodes
        self.node = self.rank // self.gpn
        self.job = job_dir(memory_dir, ckpt_root)
        self.dir = node_dir(self.job, self.node)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"checkpoint.memory_dir={str(memory_dir)!r}: cannot create {self.dir} ({err}); point it at "
                            f"a writable shared-memory file system or set checkpoint.memory_interval=0",
                            key="checkpoint.memory_dir", values={"checkpoint.memory_dir": str(memory_dir)}) from err
        self.targets = replica_targets(self.rank, self.gpn, self.num_nodes, replicas)
        self.sources = [r for r in range(self.world) if self.rank in replica_targets(r, self.gpn, self.num_nodes, replicas)]
        if replicas > 0 and not self.targets:
            log.warning(f"checkpoint.memory_replicas={replicas}: one node ({self.num_nodes} in all), no peer to replicate to; "
                        f"a lost node loses the fast tier's snapshots")
        self.group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
                      if self.world > 1 else None)
        # recovery restores each rank from its own part: a snapshot qualifies only where every rank's
        # shards are laid out as now (coordinates, ZeRO partitions), which the plan fingerprint does
        # not fix alone (parallel.axis_order, the library's partitioning): the digests join it
        digests: list[Any] = [own_restore.shard_digest(engine)]
        if self.group is not None:
            digests = [None] * self.world
            dist.all_gather_object(digests, own_restore.shard_digest(engine), group=self.group)
        self.fingerprint = hashlib.sha256(f"{fingerprint}:{','.join(digests)}".encode()).hexdigest()[:16]
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.received: Received | None = None  # set by load: this rank's share of the recovery traffic
        self.replicas = replicas
        self.rereplicated: Received | None = None  # set by load's background re-replication: the replicas received

    # ---- taking snapshots ---------------------------------------------------------------------------
    def snapshot(self, step: int, client_state: dict[str, Any], part: RankPart | None = None,
                 rng: dict | None = None) -> tuple[SnapshotStats, RankPart, dict]:
        """Copy this rank's shard to host memory (the stall) and hand it to the background thread;
        returns the stats and the captured part and RNG states (a storage save of the same step reuses them)."""
        t0 = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - t0
        part = part if part is not None else reshard.capture(self.engine)
        rng = rng if rng is not None else rng_state_json()
        self._thread = threading.Thread(target=self._run, args=(step, part, rng, dict(client_state)),
                                        name=f"hpframe-memory-{step}", daemon=True)
        self._thread.start()
        return SnapshotStats(step, time.perf_counter() - t0, waited), part, rng

    def wait(self) -> None:
        """Block (bounded) until the snapshot in flight is in memory here and at its peers; re-raise its error."""
        if self._thread is not None:
            self._thread.join(2 * self.timeout_s)
            if self._thread.is_alive():
                self._error = self._error or store.CheckpointError(
                    f"rank {self.rank}: the memory snapshot did not finish within 2 x {self.timeout_s:.0f} s "
                    f"(checkpoint.save_timeout_s); a peer died or stalls")
            self._thread = None
        err, self._error = self._error, None
        if err is not None:
            raise err

    def _run(self, step: int, part: RankPart, rng: dict, client_state: dict) -> None:
        try:
            here = step_dir(self.dir, step)
            write_own_part(here, part, rng, client_state, step, self.fingerprint)
            blob = pack_part(here, self.rank) if self.targets else torch.empty(0, dtype=torch.uint8)
            for src, got in self._exchange(blob, self.targets, self.sources).items():
                write_files(here, src, step, self.fingerprint, unpack(got))
            self._prune(keep_from=step)
        except BaseException as err:  # surfaced by the next snapshot or wait() on the training thread
            log.error(f"memory snapshot of step {step} failed: {err}", all_ranks=True)
            self._error = err

    def _exchange(self, blob: torch.Tensor, targets: list[int], sources: list[int]) -> dict[int, torch.Tensor]:
        """Send ``blob`` to every rank of ``targets``, receive a part from every rank of ``sources``
        (sizes first, then the bytes; all transfers at once)."""
        if self.group is None or (not targets and not sources):
            return {}
        sizes = {s: torch.zeros(1, dtype=torch.int64) for s in sources}
        works = [dist.isend(torch.tensor([blob.numel()], dtype=torch.int64), t, group=self.group) for t in targets]
        works += [dist.irecv(sizes[s], s, group=self.group) for s in sources]
        for w in works:
            w.wait()
        got = {s: torch.empty(int(sizes[s].item()), dtype=torch.uint8) for s in sources}
        works = [dist.isend(blob, t, group=self.group) for t in targets]
        works += [dist.irecv(got[s], s, group=self.group) for s in sources]
        for w in works:
            w.wait()
        return got

    def _prune(self, keep_from: int) -> None:
        """Remove this node's snapshots older than the previous complete one (keep the newest two steps)."""
        steps = sorted(s for s in (store.step_of_tag(d.name) for d in self.dir.iterdir()) if s is not None)
        older = [s for s in steps if s < keep_from]
        for s in older[:-1]:
            shutil.rmtree(step_dir(self.dir, s), ignore_errors=True)

    def close(self, *, remove: bool) -> None:
        """Finish the snapshot in flight; with ``remove`` (the run ended and its last save is on storage),
        free this node's host memory."""
        self.wait()
        if remove:
            self.clear()
            if self.rank == 0 and self.job.is_dir() and not any(self.job.iterdir()):
                self.job.rmdir()

    def clear(self) -> None:
        """Forget this job's snapshots on every node (collective): the run did not resume from them
        (``checkpoint.resume=none``, a path, or storage was newer), so they belong to another line of
        training, which a later restart must not pick up."""
        if self.group is not None:
            dist.barrier(group=self.group)
        if self.rank % self.gpn == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self.group is not None:
            dist.barrier(group=self.group)

    # ---- recovery -----------------------------------------------------------------------------------
    def find(self) -> Found | None:
        """The newest snapshot every rank's part of which some node holds (collective), or None."""
        mine = complete_parts(self.dir, self.fingerprint)
        everyone: list[Any] = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(everyone, (self.node, mine), group=self.group)
        else:
            everyone = [(self.node, mine)]
        holders_by_step: dict[int, dict[int, set[int]]] = {}
        for node, parts in everyone:
            for step, ranks in parts.items():
                for r in ranks:
                    holders_by_step.setdefault(int(step), {}).setdefault(r, set()).add(node)
        full = [s for s, h in holders_by_step.items() if len(h) == self.world]
        if not full:
            return None
        step = max(full)
        holders = {r: sorted(n) for r, n in holders_by_step[step].items()}
        own = all((r // self.gpn) in holders[r] for r in range(self.world))
        return Found(step=step, tier="memory" if own else "peer", holders=holders)

    def load(self, found: Found) -> dict[str, Any]:
        """Restore this rank from snapshot ``found`` (collective): a rank whose node lacks its own part
        receives it first, from a node holding a replica; every rank then restores from its own part."""
        from safetensors.torch import load_file

        here = step_dir(self.dir, found.step)
        moves = recovery_moves(found.holders, self.gpn, self.world)
        received = self._move_parts(here, found.step, moves)
        # (a part that was sent is read only by its own rank, which wrote it)
        own_restore.restore_own(self.engine, json.loads((here / layout_file(self.rank)).read_text()),
                                load_file(str(here / tensor_file(self.rank))))
        set_rng_state_json(json.loads((here / rng_file(self.rank)).read_text()))
        client_state = json.loads((here / client_file(self.rank)).read_text())
        ds = getattr(self.engine, "ds", None)
        if ds is not None:  # DeepSpeed's own counters, as manager.load sets them
            ds.global_steps = found.step
            ds.global_samples = found.step * self.engine.plan.global_batch_size
        self.received = received
        gaps = replica_gaps(found.holders, self.gpn, self.num_nodes, self.replicas)
        if gaps:  # a node lost its memory: it also lost the replicas it held for others; send them again
            self._thread = threading.Thread(target=self._rereplicate, args=(here, found.step, gaps),
                                            name=f"hpframe-rereplicate-{found.step}", daemon=True)
            self._thread.start()
        return client_state

    def _rereplicate(self, here: Path, step: int, gaps: dict[int, list[int]]) -> None:
        """Background, after a recovery: every rank whose part is missing at one of its replica targets
        sends it there (from its own node, which holds it again), so the recovered snapshot has its full
        ``1 + replicas`` copies at once instead of at the next snapshot; the next snapshot (or ``close``)
        waits for it, as for a snapshot's own transfers."""
        try:
            sources = [r for r, targets in gaps.items() if self.rank in targets]
            targets = gaps.get(self.rank, [])
            blob = pack_part(here, self.rank) if targets else torch.empty(0, dtype=torch.uint8)
            got = self._exchange(blob, targets, sources)
            for src, data in got.items():
                write_files(here, src, step, self.fingerprint, unpack(data))
            self.rereplicated = Received(parts=tuple(sources), bytes=sum(t.numel() for t in got.values()))
            if sources:
                log.info(f"recovery: replicas of rank(s) {_ranks_text(sources)} of step {step} restored on this node "
                         f"({self.rereplicated.bytes / 2**20:.1f} MiB)", all_ranks=True)
        except BaseException as err:  # surfaced by the next snapshot or wait() on the training thread
            log.error(f"re-replicating the snapshot of step {step} after the recovery failed: {err}", all_ranks=True)
            self._error = err

    def _move_parts(self, here: Path, step: int, moves: dict[int, int]) -> Received:
        """Send each part in ``moves`` ({rank: source rank}) from its source to its rank, which writes it
        into its node's directory (sizes first, then the bytes; all transfers at once)."""
        sends = [r for r, src in moves.items() if src == self.rank]
        blobs = {r: pack_part(here, r) for r in sends}
        size = torch.zeros(1, dtype=torch.int64)
        works = [dist.isend(torch.tensor([b.numel()], dtype=torch.int64), r, group=self.group, tag=r)
                 for r, b in blobs.items()]
        if self.rank in moves:
            works.append(dist.irecv(size, moves[self.rank], group=self.group, tag=self.rank))
        for w in works:
            w.wait()
        got = torch.empty(int(size.item()), dtype=torch.uint8)
        works = [dist.isend(b, r, group=self.group, tag=r) for r, b in blobs.items()]
        if self.rank in moves:
            works.append(dist.irecv(got, moves[self.rank], group=self.group, tag=self.rank))
        for w in works:
            w.wait()
        received = Received(parts=(self.rank,) if self.rank in moves else (), bytes=got.numel())
        if received.parts:
            write_files(here, self.rank, step, self.fingerprint, unpack(got))
        if moves:  # every rank knows the moves (from the holders): all join the sum
            total = torch.tensor([received.bytes], dtype=torch.int64)
            dist.all_reduce(total, group=self.group)
            log.info(f"recovery: {len(moves)} part(s) sent from replicas to their own ranks, whose nodes had lost "
                     f"them (ranks {_ranks_text(sorted(moves))}), {int(total.item()) / 2**20:.1f} MiB in all")
        return received
