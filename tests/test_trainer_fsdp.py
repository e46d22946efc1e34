"""FSDP2 (accelerate fsdp_version 2) on two CPU processes over gloo: the trained LoRA weights are sharded DTensors,
training matches one process with the same global batch, both ranks hold the same weights, the per-timestep
metrics are global, evaluation splits prompts unevenly without deadlocking, and a checkpoint written from shards
resumes bit for bit. (accelerate never picks FSDP for CPU processes; the worker forces the distributed type.)"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _trainer import CONFIGS, one_thread, tiny  # noqa: F401 (fixture)

from grpo_guard.trainer import Trainer

pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).resolve().parent


VARIANTS = {
    "lora": [],
    # full fine-tuning puts trained weights in accelerate's root FSDP group (kept unsharded after a forward) and
    # evaluation swaps the EMA in and out of the sharded weights: both must leave training and checkpoints intact;
    # with diffusers' gradient checkpointing inside the FSDP2 blocks
    "full-ema-eval": ["model.use_lora=false", "train.ema=true", "run.eval_every=1",
                      "train.gradient_checkpointing=true"],
    # Wan text-to-video: WanTransformerBlock sharded, video rewards, the evaluation's strip written by rank 0
    "wan-lora": ["run.eval_every=0"],
    # Wan 2.2 A14B-like: both experts trained as one module (each block of both sharded), steps 0-1 on the high-noise
    # expert and step 2 on the low-noise one, the same on every process
    "wan-both-experts": ["run.eval_every=0", "model.expert=both"],
}


def family(variant):
    return "wan" if variant.startswith("wan") else "sd3"


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, variant):
    out = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_trainer_sharded_worker.py"), "fsdp2", str(out), str(CONFIGS / f"tiny_{family(variant)}.yaml"),
           "sample.batch_size=2", "sample.num_batches=2", *VARIANTS[variant]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_ranks_agree_and_weights_moved(ranks):
    assert [r["world"] for r in ranks] == [2, 2]
    for key in ("after2", "after3", "resumed3"):
        for n, w in ranks[0][key].items():
            assert torch.equal(w, ranks[1][key][n]), (key, n)
    assert any(not torch.equal(ranks[0]["after3"][n], ranks[0]["after2"][n]) for n in ranks[0]["after2"])


def test_matches_one_process(ranks, variant, tmp_path):
    single = Trainer(tiny(family(variant), tmp_path, "sample.batch_size=2", "sample.num_batches=4", "run.save_every=0",
                          *VARIANTS[variant]))
    single.step()
    single.step()
    for n, p in single.named_params.items():
        torch.testing.assert_close(ranks[0]["after2"][n], p.detach(), atol=1e-6, rtol=1e-4)


def test_metrics_are_global_and_on_policy(ranks):
    for step in range(3):
        u0, u1 = ranks[0]["records"][step][0], ranks[1]["records"][step][0]
        assert u0["skipped"] == 0 and u0["grad_norm"] == u1["grad_norm"] and math.isfinite(u0["grad_norm"])
        for t0, t1 in zip(u0["timesteps"], u1["timesteps"]):
            assert t0 == t1 and t0["grad_norm"] > 0  # each timestep's norm of the averaged gradient
            assert t0["ratio_mean"] == 1.0 and t0["clipfrac"] == 0.0  # first update after the rollout
    assert ranks[0]["evaluation"] == ranks[1]["evaluation"]


def test_evaluation_strip_written_by_rank_0(ranks, variant):
    """Process 0 writes its share of the evaluation after the metrics' all-reduce (the strip's layout is tested in
    test_trainer_wan.py), videos also as a GIF."""
    assert {"step-00000003.png", "step-00000003.txt"} <= set(ranks[0]["media"])
    assert ("step-00000003.gif" in ranks[0]["media"]) == (family(variant) == "wan")


def test_resume_from_shards_is_bit_exact(ranks):
    r = ranks[0]
    for n in r["after2"]:
        assert torch.equal(r["reloaded"][n], r["after2"][n]), n
        assert torch.equal(r["resumed3"][n], r["after3"][n]), n


def test_shipped_accelerate_config_names_real_block_classes():
    import yaml
    from diffusers.models.transformers import transformer_flux, transformer_sd3, transformer_wan  # noqa: F401

    cfg = yaml.safe_load((CONFIGS / "accelerate" / "fsdp2.yaml").read_text())
    assert cfg["distributed_type"] == "FSDP" and cfg["fsdp_config"]["fsdp_version"] == 2
    for name in cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(","):
        assert hasattr(transformer_flux, name), name
    assert hasattr(transformer_sd3, "JointTransformerBlock")  # what the comment says to wrap for SD3
    assert hasattr(transformer_wan, "WanTransformerBlock")  # and for Wan


def test_non_finite_on_one_rank_skips_on_both(ranks):
    for r in ranks:
        assert r["nan_record"]["skipped"] == 1 and r["nan_record"]["nonfinite_losses"] > 0
        for n, w in r["resumed3"].items():
            assert torch.equal(r["after_nan"][n], w), n  # the skipped step changed nothing


def test_checkpoint_without_fsdp_loads_into_fsdp2_by_name():
    from grpo_guard.trainer.sharding import name_keyed

    saved = {"state": {0: {"step": torch.tensor(2.0)}, 1: {"step": torch.tensor(2.0)}},
             "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}
    named = name_keyed(saved, ["a.lora_A", "a.lora_B"])
    assert set(named["state"]) == {"a.lora_A", "a.lora_B"} and named["param_groups"][0]["params"] == ["a.lora_A",
                                                                                                    "a.lora_B"]
    assert named["param_groups"][0]["lr"] == 1e-3 and name_keyed(named, ["x", "y"]) is named


def test_fsdp2_reduces_gradients_in_float32():
    from types import SimpleNamespace

    from torch.distributed.fsdp import MixedPrecisionPolicy

    from grpo_guard.trainer.sharding import full_precision_gradient_reduction

    plugin = SimpleNamespace(mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                         reduce_dtype=torch.bfloat16))
    full_precision_gradient_reduction(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    assert plugin.mixed_precision_policy.reduce_dtype == torch.float32
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16


def test_gradient_checkpointing_twice_is_refused(tmp_path):
    from types import SimpleNamespace

    from grpo_guard.trainer import ConfigError
    from grpo_guard.trainer.sharding import check

    acc = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(activation_checkpointing=True)))
    with pytest.raises(ConfigError, match="recompute every block twice"):
        check(acc, tiny("sd3", tmp_path, "train.gradient_checkpointing=true"))
    check(acc, tiny("sd3", tmp_path))  # accelerate's activation checkpointing alone is fine
