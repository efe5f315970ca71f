"""model.from_hf on one process (CPU, fp32): config.json -> hpframe config, weights read from the
safetensors files with ``HFCheckpoint``, logits against transformers' own model of the same files.

Checkpoints are tiny random models written by transformers' classes (``hpframe.testing.hf_models``:
odd shapes, several shards, skewed routing). Also: the fields config.json cannot carry are refused by
name; an override contradicting config.json is refused naming both values (launch.py exits 2);
mismatched files are refused listing the tensors; FP8 block-quantized weights load dequantized and
FP8 without scales is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hpframe.checkpoint.hf_load import HFCheckpoint  # noqa: E402
from hpframe.config.hf_config import HFConfigError, check_run_config, expand_overrides  # noqa: E402
from hpframe.models import build_model  # noqa: E402
from hpframe.testing.hf_models import load_single_device, sample_tokens, write_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-5


def compose_from_hf(path: Path, *overrides: str):  # noqa: ANN201
    from conftest import compose_run_config

    return compose_run_config(*expand_overrides([f"model.from_hf={path}", *overrides]))


def load_ours(path: Path, *overrides: str) -> torch.nn.Module:
    """hpframe's single-device model of ``path``: built on meta, materialized, filled by HFCheckpoint."""
    cfg = compose_from_hf(path, *overrides)
    check_run_config(cfg.model, cfg.moe)
    return load_single_device(path, cfg.model, cfg.moe).eval()


VARIANTS = {
    "mixtral": ("mixtral", {}),
    "deepseek_v3_yarn": ("deepseek_v3", {}),
    "deepseek_v3_full_rank_q": ("deepseek_v3", {"q_lora_rank": None, "rope_parameters": None}),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe_sparse_step2_yarn": ("qwen3_moe", {"decoder_sparse_step": 2, "mlp_only_layers": [], "norm_topk_prob": True,
                                                  "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0,
                                                                      "factor": 2.0, "original_max_position_embeddings": 16}}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers(variant: str, tmp_path: Path) -> None:
    family, overrides = VARIANTS[variant]
    theirs = write_checkpoint(family, tmp_path, **overrides)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1  # sharded, with an index
    ours = load_ours(tmp_path)
    t = sample_tokens(101)
    with torch.no_grad():
        a, b = ours(t), theirs(t).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < ATOL
    assert b.abs().max().item() > 1.0  # logits of visible size: the comparison can fail


