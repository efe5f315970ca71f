"""The portable checkpoint format without processes: pieces written by hand-built rank parts read back.

Compared: logical tensors assembled from expert row ranges of two files (and any sub-range of them)
with the tensors written; the compatibility check's error text with the missing, unexpected and
mis-shaped names; RNG draws after a JSON round trip of the RNG states with the draws before it; the
safetensors files hold no pickle (their header is JSON and loading them never unpickles).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from hpframe.checkpoint import store
from hpframe.checkpoint.portable import (
    Piece,
    PortableCheckpoint,
    RankPart,
    parts_written,
    rng_state_json,
    set_rng_state_json,
    tensor_file,
    write_part,
)

E, F, H = 4, 3, 2


@pytest.fixture
def saved(tmp_path):
    """Two ranks: rank 0 the dense tensors and experts [0, 2), rank 1 experts [2, 4)."""
    g = torch.Generator().manual_seed(0)
    experts = torch.randn(E, F, H, generator=g)
    moment = torch.rand(E, F, H, generator=g)
    dense = torch.randn(5, H, generator=g)
    bias = torch.tensor([0.1, -0.2, 0.0, 0.3])
    r0 = RankPart(rank=0, coords={"tp": 0, "pp": 0, "dp": 0, "ep": 0, "edp": 0}, adam_step={"embed.weight": 3.0, "w": 3.0})
    r0.pieces = [Piece("embed.weight", "param", dense, (5, H)), Piece("bias", "param", bias, (E,)),
                 Piece("w", "param", experts[:2], (E, F, H), (0, 2)), Piece("w", "exp_avg", moment[:2], (E, F, H), (0, 2))]
    r1 = RankPart(rank=1, coords={"tp": 0, "pp": 0, "dp": 1, "ep": 1, "edp": 0}, adam_step={"w": 3.0})
    r1.pieces = [Piece("w", "param", experts[2:], (E, F, H), (2, 4)), Piece("w", "exp_avg", moment[2:], (E, F, H), (2, 4))]
    write_part(tmp_path, r0)
    write_part(tmp_path, r1)
    store.write_manifest(tmp_path, step=3)
    return tmp_path, {"embed.weight": dense, "bias": bias, "w": experts, "w.exp_avg": moment}


def test_pieces_assemble_into_logical_tensors(saved):
    path, ref = saved
    assert parts_written(path) == {0, 1}
    ck = PortableCheckpoint(path)
    assert ck.names() == {"embed.weight", "bias", "w"}
    assert torch.equal(ck.read("embed.weight"), ref["embed.weight"])
    assert torch.equal(ck.read("w"), ref["w"])
    assert torch.equal(ck.read("w", "exp_avg"), ref["w.exp_avg"])
    # an ep=4 reader of expert 1 and an ep=1-of-3 style range crossing both files
    assert torch.equal(ck.read("w", rows=(1, 2)), ref["w"][1:2])
    assert torch.equal(ck.read("w", rows=(1, 4)), ref["w"][1:4])
    assert torch.equal(ck.read("embed.weight", rows=(2, 4)), ref["embed.weight"][2:4])
    assert ck.adam_step == {"embed.weight": 3.0, "w": 3.0}
    assert ck.saved_coords[1]["ep"] == 1


def test_split_gate_and_up_of_an_older_checkpoint_read_as_packed_w13(tmp_path):
    """Checkpoints from before the packed SwiGLU layout store experts.w1 and experts.w3 [E, F, H], split
    by expert rows over two ranks; they read as experts.w13 [E, 2F, H] (gate rows, then up rows), whole
    or by expert rows, moments too, and fit a model that expects w13. A GELU w1 (no w3) stays w1."""
    g = torch.Generator().manual_seed(1)
    w1, w3, m1, m3 = (torch.randn(E, F, H, generator=g) for _ in range(4))
    gelu = torch.randn(E, F, H, generator=g)
    names = ("layers.1.mlp.experts.w1", "layers.1.mlp.experts.w3")
    for rank, (lo, hi) in enumerate(((0, 2), (2, 4))):
        part = RankPart(rank=rank, coords={"tp": 0, "pp": 0, "dp": rank, "ep": rank, "edp": 0},
                        adam_step={n: 7.0 for n in names})
        for name, p, m in zip(names, (w1, w3), (m1, m3)):
            part.pieces += [Piece(name, "param", p[lo:hi], (E, F, H), (lo, hi)),
                            Piece(name, "exp_avg", m[lo:hi], (E, F, H), (lo, hi))]
        part.pieces.append(Piece("layers.2.mlp.experts.w1", "param", gelu[lo:hi], (E, F, H), (lo, hi)))
        write_part(tmp_path, part)
    store.write_manifest(tmp_path, step=7)
    ck = PortableCheckpoint(tmp_path)
    w13 = "layers.1.mlp.experts.w13"
    assert ck.names() == {w13, "layers.2.mlp.experts.w1"}
    assert torch.equal(ck.read(w13), torch.cat([w1, w3], dim=1))
    assert torch.equal(ck.read(w13, "exp_avg", rows=(1, 3)), torch.cat([m1, m3], dim=1)[1:3])
    assert torch.equal(ck.read("layers.2.mlp.experts.w1"), gelu)
    assert ck.adam_step[w13] == 7.0
    ck.check_compatible({w13: (E, 2 * F, H), "layers.2.mlp.experts.w1": (E, F, H)})


def test_layout_json_records_expert_rows(saved):
    path, _ = saved
    doc = json.loads((path / "layout" / "rank00001.json").read_text())
    assert doc["expert_rows"] == [[2, 4]] and doc["coords"]["ep"] == 1
    assert doc["tensors"]["param/w@2-4"] == {"name": "w", "kind": "param", "shape": [E, F, H], "rows": [2, 4], "dtype": "float32",
                                             "box": {"offset": [2, 0, 0], "size": [2, F, H]}, "flat": None}


def _fragments(x: torch.Tensor, count: int) -> list[tuple[int, int]]:
    n = x.numel()
    return [(i * n // count, (i + 1) * n // count) for i in range(count)]


def test_every_rank_writes_its_fragments(tmp_path):
    """Version 2 as written by every rank: a [6, 4] weight split in two TP chunks along dim 1, each chunk's
    flattening split over 3 data-parallel ranks (ZeRO partitions); expert rows [0, 2) and [2, 4) each split
    over 2 ranks. Whole tensors and any row range read back exactly; with one fragment's rank missing,
    rows that need it name the box and the uncovered elements, while rows outside it still read."""
    g = torch.Generator().manual_seed(2)
    w, experts = torch.randn(6, 4, generator=g), torch.randn(E, F, H, generator=g)
    parts: dict[int, RankPart] = {}

    def add(rank: int, piece: Piece) -> None:
        parts.setdefault(rank, RankPart(rank=rank, coords={"dp": rank})).pieces.append(piece)

    for tp, chunk in enumerate(w.chunk(2, dim=1)):
        for dp, (lo, hi) in enumerate(_fragments(chunk, 3)):
            add(3 * tp + dp, Piece("w", "param", chunk.flatten()[lo:hi].clone(), (6, 4), tp=(1, tp, 2), flat=(lo, hi)))
    for ep, (a, b) in enumerate(((0, 2), (2, 4))):
        rows = experts[a:b]
        for edp, (lo, hi) in enumerate(_fragments(rows, 2)):
            add(2 * ep + edp, Piece("x", "param", rows.flatten()[lo:hi].clone(), (E, F, H), rows=(a, b), flat=(lo, hi)))
    for part in parts.values():
        write_part(tmp_path, part)
    store.write_manifest(tmp_path, step=1)
    ck = PortableCheckpoint(tmp_path)
    assert torch.equal(ck.read("w"), w) and torch.equal(ck.read("x"), experts)
    assert torch.equal(ck.read("w", rows=(1, 5)), w[1:5]) and torch.equal(ck.read("x", rows=(1, 3)), experts[1:3])
    # rank 4 (TP chunk 1, fragment 1 of 3 = elements [4, 8) of the chunk = its rows 2-3) lost
    (tmp_path / "layout" / "rank00004.json").unlink()
    store.write_manifest(tmp_path, step=1)
    ck = PortableCheckpoint(tmp_path)
    assert torch.equal(ck.read("w", rows=(0, 2)), w[:2])
    with pytest.raises(ValueError, match=r"param w: the fragments of box offset \[0, 2\] size \[6, 2\] cover 8 of elements \[0, 12\)"):
        ck.read("w")


def test_a_version_1_checkpoint_still_loads(tmp_path):
    """A checkpoint written before every rank wrote (format version 1): dp-rank 0 wrote whole tensors and
    expert rows, layout entries without ``box``/``flat``. The files below are what that writer produced."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    dense, experts = torch.randn(5, H, generator=g), torch.randn(E, F, H, generator=g)
    for rank, (a, b) in enumerate(((0, 2), (2, 4))):
        tensors = {f"param/w@{a}-{b}": experts[a:b].clone()}
        entries = {f"param/w@{a}-{b}": {"name": "w", "kind": "param", "shape": [E, F, H], "rows": [a, b], "dtype": "float32"}}
        if rank == 0:
            tensors["param/embed.weight"] = dense
            entries["param/embed.weight"] = {"name": "embed.weight", "kind": "param", "shape": [5, H], "rows": None, "dtype": "float32"}
        (tmp_path / "tensors").mkdir(exist_ok=True)
        (tmp_path / "layout").mkdir(exist_ok=True)
        save_file(tensors, str(tmp_path / tensor_file(rank)), metadata={"format": "hpframe-portable", "version": "1"})
        (tmp_path / "layout" / f"rank{rank:05d}.json").write_text(json.dumps({
            "version": 1, "rank": rank, "coords": {"dp": rank}, "file": tensor_file(rank), "tensors": entries,
            "expert_rows": [[a, b]], "adam_step": {}}))
    store.write_manifest(tmp_path, step=2)
    ck = PortableCheckpoint(tmp_path)
    assert torch.equal(ck.read("embed.weight"), dense) and torch.equal(ck.read("w"), experts)
    assert torch.equal(ck.read("w", rows=(1, 3)), experts[1:3])


