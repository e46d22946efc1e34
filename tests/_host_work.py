"""Tools to see what the op wrappers do on the host (not a test module): the torch ops they dispatch, the ops
that would synchronize a GPU with the host, and the kernel launches (with the Triton interpreter's own host work
hidden, since on a GPU that work does not exist)."""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# ops whose result the host must read (a device-to-host copy and a wait for the queue on a GPU)
SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.allclose",
            "aten.nonzero", "aten.nonzero_static", "aten.masked_select", "aten.unique", "aten._unique",
            "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.repeat_interleave",
            "aten._assert_async"}


class OpLog(TorchDispatchMode):
    """Records the overload packet of every torch op dispatched while active, and the ones in SYNC_OPS (with a
    device-to-CPU copy counted as one)."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops.append(name)
        kwargs = kwargs or {}
        if name in SYNC_OPS:
            self.syncs.append(name)
        elif name in ("aten._to_copy", "aten.copy_", "aten.to"):
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            dst = kwargs.get("device")
            if src is not None and src.device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu":
                self.syncs.append(f"{name} to cpu")
        return func(*args, **kwargs)


def hide_kernel_host_work(monkeypatch, modules, counter=None):
    """Replace every ``*_kernel`` of ``modules`` by a proxy that launches it with the dispatch modes paused (the
    Triton interpreter copies tensors to numpy on the host; a compiled launch does not) and counts launches in
    ``counter["launches"]`` if a dict is given."""
    for mod in modules:
        for name in [n for n in dir(mod) if n.endswith("_kernel")]:
            kernel = getattr(mod, name)

            class Proxy:
                def __init__(self, k):
                    self.k = k

                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        if counter is not None:
                            counter["launches"] = counter.get("launches", 0) + 1
                        with _disable_current_modes():
                            return self.k[grid](*args, **kwargs)
                    return launch
            monkeypatch.setattr(mod, name, Proxy(kernel))


@contextlib.contextmanager
def cuda_sync_errors(device):
    """On CUDA: any host-device synchronization inside the block raises (torch.cuda.set_sync_debug_mode)."""
    if torch.device(device).type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
