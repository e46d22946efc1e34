"""DeepSpeed ZeRO-1/2 through ``accelerate launch --use_deepspeed`` on two CPU processes (DeepSpeed's CPU
accelerator over gloo; tiny SD3, Flux and Wan): training matches one process with the same global batch, both ranks
hold the same weights, the first update is on-policy, an infinite loss on one rank skips the step on both, and a
checkpoint (float32 masters + DeepSpeed's optimizer partitions) resumes bit for bit. Config checks run without
DeepSpeed."""
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _trainer import CONFIGS, one_thread, tiny  # noqa: F401 (fixture)

from grpo_guard.trainer import ConfigError, Trainer, config
from grpo_guard.trainer import zero
from grpo_guard.trainer.checkpoint import CheckpointError
from grpo_guard.trainer.update import UnsupportedDistributedError

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).resolve().parent

VARIANTS = {
    # ZeRO-2, LoRA, float32: comparable with one process (a warmup makes the LR schedule part of the comparison)
    "zero2-lora": (2, "no", ["train.warmup_steps=3"]),
    # ZeRO-1, full fine-tuning with EMA (of the float32 masters), evaluation every step, gradient checkpointing
    "zero1-full-ema-eval": (1, "no", ["model.use_lora=false", "train.ema=true", "run.eval_every=1",
                                      "train.gradient_checkpointing=true"]),
    # ZeRO-2 under bf16 (DeepSpeed casts the module to bf16 and keeps float32 masters), with the KL to the
    # reference (the LoRA switched off inside the engine's module)
    "zero2-lora-bf16-kl": (2, "bf16", ["train.beta_kl=0.01"]),
    # Flux, ZeRO-1 under bf16 with float32 gradient accumulation (DeepSpeed's BF16_Optimizer); two optimizer steps
    # per rollout, each closing its own accumulation window (one process's micro-batches are split differently
    # from two processes', so this one is not compared with one process)
    "zero1-flux-lora-bf16": (1, "bf16", ["train.updates_per_step=2"]),
    # Wan text-to-video, ZeRO-2 + LoRA, float32
    "zero2-wan-lora": (2, "no", ["run.eval_every=0"]),
    # Wan 2.2 A14B-like, both experts as one engine module: every backward touches one expert's parameters only
    "zero2-wan-both-experts": (2, "no", ["run.eval_every=0", "model.expert=both"]),
}


def family(variant):
    return "flux" if "-flux-" in variant else "wan" if "-wan-" in variant else "sd3"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, variant):
    pytest.importorskip("deepspeed")
    stage, precision, sets = VARIANTS[variant]
    out = tmp_path_factory.mktemp("deepspeed")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("ACCELERATE_USE_CPU", None)
    for attempt in range(2):  # the free port can be taken between the probe and the launch: one retry
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", str(stage),
               "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port()),
               "--mixed_precision", precision, "--gradient_accumulation_steps", "1",
               str(HERE / "_trainer_sharded_worker.py"), "deepspeed", str(out),
               str(CONFIGS / f"tiny_{family(variant)}.yaml"),
               "sample.batch_size=2", "sample.num_batches=2", f"run.mixed_precision='{precision}'", *sets]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0 or "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_ranks_agree_and_weights_moved(ranks, variant):
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["param_dtype"] == ("torch.bfloat16" if "bf16" in variant else "torch.float32")
    for key in ("after2", "after3", "resumed3"):
        for n, w in ranks[0][key].items():
            assert w.dtype == torch.float32 and torch.equal(w, ranks[1][key][n]), (key, n)
    assert any(not torch.equal(ranks[0]["after3"][n], ranks[0]["after2"][n]) for n in ranks[0]["after2"])


def test_matches_one_process(ranks, variant, tmp_path):
    if "bf16" in variant:
        pytest.skip("bf16: DeepSpeed runs the whole module in bf16, one process autocasts float32 weights")
    assert "train.updates_per_step=2" not in VARIANTS[variant][2]
    single = Trainer(tiny(family(variant), tmp_path, "sample.batch_size=2", "sample.num_batches=4", "run.save_every=0",
                          *VARIANTS[variant][2]))
    single.step()
    single.step()
    for n, p in single.named_params.items():
        torch.testing.assert_close(ranks[0]["after2"][n], p.detach(), atol=1e-6, rtol=1e-4)


def test_metrics_are_global_and_on_policy(ranks, variant):
    if variant.endswith("-kl"):  # the reference differs from the policy once the LoRA has moved
        assert all(t["kl"] > 0 for t in ranks[0]["records"][2][0]["timesteps"])
    for step in range(3):
        u0, u1 = ranks[0]["records"][step][0], ranks[1]["records"][step][0]
        assert u0["skipped"] == 0 and u0["grad_norm"] == u1["grad_norm"] and math.isfinite(u0["grad_norm"])
        assert u0["grad_norm"] > 0
        for t0, t1 in zip(u0["timesteps"], u1["timesteps"]):
            assert t0 == t1 and t0["grad_norm"] > 0  # this process's own timestep gradient, averaged over ranks
            assert t0["ratio_mean"] == 1.0 and t0["clipfrac"] == 0.0  # first update after the rollout
    assert ranks[0]["evaluation"] == ranks[1]["evaluation"]


