"""``python launch.py --help``: recipes, config groups and the most used keys, one line each.

Built from the code, so it stays true: the recipes and group options are the YAML files shipped in
hpframe/recipes/ and hpframe/conf/ (a recipe's line is its first comment line), and each key's line
is the first line of the docstring under its field in hpframe/config/schema.py. Hydra's own help
stays available as ``--hydra-help``.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from hpframe.config import schema
from hpframe.config.store import CONF_DIR, RECIPES_DIR, recipe_names

COMMON_KEYS = (
    "parallel.tp", "parallel.pp", "parallel.dp", "parallel.ep", "parallel.zero_stage", "parallel.micro_batch_size",
    "parallel.global_batch_size", "parallel.recompute", "train.steps", "train.lr", "train.dtype", "train.master_dtype",
    "train.device", "train.num_threads", "train.compile", "train.progress", "train.tensorboard", "train.wandb",
    "data.kind", "data.path", "data.seq_len", "data.inputs", "data.eval_path", "data.document_mask", "checkpoint.enabled", "checkpoint.dir", "checkpoint.interval",
    "checkpoint.resume", "cluster.nodes", "cluster.gpus_per_node", "cluster.gpu_memory_gb", "plan.dry_run",
    "plan.format", "plan.suggest", "plan.memory_check",
)
"""Keys shown by --help (others: ``python launch.py --cfg job`` prints every key with its value)."""

USAGE = """\
usage: python launch.py [recipe=NAME] [GROUP=OPTION ...] [KEY=VALUE ...]   (installed: hpframe ...)

  python launch.py recipe=deepseek_v3 plan.dry_run=true      print the plan; no GPU, no process
  python launch.py recipe=deepseek_debug parallel.dp=2 parallel.ep=2   train, 2 local processes
  python launch.py -m train.lr=1e-3,3e-4 train.steps=50      a sweep: one run per value (multirun/)
  python launch.py --config-dir ~/my_recipes recipe=mine     recipes kept outside hpframe (docs/training.md)
  python launch.py --cfg job                                 the composed configuration, every key
  python launch.py --hydra-help                              Hydra's own options
"""


def field_docs() -> dict[str, str]:
    """``section.field`` -> first line of the docstring under that field in schema.py."""
    tree = ast.parse(inspect.getsource(schema))
    classes = {cls.__name__: section for section, cls in _sections().items()}
    out: dict[str, str] = {}
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name in classes):
            continue
        for stmt, nxt in zip(node.body, node.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                out[f"{classes[node.name]}.{stmt.target.id}"] = nxt.value.value.strip().splitlines()[0]
    return out


def _sections() -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else getattr(schema, str(f.type))
            for f in schema.RunConfig.__dataclass_fields__.values() if str(f.type)[0].isupper()}


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("# ").strip()
    return ""


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def render_help(width: int = 100) -> str:
    """The --help text."""
    defaults = OmegaConf.load(CONF_DIR / "config.yaml").defaults
    default = next((d["recipe"] for d in defaults if isinstance(d, DictConfig) and "recipe" in d), "")
    lines = [USAGE, f"recipes (recipe=NAME; default {default}):"]
    for name in recipe_names():
        lines.append(_clip(f"  {name:<16} {_first_comment(RECIPES_DIR / f'{name}.yaml')}", width))
    lines += ["", "config groups (GROUP=OPTION):"]
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "local"):
        options = sorted(p.stem for p in group.glob("*.yaml"))
        lines.append(_clip(f"  {group.name:<16} {', '.join(options)}", width))
    lines += ["", "most used keys (KEY=VALUE):"]
    docs = field_docs()
    for key in COMMON_KEYS:
        lines.append(_clip(f"  {key:<28} {docs.get(key, '')}", width))
    lines += ["", "Every key: docs/training.md and hpframe/config/schema.py; planner output: docs/planner.md."]
    return "\n".join(lines)
