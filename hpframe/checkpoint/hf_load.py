"""Initial weights from a transformers checkpoint directory (``model.from_hf=DIR``), streamed into shards.

``HFCheckpoint(DIR)`` indexes the safetensors files (one file, or several with
``model.safetensors.index.json``) without reading any tensor. ``check(model)`` compares every tensor
the (meta, unsharded) model needs with what the files hold, by name and shape, and refuses a
checkpoint with missing, unexpected or mis-shaped tensors, listing them. ``load_into(module, prefix,
tp_rank=...)`` then fills one already-sharded module (a block, the embedding, the head) of this rank:
each local tensor is read as the slice of the file's tensor it holds (``safe_open(...).get_slice``):
rows or columns of its tensor-parallel shard (the ``partition_dim`` the TP layers tag), the experts of
its expert-parallel slice (``global_expert_ids``), the stage's blocks only (``parallelize`` calls it for
the parts this rank owns). One file tensor is in memory at a time, so a rank's peak is its own shards
plus one tensor; no rank reads the whole model.

FP8 block-quantized checkpoints (DeepSeek-V3's format: ``float8_e4m3fn`` weights, a ``<name>_scale_inv``
of one fp32 scale per (rows x cols) block, ``quantization_config.weight_block_size``) are dequantized
slice by slice: w = fp8 * scale of its block. FP8 without scales or without a quantization_config,
and any other quantization, are refused. Files are read with safetensors only (no pickle).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpframe.config.hf_config import check_quantization, read_config
from hpframe.errors import UserError
from hpframe.models.hf_adapter import Source, hf_sources

FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
MAX_LISTED = 12


def _listing(what: str, names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED]) + (f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")
    return f"{len(names)} {what}: {shown}"


class HFCheckpoint:
    """Read access to the tensors of a ``save_pretrained`` directory, one slice at a time."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.root = Path(path)
        self.config = read_config(self.root)
        self.block = check_quantization(self.config, str(self.root))
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.root / f for name, f in weight_map.items()}
        else:
            self.files = {}
            for f in sorted(self.root.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as handle:
                    self.files |= {name: f for name in handle.keys()}
        if not self.files:
            raise UserError(f"model.from_hf={self.root}: no *.safetensors files")
        self._handles: dict[Path, Any] = {}
        self.sources: dict[str, Source] = {}
        self.vocab_size = int(self.config.get("vocab_size", 0))

    def _slice(self, name: str) -> Any:
        from safetensors import safe_open

        f = self.files[name]
        if f not in self._handles:
            if not f.is_file():
                raise UserError(f"model.from_hf={self.root}: {f.name} (listed in the index for {name}) is missing")
            self._handles[f] = safe_open(str(f), framework="pt")
        return self._handles[f].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, region: tuple[slice, ...]) -> torch.Tensor:
        """``name[region]`` as fp32 (FP8 dequantized with its block scales); region slices have ends."""
        sl = self._slice(name)
        if sl.get_dtype() not in FP8_DTYPES:
            return sl[region].to(torch.float32)
        assert self.block is not None and len(region) == 2, name  # check() refused the other cases
        (r0, r1), (c0, c1) = ((s.start, s.stop) for s in region)
        b0, b1 = self.block
        scale = self._slice(name + "_scale_inv")[r0 // b0 : -(-r1 // b0), c0 // b1 : -(-c1 // b1)].to(torch.float32)
        scale = scale.repeat_interleave(b0, 0).repeat_interleave(b1, 1)
        scale = scale[r0 - (r0 // b0) * b0 :][: r1 - r0, c0 - (c0 // b1) * b1 :][:, : c1 - c0]
        return sl[region].to(torch.float32) * scale

    # ---- checking the files against the model ----------------------------------------------------

    def _expected(self, model: nn.Module) -> dict[str, tuple[int, ...]]:
        """HF name -> shape, for every tensor the model reads (from its full, possibly meta, state dict)."""
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        out: dict[str, tuple[int, ...]] = {}
        for ours, src in self.sources.items():
            full = shapes[ours]
            if src.kind == "direct":
                out[src.names[0][0]] = full
            elif src.kind == "vocab":
                out[src.names[0][0]] = (model.vocab_size, *full[1:])
            elif src.kind == "w13":
                out |= {n: (full[1] // 2, full[2]) for n in src.hf_names()}
            elif src.kind == "w2":
                out |= {n: full[1:] for n in src.hf_names()}
        return out

    def _ignored(self, name: str, expected: dict[str, tuple[int, ...]], num_layers: int) -> bool:
        """Tensors a checkpoint may hold beyond the model: FP8 scales (read with their weight),
        DeepSeek's multi-token-prediction layers past num_layers, rotary caches."""
        if name.endswith("_scale_inv") and name[: -len("_scale_inv")] in expected:
            return True
        m = _LAYER.match(name)
        extra_layers = int(self.config.get("num_nextn_predict_layers", self.config.get("num_mtp_layers", 0)) or 0)
        if m and num_layers <= int(m.group(1)) < num_layers + extra_layers:
            return True
        return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and "lm_head.weight" not in expected)

    def check(self, model: nn.Module) -> None:
        """ValueError listing every missing, unexpected, mis-shaped or unscaled-FP8 tensor of the files
        for ``model`` (an unsharded Transformer, on the meta device or not)."""
        self.sources = hf_sources(model.model_cfg, model.moe_cfg)
        if model.model_cfg.vocab_size != self.vocab_size:
            raise UserError(f"model.vocab_size={model.model_cfg.vocab_size} but {self.root}/config.json has {self.vocab_size}")
        expected = self._expected(model)
        num_layers = model.model_cfg.num_layers
        missing = sorted(n for n in expected if n not in self.files)
        unexpected = sorted(n for n in self.files if n not in expected and not self._ignored(n, expected, num_layers))
        misshaped, unscaled = [], []
        for n in sorted(set(expected) & set(self.files)):
            sl = self._slice(n)
            if tuple(sl.get_shape()) != expected[n]:
                misshaped.append(f"{n} {list(sl.get_shape())} (expected {list(expected[n])})")
            if sl.get_dtype() in FP8_DTYPES and (self.block is None or n + "_scale_inv" not in self.files):
                unscaled.append(n)
        problems = [_listing(w, ns) for w, ns in (("missing", missing), ("unexpected", unexpected),
                                                  ("mis-shaped", misshaped)) if ns]
        if unscaled:
            problems.append(_listing("FP8 tensors without a weight_scale_inv or without quantization_config "
                                     "(refused: they would load as garbage)", unscaled))
        if problems:
            raise UserError(f"model.from_hf={self.root} does not match the model of its config.json: " + "; ".join(problems))

    # ---- loading shards ----------------------------------------------------------------------------

    def _fill(self, ours: str, region: list[slice], dest: torch.Tensor) -> None:
        """Copy ``ours[region]`` (hpframe full name, regions of the full tensor) into ``dest``, one file
        tensor (slice) at a time: stacked experts are written expert by expert, never stacked in memory."""
        src = self.sources[ours]

        def put(d: torch.Tensor, value: torch.Tensor) -> None:  # copy_ would broadcast a wrong shape silently
            assert d.shape == value.shape, (ours, tuple(d.shape), tuple(value.shape))
            d.copy_(value)

        if src.kind == "zeros":
            dest.zero_()
        elif src.kind == "direct":
            put(dest, self.read(src.names[0][0], tuple(region)))
        elif src.kind == "vocab":  # rows past the file's vocabulary are padding: zero
            rows, v = region[0], self.vocab_size
            real = max(0, min(rows.stop, v) - rows.start)
            if real:
                put(dest[:real], self.read(src.names[0][0], (slice(rows.start, rows.start + real), *region[1:])))
            dest[real:].zero_()
        else:
            rest = tuple(region[1:])
            for j, e in enumerate(range(region[0].start, region[0].stop)):
                if src.kind == "w2":
                    put(dest[j], self.read(src.names[e][0], rest))
                    continue
                assert rest[0] == slice(0, dest.shape[1]), "expert weights are never split by tensor parallelism"
                f = dest.shape[1] // 2  # w13 rows: gate (w1), then up (w3)
                put(dest[j, :f], self.read(src.names[e][0], (slice(0, f), rest[1])))
                put(dest[j, f:], self.read(src.names[e][1], (slice(0, f), rest[1])))

    @torch.no_grad()
    def load_into(self, module: nn.Module, prefix: str, *, tp_rank: int) -> None:
        """Fill every persistent tensor of ``module`` (materialized, possibly TP/EP-sharded; its full
        name is ``prefix``) from the files, then recompute its non-persistent tables."""
        from hpframe.models.layers import RotaryEmbedding
        from hpframe.models.moe import Router

        for sub_name, sub in module.named_modules():
            base = ".".join(p for p in (prefix, sub_name) if p)
            ids = getattr(sub, "global_expert_ids", None)  # an expert-parallel slice of the experts
            own = [*sub.named_parameters(recurse=False),
                   *((n, b) for n, b in sub.named_buffers(recurse=False) if n not in sub._non_persistent_buffers_set)]
            for name, t in own:
                region = [slice(0, n) for n in t.shape]
                if getattr(t, "tensor_model_parallel", False):
                    d, n = t.partition_dim, t.shape[t.partition_dim]
                    region[d] = slice(tp_rank * n, (tp_rank + 1) * n)
                if ids is not None:
                    region[0] = slice(ids.start, ids.stop)
                assert [r.stop - r.start for r in region] == list(t.shape), (f"{base}.{name}", region, t.shape)
                self._fill(f"{base}.{name}", region, t)
            if isinstance(sub, RotaryEmbedding):
                sub.reset_tables()
            elif isinstance(sub, Router):
                sub.load_accum.zero_()

    def close(self) -> None:
        self._handles.clear()
