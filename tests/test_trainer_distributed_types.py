"""accelerate modes the trainer does not implement (FSDP1, DeepSpeed ZeRO-3, Megatron) are refused before any model
is built, with what is supported; DDP-style modes, FSDP2 and DeepSpeed ZeRO-1/2 pass. (accelerate never selects
FSDP or DeepSpeed for cpu=True, so the accelerator here is a stand-in that reports the distributed type;
tests/test_trainer_fsdp.py runs FSDP2, tests/test_trainer_deepspeed.py DeepSpeed.)"""
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from _trainer import tiny

from grpo_guard.trainer import ConfigError, Trainer
from grpo_guard.trainer.update import UnsupportedDistributedError, check_distributed


@pytest.mark.parametrize("kind,why", [("FSDP", "fsdp_version: 2"), ("MEGATRON_LM", "synchronizes gradients itself"),
                                      ("DEEPSPEED", "stage 3 partitions the parameters")])
def test_unsupported_modes_are_refused_before_the_model(kind, why, tmp_path, monkeypatch):
    import grpo_guard.trainer.loop as loop

    def no_build(*a, **k):
        raise AssertionError("the model was built before the distributed mode was checked")

    monkeypatch.setattr(loop, "build_adapter", no_build)
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 3}})
    acc = SimpleNamespace(distributed_type=DistributedType[kind], num_processes=2, process_index=0,
                          state=SimpleNamespace(deepspeed_plugin=plugin))
    with pytest.raises(UnsupportedDistributedError) as info:
        Trainer(tiny("sd3", tmp_path), accelerator=acc)
    msg = str(info.value)
    assert why in msg
    if kind != "DEEPSPEED":
        assert f"distributed type {kind} is not supported" in msg and "--multi_gpu" in msg
    assert isinstance(info.value, ConfigError) and isinstance(info.value, NotImplementedError)


@pytest.mark.parametrize("kind", ["NO", "MULTI_CPU", "MULTI_GPU", "DEEPSPEED"])
def test_ddp_style_modes_pass(kind):
    check_distributed(SimpleNamespace(distributed_type=DistributedType[kind]))


def test_fsdp2_passes_and_fsdp1_is_refused():
    def acc(version):
        return SimpleNamespace(distributed_type=DistributedType.FSDP,
                               state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))
    check_distributed(acc(2))
    with pytest.raises(UnsupportedDistributedError, match="fsdp_version: 2"):
        check_distributed(acc(1))
