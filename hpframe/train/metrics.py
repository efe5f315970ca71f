"""Per-step training figures: throughput, MFU, expert balance; written to metrics.jsonl and TensorBoard.

MFU (model FLOPs utilization) = achieved model FLOP/s over the peak of all devices:
``tokens_per_s * flops_per_token / (world_size * peak_tflops * 1e12)``, with ``flops_per_token`` the
planner's training FLOPs per token (forward + backward) and ``peak_tflops`` the per-device peak of
``cluster.peak_tflops``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from hpframe.errors import UserError

STEP_KEYS = (
    "step", "loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "expert_load_cv",
    "dropped_token_frac", "ep_load_imbalance", "skipped", "consumed_tokens", "step_time_s",
)
"""Keys of every step line of metrics.jsonl. Step lines of MoE runs also hold ``expert_load``: each
expert's share of the step's routed assignments, summed over the MoE layers (``expert_shares``); a step
the file already held when the run started (re-run after a resume) also ``rerun: true``.
Other lines: evaluation (``step``, ``eval_loss``, ``eval_ppl`` = exp(eval_loss), ``eval_tokens``) and
checkpoint saves (``step``, ``ckpt_stall_s``: seconds training waited for the save)."""


def mfu(tokens_per_s: float, flops_per_token: float, world_size: int, peak_tflops: float) -> float:
    """Model FLOPs utilization in [0, 1] (see the module docstring)."""
    if world_size <= 0 or peak_tflops <= 0:
        raise ValueError(f"MFU needs world_size > 0 and cluster.peak_tflops > 0, got {world_size} and {peak_tflops}")
    return tokens_per_s * flops_per_token / (world_size * peak_tflops * 1e12)


def load_cv(tokens_per_expert: torch.Tensor) -> float:
    """Coefficient of variation (population std / mean) of per-expert token counts; 0 = perfectly balanced."""
    counts = tokens_per_expert.detach().double().flatten()
    mean = counts.mean()
    if counts.numel() == 0 or mean <= 0:
        return 0.0
    return float(counts.std(unbiased=False) / mean)


def _as_float(value: Any) -> float:
    return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)


def _layers(moe_stats: Any) -> list[Mapping[str, Any]]:
    """Per-layer stats mappings from the shapes an engine step may report (see ``summarize_moe``)."""
    if not moe_stats:
        return []
    if not isinstance(moe_stats, Mapping):
        return list(moe_stats)
    if any(k in moe_stats for k in ("tokens_per_expert", "load_cv", "dropped_frac")):
        return [moe_stats]
    flat = [k for k in moe_stats if "/" in k]
    if flat:  # {"layer3/tokens_per_expert": [...], "layer3/load_cv": x, "max_load_cv": y}
        layers: dict[str, dict[str, Any]] = {}
        for key in flat:
            layer, name = key.split("/", 1)
            layers.setdefault(layer, {})[name] = moe_stats[key]
        return list(layers.values())
    return [v for v in moe_stats.values() if isinstance(v, Mapping)]


def summarize_moe(moe_stats: Any) -> tuple[float, float]:
    """(expert_load_cv, dropped_token_frac) averaged over MoE layers; (0.0, 0.0) for a dense model.

    Accepts None/empty (dense), one stats mapping, a sequence or mapping of per-layer mappings, or
    the engine's flat ``{"layer{i}/tokens_per_expert": ..., "layer{i}/load_cv": ...}``; a layer gives
    ``tokens_per_expert`` or ``load_cv``, and optionally ``dropped_frac``.
    """
    cvs, drops = [], []
    for layer in _layers(moe_stats):
        if "tokens_per_expert" in layer:
            cvs.append(load_cv(torch.as_tensor(layer["tokens_per_expert"])))
        elif "load_cv" in layer:
            cvs.append(_as_float(layer["load_cv"]))
        drops.append(_as_float(layer.get("dropped_frac", 0.0)))
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return mean(cvs), mean(drops)


def expert_shares(moe_stats: Any) -> list[float]:
    """Each expert's share of the routed assignments, summed over the layers reporting
    ``tokens_per_expert`` (sums to 1; ``1/num_experts`` each when balanced); [] for a dense model."""
    counts = [torch.as_tensor(layer["tokens_per_expert"]).detach().double().flatten()
              for layer in _layers(moe_stats) if "tokens_per_expert" in layer]
    if not counts or len({c.numel() for c in counts}) != 1:
        return []
    total = torch.stack(counts).sum(0)
    return [round(float(x), 6) for x in total / total.sum()] if total.sum() > 0 else []


def ep_load_imbalance(tokens_per_expert: Any, ep: int) -> float:
    """Busiest expert-parallel rank's routed assignments over the mean rank's (1.0 = balanced).

    EP rank r holds the contiguous experts [r*E/ep, (r+1)*E/ep); with global counts the figure is the
    imbalance of an EP group's ranks averaged over the edp groups (exact when edp = 1). Under EP every
    rank waits in the all-to-alls for the busiest one, so a step's expert work scales with this figure.
    """
    counts = torch.as_tensor(tokens_per_expert).detach().double().flatten()
    if ep <= 1 or counts.numel() == 0 or counts.numel() % ep:
        return 1.0
    per_rank = counts.view(ep, -1).sum(1)
    mean = per_rank.mean()
    return float(per_rank.max() / mean) if mean > 0 else 1.0


def summarize_ep_imbalance(moe_stats: Any, ep: int) -> float:
    """``ep_load_imbalance`` averaged over the MoE layers reporting ``tokens_per_expert``; 1.0 otherwise."""
    values = [ep_load_imbalance(layer["tokens_per_expert"], ep) for layer in _layers(moe_stats) if "tokens_per_expert" in layer]
    return sum(values) / len(values) if values else 1.0


def dropped_frac(module: torch.nn.Module) -> float:
    """Fraction of routed (token, expert) assignments dropped by capacity in the last forward, mean over MoE layers.

    Read from each MoE layer's ``stats`` (so: this rank's last micro-batch); 0.0 for dense or dropless models.
    """
    from hpframe.models.moe import MoE

    values = [_as_float(m.stats["dropped_frac"]) for m in module.modules() if isinstance(m, MoE) and "dropped_frac" in m.stats]
    return sum(values) / len(values) if values else 0.0


def _clean(value: Any) -> Any:
    """JSON-safe scalar: tensors to floats, non-finite floats to None (strict JSON has no NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def require_wandb() -> Any:
    """The wandb module, or a UserError naming train.wandb when the library is not installed."""
    try:
        import wandb
    except ImportError as err:
        raise UserError("train.wandb=true needs the Weights & Biases library: pip install wandb "
                        "(or set train.wandb=false)", key="train.wandb") from err
    return wandb


def open_wandb(run_dir: Path, *, project: str, mode: str, config: dict[str, Any], name: str) -> Any:
    """A Weights & Biases run writing under ``run_dir/wandb`` (offline mode needs no network)."""
    if mode not in ("online", "offline"):
        raise UserError(f"train.wandb_mode={mode!r} must be online or offline", key="train.wandb_mode")
    wandb = require_wandb()
    return wandb.init(project=project, mode=mode, dir=str(run_dir), config=config, name=name)


class MetricsWriter:
    """Appends one JSON object per step to ``run_dir/metrics.jsonl`` and mirrors scalars to TensorBoard.

    Only the rank that owns it writes (rank 0); other ranks construct it with ``enabled=False``.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 wandb: dict[str, Any] | None = None) -> None:
        """``wandb``: keyword arguments of ``wandb.init`` (project, mode, config, name) to log there too; None = off."""
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if wandb is not None:
            self._wandb = open_wandb(Path(run_dir), **wandb)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, record: Mapping[str, Any], *, prefix: str = "train") -> None:
        """Write one record; ``record['step']`` is the TensorBoard global step."""
        if not self.enabled:
            return
        clean = {k: _clean(v) for k, v in record.items()}
        assert self._file is not None
        self._file.write(json.dumps(clean) + "\n")
        scalars = {f"{prefix}/{k}": v for k, v in clean.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, global_step=int(record["step"]))
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(record["step"]))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``run_dir/metrics.jsonl`` in order (for tests and notebooks)."""
    with (Path(run_dir) / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]
