"""Checkpoints: ``<output_dir>/checkpoints/step-00000042/`` with

- ``weights.safetensors``  the trained parameters by name (the LoRA weights, or the full transformer)
- ``ema.safetensors``      their EMA (when enabled)
- ``optimizer.pt``, ``scheduler.pt``     optimizer and LR-scheduler state
- ``rng-<rank>.pt``        python / numpy / torch (and CUDA) RNG states of each process
- ``state.json``           step, counters, config -- written last; its presence marks a complete checkpoint

Under FSDP2 (``model`` given) the weights, the EMA and the optimizer state are gathered into whole tensors
first (collectives), so a checkpoint has the same files whatever wrote it; the optimizer state is keyed by
parameter index without FSDP2 and by name with it, and either loads into either. Under DeepSpeed ZeRO-1/2
(``engine`` given) the weights are the gathered float32 masters and ``optimizer.pt`` is replaced by DeepSpeed's
own checkpoint in ``deepspeed/`` (one optimizer partition per process), which only DeepSpeed loads.

Written atomically: everything goes to a hidden temporary directory that is renamed into place only when
complete, so a run killed mid-write leaves no directory that looks like a checkpoint. ``latest`` finds the
newest complete one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import sharding, zero

PATTERN = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed here (incomplete, another model, process count or distributed mode)."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> Dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: str, step: int, accelerator, named_params: Dict[str, torch.Tensor], optimizer, lr_scheduler,
         state: Dict, ema_shadow: Optional[Sequence[torch.Tensor]] = None, keep_last: int = 0, model=None,
         engine=None) -> str:
    """Write checkpoint ``step`` under ``root`` (collective: call on every process). Returns its path.
    ``model``: the FSDP2-sharded module, when the parameters are sharded; ``engine``: the DeepSpeed engine
    (None otherwise)."""
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f".tmp-step-{step:08d}")
    main = accelerator.is_main_process
    if main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), os.path.join(tmp, f"rng-{accelerator.process_index}.pt"))
    sharded = model is not None
    sharding.reshard(model)  # named_parameters must be the sharded ones the optimizer holds
    weights = ema = optim_state = None
    if engine is not None:  # masters gathered one by one from the ZeRO partitions (collective); only the writer
        # keeps CPU copies; DeepSpeed writes the optimizer state, one partition per process
        weights = {n: w.cpu() for n, w in zip(named_params, zero.full_params(named_params.values())) if main}
        zero.save(engine, tmp)
    if main or sharded:  # gathering shards is collective; unsharded, only the writer needs CPU copies
        if engine is None:
            weights = {n: sharding.full(t.detach()).contiguous().cpu() for n, t in named_params.items()}
        ema = None if ema_shadow is None else \
            {n: sharding.full(s).contiguous().cpu() for n, s in zip(named_params, ema_shadow)}
        optim_state = None if engine is not None else sharding.optimizer_state(model, optimizer, sharded)
    if main:
        save_file(weights, os.path.join(tmp, "weights.safetensors"))
        if ema is not None:
            save_file(ema, os.path.join(tmp, "ema.safetensors"))
        if optim_state is not None:
            torch.save(optim_state, os.path.join(tmp, "optimizer.pt"))
        torch.save(lr_scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    accelerator.wait_for_everyone()
    if main:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(dict(state, step=step, num_processes=accelerator.num_processes), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        for parent, dirs, files in os.walk(tmp, topdown=False):  # (deepspeed/ is a sub-directory)
            for name in files:
                with open(os.path.join(parent, name), "rb") as f:
                    os.fsync(f.fileno())
            _fsync_dir(parent)
        stale = None
        if os.path.exists(final):  # saving a step again (after a resume): move the old one aside, never delete first
            stale = final + ".replaced"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
        os.replace(tmp, final)
        _fsync_dir(root)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
        if keep_last > 0:
            for old in list_complete(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_complete(root: str) -> List[str]:
    """Complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = PATTERN.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, "state.json")) and \
                os.path.isfile(os.path.join(path, "weights.safetensors")):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest(root: str) -> Optional[str]:
    done = list_complete(root)
    return done[-1] if done else None


def load(path: str, accelerator, named_params: Dict[str, torch.nn.Parameter], optimizer, lr_scheduler,
         ema_shadow: Optional[Sequence[torch.Tensor]] = None, model=None, engine=None) -> Dict:
    """Restore a checkpoint written by :func:`save` into the given objects; returns its ``state.json``.
    ``model``: the FSDP2-sharded module, when the parameters are sharded; ``engine``: the DeepSpeed engine
    (collective in both cases)."""
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise CheckpointError(f"{path} is not a complete checkpoint (no state.json)")
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    if state.get("num_processes") != accelerator.num_processes:
        raise CheckpointError(f"{path} was written by {state.get('num_processes')} processes; resuming with "
                              f"{accelerator.num_processes} would change the rollout split and the RNG streams")
    with safe_open(os.path.join(path, "weights.safetensors"), "pt") as f:  # names and shapes, no tensors
        stored = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    missing = sorted(set(named_params) - set(stored))
    extra = sorted(set(stored) - set(named_params))
    shapes = sorted(n for n, p in named_params.items() if n in stored and stored[n] != tuple(p.shape))
    if missing or extra or shapes:
        raise CheckpointError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {extra[:3]}, "
                              f"other shape {shapes[:3]}; was it written with another model / LoRA config?)")
    if engine is None and not os.path.isfile(os.path.join(path, "optimizer.pt")):
        raise CheckpointError(f"{path} was written under DeepSpeed (its optimizer state is in {zero.TAG}/, one "
                              "partition per process): resume it under DeepSpeed with the same number of processes")
    if engine is not None and not os.path.isdir(os.path.join(path, zero.TAG)):
        raise CheckpointError(f"{path} was written without DeepSpeed (no {zero.TAG}/), whose optimizer state does "
                              "not load into DeepSpeed's partitions: resume it in the mode that wrote it")
    if engine is not None and not zero.load(engine, path):  # the weights (masters and module copies), optimizer
        raise CheckpointError(f"DeepSpeed could not load {os.path.join(path, zero.TAG)}")
    sharding.reshard(model)
    with torch.no_grad():
        if engine is None:
            weights = load_file(os.path.join(path, "weights.safetensors"))
            for n, p in named_params.items():
                p.copy_(sharding.sharded_like(weights[n], p))
        if ema_shadow is not None:
            ema = load_file(os.path.join(path, "ema.safetensors"))
            for n, s in zip(named_params, ema_shadow):
                s.copy_(sharding.sharded_like(ema[n], s))
    sharded = model is not None
    device = sharding.local(next(iter(named_params.values()))).device
    if engine is None:
        optim_state = {} if sharded and not accelerator.is_main_process else torch.load(
            os.path.join(path, "optimizer.pt"), map_location="cpu" if sharded else device, weights_only=False)
        if sharded and optim_state:  # a checkpoint written without FSDP2 keys the state by index
            optim_state = sharding.name_keyed(optim_state, named_params)
        sharding.load_optimizer_state(model, optimizer, optim_state, sharded)
    lr_scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
    set_rng_state(torch.load(os.path.join(path, f"rng-{accelerator.process_index}.pt"), weights_only=False))
    return state