def test_resume_is_bit_exact(ranks):
    r = ranks[0]
    assert "deepspeed" in r["files"] and "optimizer.pt" not in r["files"] and "weights.safetensors" in r["files"]
    for n in r["after2"]:
        assert torch.equal(r["reloaded"][n], r["after2"][n]), n
        assert torch.equal(r["resumed3"][n], r["after3"][n]), n


def test_non_finite_on_one_rank_skips_on_both(ranks):
    for r in ranks:
        assert r["nan_record"]["skipped"] == 1 and r["nan_record"]["nonfinite_losses"] > 0
        for n, w in r["resumed3"].items():
            assert torch.equal(r["after_nan"][n], w), n  # the skipped step changed nothing


# --- config checks (no DeepSpeed needed) ---------------------------------------------------------------------
def _accelerator(ds_config, world=2):
    plugin = SimpleNamespace(deepspeed_config=ds_config, gradient_accumulation_steps=None, gradient_clipping=None)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=world), plugin


def _cfg(*sets):
    return config.load(str(CONFIGS / "tiny_sd3.yaml"), ["sample.batch_size=3", "train.max_grad_norm=0.5", *sets])


def test_bf16_accumulates_and_communicates_gradients_in_float32_unless_set():
    ds = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}
    zero.configure(_accelerator(ds)[0], _cfg("run.mixed_precision=bf16"))
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["communication_data_type"] == "fp32"
    ds = {"zero_optimization": {"stage": 2}, "data_types": {"grad_accum_dtype": "bf16"}}
    zero.configure(_accelerator(ds)[0], _cfg("run.mixed_precision=bf16"))
    assert ds["data_types"]["grad_accum_dtype"] == "bf16"  # the user's explicit choice stays
    ds = {"zero_optimization": {"stage": 2}}
    zero.configure(_accelerator(ds)[0], _cfg())  # float32 run: nothing to set
    assert "data_types" not in ds and "communication_data_type" not in ds


def test_auto_values_are_filled_from_the_trainer_config():
    ds = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
          "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}
    acc, plugin = _accelerator(ds, world=4)
    zero.configure(acc, _cfg())
    assert ds["gradient_clipping"] == 0.5 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["train_batch_size"] == 12 and ds["gradient_accumulation_steps"] == 1
    assert plugin.gradient_clipping == 0.5 and plugin.gradient_accumulation_steps == 1


@pytest.mark.parametrize("ds,error,words", [
    ({"zero_optimization": {"stage": 3}}, UnsupportedDistributedError, "fsdp2.yaml"),
    ({"zero_optimization": {"stage": 0}}, UnsupportedDistributedError, "--multi_gpu"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, UnsupportedDistributedError,
     "offload_optimizer.device"),
    ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, ConfigError, "fp16.enabled"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, ConfigError, "run.mixed_precision: no"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"check_grad_overflow": False}}, ConfigError,
     "bf16.check_grad_overflow"),
    ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, ConfigError, "compute_grad_norm"),
    ({"zero_optimization": {"stage": 2, "load_from_fp32_weights": False}}, ConfigError, "load_from_fp32_weights"),
    ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, ConfigError, "train.warmup_steps"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, ConfigError, "an optimizer section"),
    ({"zero_optimization": {"stage": 2}, "managed_gradient_accumulation": False}, ConfigError,
     "managed_gradient_accumulation"),
    ({"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 4}, ConfigError,
     "gradient_accumulation_steps is 4"),
    ({"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}, ConfigError, "train.max_grad_norm is 0.5"),
    ({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8}, ConfigError,
     "sample.batch_size is 3"),
])
def test_unsupported_deepspeed_options_are_refused_naming_the_key(ds, error, words):
    with pytest.raises(error, match=words.replace(".", r"\.").replace("-", r"\-")):
        zero.configure(_accelerator(ds)[0], _cfg())


def test_matching_explicit_values_pass():
    ds = {"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 1, "gradient_clipping": 0.5,
          "train_micro_batch_size_per_gpu": 3}
    zero.configure(_accelerator(ds)[0], _cfg())


def test_shipped_accelerate_config_is_zero2():
    import yaml

    cfg = yaml.safe_load((CONFIGS / "accelerate" / "deepspeed_zero2.yaml").read_text())
    assert cfg["distributed_type"] == "DEEPSPEED" and cfg["deepspeed_config"]["zero_stage"] == 2
    assert cfg["deepspeed_config"]["gradient_accumulation_steps"] == 1


def test_a_deepspeed_checkpoint_refuses_to_load_without_deepspeed(tmp_path):
    t = Trainer(tiny("sd3", tmp_path, "run.save_every=0"))
    t.step()
    path = t.save()
    os.remove(os.path.join(path, "optimizer.pt"))
    os.makedirs(os.path.join(path, zero.TAG))
    with pytest.raises(CheckpointError, match="written under DeepSpeed"):
        t.resume(path)


def test_run_cpu_with_deepspeed_on_a_cuda_machine_is_refused(tmp_path, monkeypatch):
    from grpo_guard.trainer.loop import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="run.cpu: true .* with a DeepSpeed launch"):
        make_accelerator(tiny("sd3", tmp_path, "run.cpu=true"))