def test_sparse_step_and_mlp_only_layers_pick_the_dense_blocks(tmp_path: Path) -> None:
    write_checkpoint("qwen3_moe", tmp_path, num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    cfg = compose_from_hf(tmp_path)
    from hpframe.models.transformer import is_moe_layer
    from hpframe.plan.params import count_params

    moe = [i for i in range(6) if is_moe_layer(i, cfg.model, cfg.moe)]
    assert moe == [1, 5]  # (i + 1) % 2 == 0, without 3
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    # the planner's count is exact: transformers' parameters (its tied-free head included)
    assert count_params(cfg.model, cfg.moe).total == sum(p.numel() for p in theirs.parameters())


def test_planner_counts_equal_transformers(tmp_path: Path) -> None:
    from hpframe.plan.params import count_params

    for family in ("mixtral", "deepseek_v3", "qwen3_moe"):
        theirs = write_checkpoint(family, tmp_path / family)
        cfg = compose_from_hf(tmp_path / family)
        assert count_params(cfg.model, cfg.moe).total == sum(p.numel() for p in theirs.parameters()), family
        # tp=2 pads the 101-row vocabulary to 102 rows of embedding and head
        assert count_params(cfg.model, cfg.moe, 2).total == count_params(cfg.model, cfg.moe).total + 2 * 48


def _edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(("family", "changes", "message"), [
    ("mixtral", {"sliding_window": 4096}, "sliding_window=4096 is not supported"),
    ("mixtral", {"model_type": "llama4"}, "model_type='llama4' is not supported"),
    ("qwen3_moe", {"use_sliding_window": True}, "use_sliding_window=True is not supported"),
    ("qwen3_moe", {"attention_bias": True}, "attention_bias=True is not supported"),
    ("qwen3_moe", {"layer_types": ["full_attention", "sliding_attention"] * 2}, "layer_types=['sliding_attention'] is not supported"),
    ("mixtral", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope type='longrope' is not supported"),
    ("deepseek_v3", {"quantization_config": {"quant_method": "gptq", "bits": 4}},
     "quantization_config.quant_method='gptq' is not supported"),
    ("deepseek_v3", {"rope_interleave": False}, "rope_interleave=False is not supported"),
])
def test_unsupported_fields_are_refused_by_name(family: str, changes: dict, message: str, tmp_path: Path) -> None:
    write_checkpoint(family, tmp_path, max_shard_size="10MB")
    _edit_config(tmp_path, **changes)
    with pytest.raises(HFConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        expand_overrides([f"model.from_hf={tmp_path}"])


def test_overrides_contradicting_config_json(tmp_path: Path) -> None:
    write_checkpoint("mixtral", tmp_path, max_shard_size="10MB")
    with pytest.raises(HFConfigError, match=f"model.hidden_size=64 contradicts model.from_hf={tmp_path}: its config.json gives 48"):
        expand_overrides([f"model.from_hf={tmp_path}", "model.hidden_size=64"])
    with pytest.raises(HFConfigError, match="moe.top_k=3 contradicts .* gives 2"):
        expand_overrides([f"model.from_hf={tmp_path}", "moe.top_k=3"])
    # agreeing shape overrides and free fields pass; a recipe's architecture is replaced
    out = expand_overrides(["recipe=deepseek_debug", f"model.from_hf={tmp_path}", "model.hidden_size=48", "model.max_seq_len=64"])
    cfg = compose_from_hf(tmp_path, "recipe=deepseek_debug", "model.max_seq_len=64")
    assert "model.arch=mixtral" in out and (cfg.model.arch.value, cfg.model.max_seq_len, cfg.moe.num_experts) == ("mixtral", 64, 8)
    cfg.model.num_kv_heads = 6  # a config composed without the expansion is refused before planning
    with pytest.raises(HFConfigError, match="model.num_kv_heads=6 contradicts .* gives 2"):
        check_run_config(cfg.model, cfg.moe)


def test_a_directory_with_spaces_composes(tmp_path: Path) -> None:
    path = tmp_path / "my model (v2)"
    write_checkpoint("mixtral", path, max_shard_size="10MB")
    cfg = compose_run_config_quoted(f"model.from_hf='{path}'")
    assert (cfg.model.from_hf, cfg.model.name, cfg.model.num_kv_heads) == (str(path), "mixtral:my model (v2)", 2)


def compose_run_config_quoted(*overrides: str):  # noqa: ANN201
    from conftest import compose_run_config

    return compose_run_config(*expand_overrides(list(overrides)))


def test_launch_exits_2_and_dry_run_and_cfg_job_see_the_real_model(tmp_path: Path) -> None:
    theirs = write_checkpoint("deepseek_v3", tmp_path, max_shard_size="10MB")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    bad = subprocess.run([sys.executable, "launch.py", f"model.from_hf={tmp_path}", "model.num_layers=8", "plan.dry_run=true"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert f"model.num_layers=8 contradicts model.from_hf={tmp_path}: its config.json gives 3" in bad.stderr
    ok = subprocess.run([sys.executable, "launch.py", f"model.from_hf={tmp_path}", "plan.dry_run=true", "plan.format=json"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["params"]["total"] == sum(p.numel() for p in theirs.parameters())
    job = subprocess.run([sys.executable, "launch.py", f"model.from_hf={tmp_path}", "--cfg", "job"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert job.returncode == 0, job.stderr
    for line in ("arch: deepseek_v3", "q_lora_rank: 16", "rope_type: yarn", "rope_mscale_all_dim: 0.707", "num_experts: 8"):
        assert f"  {line}\n" in job.stdout, line


def test_mismatched_checkpoint_is_refused_listing_tensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    write_checkpoint("mixtral", tmp_path, max_shard_size="10MB")
    f = tmp_path / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:40]
    tensors["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(f))
    cfg = compose_from_hf(tmp_path)
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.moe)
    with pytest.raises(ValueError) as err:
        HFCheckpoint(tmp_path).check(model)
    msg = str(err.value)
    assert "1 missing: model.layers.1.block_sparse_moe.experts.3.w2.weight" in msg
    assert "1 unexpected: model.layers.0.extra.weight" in msg
    assert "1 mis-shaped: model.layers.0.self_attn.q_proj.weight [40, 48] (expected [48, 48])" in msg


def _quantize_fp8(path: Path, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Rewrite every 2-D projection of ``path`` as fp8 e4m3 + per-block weight_scale_inv (DeepSeek's format);
    return the dequantized values (what a correct loader must produce)."""
    from safetensors.torch import load_file, save_file

    f = tmp = path / "model.safetensors"
    tensors, deq = load_file(str(f)), {}
    for name in [n for n in list(tensors) if n.endswith("proj.weight") or "_proj_with_mqa" in n]:
        w = tensors[name]
        rows, cols = -(-w.shape[0] // block[0]), -(-w.shape[1] // block[1])
        scale = torch.empty(rows, cols)
        for i in range(rows):
            for j in range(cols):
                part = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
                scale[i, j] = part.abs().max().clamp_min(1e-12) / 448.0
        full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: w.shape[0], : w.shape[1]]
        q = (w / full).to(torch.float8_e4m3fn)
        tensors[name], tensors[name + "_scale_inv"] = q, scale
        deq[name] = q.to(torch.float32) * full
    save_file(tensors, str(tmp))
    return deq


def test_fp8_block_quantized_weights_are_dequantized(tmp_path: Path) -> None:
    theirs = write_checkpoint("deepseek_v3", tmp_path, max_shard_size="10MB")
    deq = _quantize_fp8(tmp_path, (8, 16))  # blocks that do not divide 40 or 48: partial edge blocks
    _edit_config(tmp_path, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                "weight_block_size": [8, 16]})
    with torch.no_grad():
        sd = theirs.state_dict()
        for name, value in deq.items():
            # transformers keeps experts fused in memory: write each expert's rows into its slot
            if ".experts." in name:
                layer, e, proj = name.split(".mlp.experts.")[0], int(name.split(".experts.")[1].split(".")[0]), name.split(".")[-2]
                fused = sd[f"{layer}.mlp.experts.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"]
                inner = value.shape[0] if proj != "down_proj" else None
                if proj == "gate_proj":
                    fused[e, :inner] = value
                elif proj == "up_proj":
                    fused[e, inner:] = value
                else:
                    fused[e] = value
            else:
                sd[name].copy_(value)
    ours = load_ours(tmp_path)
    t = sample_tokens(101)
    with torch.no_grad():
        assert (ours(t) - theirs(t).logits).abs().max().item() < ATOL
    # a tensor-parallel slice that starts and ends inside quantization blocks dequantizes like the whole
    files = HFCheckpoint(tmp_path)
    name = "model.layers.1.mlp.shared_experts.down_proj.weight"  # [48, 24]
    whole = files.read(name, (slice(0, 48), slice(0, 24)))
    assert torch.equal(whole, deq[name])
    for rows, cols in ((slice(5, 29), slice(0, 24)), (slice(0, 48), slice(7, 19)), (slice(17, 18), slice(15, 17))):
        assert torch.equal(files.read(name, (rows, cols)), whole[rows, cols]), (rows, cols)
    # without the scales the fp8 codes would load as garbage: refused
    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(str(tmp_path / "model.safetensors")).items() if "layers.0.self_attn.o_proj" not in k or not k.endswith("_scale_inv")}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="1 FP8 tensors without a weight_scale_inv .*: model.layers.0.self_attn.o_proj.weight"):
        load_ours(tmp_path)