def test_missing_rows_are_an_error(saved):
    path, _ = saved
    (path / "layout" / "rank00001.json").unlink()
    store.write_manifest(path, step=3)  # a checkpoint committed without rank 1's part
    ck = PortableCheckpoint(path)
    with pytest.raises(ValueError, match=r"param w rows \[0, 4\) are not all stored"):
        ck.read("w")


def test_incompatible_model_names_every_tensor(saved):
    path, _ = saved
    ck = PortableCheckpoint(path)
    ck.check_compatible({"embed.weight": (5, H), "bias": (E,), "w": (E, F, H)})  # the saved model: fine
    with pytest.raises(ValueError) as err:
        ck.check_compatible({"embed.weight": (6, H), "w": (E, F, H), "head.weight": (5, H)})
    text = str(err.value)
    assert "missing: head.weight" in text
    assert "unexpected: bias" in text
    assert "shape mismatch: embed.weight: checkpoint [5, 2] vs model [6, 2]" in text


def test_not_a_portable_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no MANIFEST.json"):
        PortableCheckpoint(tmp_path)
    store.write_manifest(tmp_path, step=0)
    with pytest.raises(ValueError, match="no layout/rank"):
        PortableCheckpoint(tmp_path)


def test_files_outside_the_manifest_are_refused(saved, tmp_path_factory):
    """An extra rank part (layout JSON + tensors overriding ``embed.weight`` and expert rows) injected into
    a committed checkpoint is never merged into the index: loading names the unlisted file instead. A
    listed file that goes missing is named too; the untouched checkpoint still reads as saved."""
    path, ref = saved
    assert torch.equal(PortableCheckpoint(path).read("w"), ref["w"])
    evil = RankPart(rank=7, coords={"tp": 0, "pp": 0, "dp": 7, "ep": 0, "edp": 0})
    evil.pieces = [Piece("embed.weight", "param", torch.zeros(5, H), (5, H)), Piece("w", "param", torch.zeros(2, F, H), (E, F, H), (0, 2))]
    other = tmp_path_factory.mktemp("evil")
    write_part(other, evil)
    for rel in ("layout/rank00007.json", tensor_file(7)):
        (path / rel).write_bytes((other / rel).read_bytes())
        with pytest.raises(ValueError, match=rf"{path / rel}: not listed in {path / 'MANIFEST.json'}"):
            PortableCheckpoint(path)
        (path / rel).unlink()
    assert torch.equal(PortableCheckpoint(path).read("embed.weight"), ref["embed.weight"])
    (path / tensor_file(1)).unlink()
    with pytest.raises(ValueError, match=rf"{path / tensor_file(1)}: listed in the manifest but missing"):
        PortableCheckpoint(path)


def test_safetensors_header_is_json_not_pickle(saved):
    path, _ = saved
    raw = (path / tensor_file(0)).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    assert header["__metadata__"]["format"] == "hpframe-portable"
    assert b"\x80\x04" not in raw[:8 + header_len]  # no pickle protocol marker in the header


def test_rng_json_round_trip():
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    state = json.loads(json.dumps(rng_state_json()))
    before = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    set_rng_state_json(state)
    after = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(before[0], after[0])
    assert np.array_equal(before[1], after[1])
    assert before[2] == after[2]
