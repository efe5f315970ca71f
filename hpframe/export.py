"""Export a training checkpoint for transformers: ``python -m hpframe.export CHECKPOINT OUT``.

CHECKPOINT is a committed checkpoint directory (``.../checkpoints/step_00000040``) or a checkpoint root
(its newest good checkpoint is taken). OUT receives ``model.safetensors`` and ``config.json`` that
``AutoModelForCausalLM.from_pretrained(OUT)`` loads as MixtralForCausalLM, DeepseekV3ForCausalLM or
Qwen3MoeForCausalLM (tensor names and config of ``hpframe.models.hf_adapter``: the original vocabulary
without tensor-parallel padding, rope scaling as configured, no quantization), plus
``hpframe_run_config.json`` (the run's composed config, for provenance). Weights are the fp32 master
weights, cast with ``--dtype`` (config.json's ``dtype`` says which). A run started from
``model.from_hf=DIR`` gets DIR's tokenizer files copied along (``--tokenizer DIR`` names another source),
so ``AutoTokenizer.from_pretrained(OUT)`` works too.

Whatever layout the run used, the portable checkpoint already holds every tensor once under its
single-device name, so export needs no process group and reads no pickle. The checkpoint is verified
against its checksum manifest first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from hpframe.checkpoint import store
from hpframe.checkpoint.portable import CLIENT_STATE, PortableCheckpoint
from hpframe.config.convert import from_dict
from hpframe.config.schema import MoEConfig, RunConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
"""Files of a transformers checkpoint directory that describe its tokenizer (and generation defaults)."""


def copy_tokenizer(source: str | Path, out: Path) -> list[str]:
    """Copy the tokenizer files of ``source`` present there into ``out``; return their names."""
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, out / name)
            copied.append(name)
    return copied


def resolve_checkpoint(path: str | Path) -> Path:
    """A committed checkpoint directory from a directory or a checkpoint root; ValueError if none."""
    path = Path(path)
    if (path / store.MANIFEST).is_file():
        return path
    found = store.find_latest_good(path)
    if found is None:
        raise ValueError(f"{path}: neither a committed checkpoint (no {store.MANIFEST}) nor a root holding one")
    return found.path


def load_model_state(checkpoint: str | Path) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """(the run's config, the single-device model state dict) of a checkpoint, checksums verified."""
    path = resolve_checkpoint(checkpoint)
    try:
        store.verify(path)
    except store.CheckpointError as err:
        raise ValueError(str(err)) from err
    cfg = from_dict(json.loads((path / CLIENT_STATE).read_text())["config"])
    ckpt = PortableCheckpoint(path)
    return cfg, {name: ckpt.read(name) for name in sorted(ckpt.names("param"))}


def _trained_routing(cfg: RunConfig) -> MoEConfig:
    """The MoE settings the model was trained with: node-limited routing used the plan's routing groups
    (the nodes one EP group spans, when more than one), which may differ from moe.num_expert_groups."""
    from hpframe.plan import make_plan

    if cfg.moe.num_experts <= 0:
        return cfg.moe
    groups = make_plan(cfg).experts.routing_groups
    return cfg.moe if groups == cfg.moe.num_expert_groups else dataclasses.replace(cfg.moe, num_expert_groups=groups)


def export(checkpoint: str | Path, out: str | Path, *, dtype: str = "fp32", tokenizer: str | None = None) -> Path:
    """Write the transformers files of ``checkpoint`` into ``out``; returns ``out``.

    ``tokenizer``: directory whose tokenizer files are copied; None = the run's model.from_hf, if any."""
    from safetensors.torch import save_file

    from hpframe.models.hf_adapter import to_hf_config, to_hf_state_dict

    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype}: choose one of {sorted(DTYPES)}")
    cfg, state = load_model_state(checkpoint)
    moe = _trained_routing(cfg)
    tensors = to_hf_state_dict(state, cfg.model, moe)
    # DeepSeek's selection bias stays fp32 (transformers keeps e_score_correction_bias in fp32)
    tensors = {k: (v if k.endswith("e_score_correction_bias") else v.to(DTYPES[dtype])).contiguous() for k, v in tensors.items()}
    hf_config = to_hf_config(cfg.model, moe) | {"dtype": "float32" if dtype == "fp32" else "bfloat16"}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    (out / "hpframe_run_config.json").write_text(json.dumps(json.loads((resolve_checkpoint(checkpoint) / CLIENT_STATE).read_text())["config"], indent=1))
    source = tokenizer if tokenizer is not None else cfg.model.from_hf
    if source:
        if not Path(source).is_dir():
            raise ValueError(f"tokenizer source {source} is not a directory (pass --tokenizer DIR)")
        copy_tokenizer(source, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpframe.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="checkpoint directory (step_XXXXXXXX) or checkpoint root")
    parser.add_argument("out", help="output directory for model.safetensors and config.json")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the exported weights")
    parser.add_argument("--tokenizer", default=None,
                        help="directory whose tokenizer files are copied (default: the run's model.from_hf)")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, dtype=args.dtype, tokenizer=args.tokenizer)
    except ValueError as err:
        print(f"hpframe.export: {err}", file=sys.stderr)
        return 2
    print(f"exported {resolve_checkpoint(args.checkpoint)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
