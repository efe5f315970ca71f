"""The DeepSpeed and torch internals hpframe relies on, the versions they were written for, and a start-up check.

hpframe replaces a few methods of DeepSpeed objects, reads attributes DeepSpeed does not document,
and calls private torch functions (``PATCHES``; docs/design.md, "Library internals", explains each).
Such code can break silently when the library changes. ``check_libraries``, run by ``build_engine``
on every rank, does two things:

  * a version check: the installed deepspeed (exact version) and torch (major.minor) against
    ``WRITTEN_FOR``; an untested version gives one warning naming both versions;
  * a presence check: every class attribute, module attribute and method that a patch replaces,
    overrides or calls must exist; a missing one raises ``LibraryVersionError`` naming the attribute,
    the installed version and the version the patch was written for (the patch cannot work).

Whether a patched path still computes what the library computes is checked by tests that run
DeepSpeed's unpatched path beside hpframe's on the same model and inputs
(tests/dist/test_library_internals.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

WRITTEN_FOR: dict[str, tuple[str, ...]] = {
    "deepspeed": ("0.19.8",),  # exact versions
    "torch": ("2.11", "2.13"),  # major.minor: 2.13 CPU (pinned), 2.11+cu130 (the GPU machines)
}
"""The library versions the entries of ``PATCHES`` were written and tested for."""


@dataclass(frozen=True, slots=True)
class Patch:
    """One place where hpframe depends on a library internal.

    ``target`` is ``module:qualname`` of the library attribute; ``present`` says whether it can be
    checked without an instance (a class or module attribute), as opposed to an attribute set in an
    object's ``__init__``. ``how``: replaces (hpframe's function is installed in its place), overrides
    (a subclass method), writes/reads (a private attribute or registry), calls (a private function).
    """

    where: str
    target: str
    how: Literal["replaces", "overrides", "writes", "reads", "calls"]
    present: bool = True

    @property
    def library(self) -> str:
        return self.target.split(".", 1)[0]


_BF16 = "deepspeed.runtime.bf16_optimizer:BF16_Optimizer"
_ENGINE = "deepspeed.runtime.engine:DeepSpeedEngine"
_PIPE = "deepspeed.runtime.pipe.module:PipelineModule"
_GROUPS = "deepspeed.utils.groups"

PATCHES: tuple[Patch, ...] = (
    # the optimizer-step guard (engine/step.py)
    Patch("engine/step.py StepGuard", f"{_ENGINE}._take_model_step", "replaces"),
    Patch("engine/step.py held_gradients", f"{_BF16}.fp32_groups_gradients", "reads", present=False),
    Patch("engine/step.py held_gradients", "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer"
          ".averaged_gradients", "reads", present=False),
    Patch("engine/step.py SkippableAdamW", "torch.optim.adamw:AdamW.grad_scale", "writes", present=False),
    # the bf16 gradient hand-over (engine/bf16_grads.py)
    Patch("engine/bf16_grads.py install", f"{_BF16}.update_hp_grads", "replaces"),
    Patch("engine/bf16_grads.py install", f"{_BF16}.clear_hp_grads", "replaces"),
    Patch("engine/bf16_grads.py _fuse_lp_copy", f"{_BF16}.update_lp_params", "replaces"),
    Patch("engine/bf16_grads.py _fuse_lp_copy", "deepspeed.runtime.bf16_optimizer:all_gather_dp_groups", "calls"),
    Patch("engine/bf16_grads.py _step_without_norm", f"{_BF16}.step", "replaces"),
    Patch("engine/bf16_grads.py _step_without_norm", f"{_BF16}._lazy_init_hp_params_optimizer_state", "calls"),
    # experts (engine/moe_bridge.py)
    Patch("engine/moe_bridge.py register_expert_groups", f"{_GROUPS}:_EXPERT_PARALLEL_GROUP", "writes"),
    Patch("engine/moe_bridge.py register_expert_groups", f"{_GROUPS}:_EXPERT_PARALLEL_GROUP_RANKS", "writes"),
    Patch("engine/moe_bridge.py register_expert_groups", f"{_GROUPS}:_EXPERT_DATA_PARALLEL_GROUP", "writes"),
    Patch("engine/moe_bridge.py register_expert_groups", f"{_GROUPS}:_EXPERT_DATA_PARALLEL_GROUP_RANKS", "writes"),
    Patch("engine/moe_bridge.py _ExpertAware", f"{_ENGINE}._configure_distributed_model", "overrides"),
    Patch("engine/moe_bridge.py _ExpertAware", f"{_ENGINE}.allreduce_no_retain", "overrides"),
    # pipeline (parallel/pipeline.py)
    Patch("parallel/pipeline.py PlanPipelineModule", f"{_PIPE}._partition_layers", "overrides"),
    Patch("parallel/pipeline.py PlanPipelineModule", f"{_PIPE}._set_bounds", "calls"),
    Patch("parallel/pipeline.py PlanPipelineModule", f"{_PIPE}.allreduce_tied_weight_gradients", "overrides"),
    # process set-up (engine/ds_env.py)
    Patch("engine/ds_env.py prepare_deepspeed", "deepspeed.comm.torch:build_shm_op", "replaces"),
    # checkpoints (checkpoint/reshard.py): ZeRO fragment mappings
    Patch("checkpoint/reshard.py", "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer"
          "._lazy_init_hp_params_optimizer_state", "calls"),
    Patch("checkpoint/reshard.py", "deepspeed.utils.tensor_fragment:tensor_fragment", "reads"),
    # torch
    Patch("models/moe.py in_backward", "torch._C:_current_graph_task_id", "calls"),
    Patch("models/moe.py GroupedExperts, models/moe_gpu.py", "torch:_grouped_mm", "calls"),
    Patch("engine/step.py, engine/bf16_grads.py, engine/moe_bridge.py, engine/adamw_kernel.py", "torch:_foreach_mul_",
          "calls"),
    Patch("models/moe.py Router", "torch.nn.modules.module:Module._apply", "overrides"),
    Patch("models/moe.py GroupedExperts", "torch.nn.modules.module:Module._load_from_state_dict", "overrides"),
)
"""Every library internal hpframe depends on (docs/design.md lists them with the reason for each)."""


class LibraryVersionError(RuntimeError):
    """A library internal that hpframe patches or calls is missing from the installed version."""


def installed_versions() -> dict[str, str]:
    """{library: installed version} for the libraries of ``WRITTEN_FOR``."""
    import deepspeed
    import torch

    return {"deepspeed": deepspeed.__version__, "torch": torch.__version__}


def _tested(library: str, version: str) -> bool:
    base = version.split("+", 1)[0]
    if library == "torch":
        return ".".join(base.split(".")[:2]) in WRITTEN_FOR["torch"]
    return base in WRITTEN_FOR[library]


def resolve(target: str) -> object:
    """The object ``module:qualname`` names; AttributeError/ImportError when it does not exist."""
    module, _, qualname = target.partition(":")
    obj: object = importlib.import_module(module)
    for part in qualname.split(".") if qualname else ():
        obj = getattr(obj, part)
    return obj


def check_libraries(versions: dict[str, str] | None = None) -> list[str]:
    """Warnings for untested library versions; raises ``LibraryVersionError`` for a missing internal.

    ``versions`` defaults to ``installed_versions()`` (tests pass others).
    """
    versions = versions or installed_versions()
    warnings = [
        f"{lib} {versions[lib]} is installed; hpframe's patches of {lib} internals were written for "
        f"{' / '.join(WRITTEN_FOR[lib])} (docs/design.md, 'Library internals'): run "
        "tests/dist/test_library_internals.py before trusting a training run"
        for lib in WRITTEN_FOR if not _tested(lib, versions[lib])
    ]
    missing = []
    for patch in PATCHES:
        if not patch.present:
            continue
        try:
            resolve(patch.target)
        except (AttributeError, ImportError):
            missing.append(patch)
    if missing:
        lines = [f"  {p.target} ({p.how} in hpframe/{p.where})" for p in missing]
        libs = sorted({p.library for p in missing})
        raise LibraryVersionError(
            "library internals hpframe depends on are missing from the installed "
            + ", ".join(f"{lib} {versions[lib]} (written for {' / '.join(WRITTEN_FOR[lib])})" for lib in libs)
            + ":\n" + "\n".join(lines) + "\ninstall the versions pinned in pyproject.toml")
    return warnings
