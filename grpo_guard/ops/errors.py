"""Checks of per-sample values that live on the device, without a host-device synchronization.

The ops check what the host knows (shapes, dtypes, devices, Python-number sigmas) at once. Values in device
tensors (tensor sigmas, advantages, old log-probs, rewards) are checked on the device: an invalid value makes
the affected outputs NaN (so a trainer's non-finite check never applies them) and sets a bit in a per-device
int32 *error word*; :func:`check_errors` reads the word (one synchronization: call it where the loop already
synchronizes, e.g. once per optimizer step, as the trainer does) and raises :class:`InvalidInputError` naming
the op, the argument and the rule. ``validate="sync"`` checks those values synchronously at each call instead
(debugging); ``validate=False`` checks nothing on the device.

The Triton kernels set the bits themselves, in the program that finishes each row (no extra launch); the torch
and cuda backends set them with a few elementwise torch ops (:func:`failed`). Bit layout: ``BITS``, one place.

On a CPU there is no device queue to wait for: the values of plain CPU tensors are read in place on the host
(:func:`host_values`, numpy views, no copy) and the torch ops run only when a value fails, so a valid call costs
a few numpy comparisons instead of 6-21 torch ops (``HOST_READS_ON_CPU``; never under torch.compile). The rules
are written once and applied to either (``requests.per_sample_oks``).
"""
from __future__ import annotations

import math
import sys
from typing import Dict, List, Tuple

import torch

#: (op, argument, rule) for each bit of the error word, in bit order. The Triton kernels index this layout by
#: op-relative offsets: sde_step from ``SDE_STEP`` (+0 sigma, +1 sigma_next), policy_loss from ``POLICY_LOSS``
#: (+0 sigma, +1 sigma_next, +2 sigma_next for cps with a normalized ratio, +3 advantages, +4 old_log_prob).
CHECKS: Tuple[Tuple[str, str, str], ...] = (
    ("sde_step", "sigma", "must lie in (0, 1]"),
    ("sde_step", "sigma_next", "must be finite, >= 0 and < sigma"),
    ("policy_loss", "sigma", "must lie in (0, 1]"),
    ("policy_loss", "sigma_next", "must be finite, >= 0 and < sigma"),
    ("policy_loss", "sigma_next", "must be > 0 for cps dynamics with method ratio_norm or guard (the transition "
                                  "std is 0 at sigma_next == 0: do not train the last step)"),
    ("policy_loss", "advantages", "must be finite"),
    ("policy_loss", "old_log_prob", "must be finite"),
    ("group_advantages", "rewards", "must be finite"),
)
BITS: Dict[Tuple[str, str, str], int] = {c: 1 << i for i, c in enumerate(CHECKS)}
SDE_STEP = 0      # bit offset of sde_step's checks
POLICY_LOSS = 2   # bit offset of policy_loss's checks
GROUP_ADVANTAGES = 7

VALIDATE_MODES = (True, False, "sync")

#: CPU tensors: check per-sample values on the host first (:func:`host_values`). False: always the torch ops, as
#: on a GPU (the no-sync tests set it, to see on a CPU the path a GPU takes).
HOST_READS_ON_CPU = True
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


class InvalidInputError(ValueError):
    """Per-sample inputs that failed a device-side check; the message names each op, argument and rule."""


_WORDS: Dict[Tuple[str, int], torch.Tensor] = {}


def _key(device) -> Tuple[str, int]:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device.type, -1 if device.index is None else device.index


def word(device) -> torch.Tensor:
    """The error word of ``device``: an int32 tensor (1,), zero until a check fails."""
    key = _key(device)
    w = _WORDS.get(key)
    if w is None:
        w = _WORDS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return w


def bit(op: str, argument: str, rule_index: int = 0) -> int:
    """The bit of the ``rule_index``-th check of (op, argument)."""
    return [b for (o, a, _), b in BITS.items() if o == op and a == argument][rule_index]


def failed(offset: int, oks):
    """The error bits of checks offset, offset + 1, ...: bit ``offset + k`` is set unless ``oks[k]`` (a bool
    tensor, True where the value passed; None: not checked) is True everywhere. -> an int64 0-dim tensor, or None
    if nothing was checked. Elementwise ops only (each ``ok * bit``, then one min over the samples and one sum; a
    single check: ``bit - ok.all() * bit``): no host synchronization and no host-to-device copy, so it also runs
    under CUDA-graph capture and torch.compile."""
    terms = [(ok, 1 << (offset + k)) for k, ok in enumerate(oks) if ok is not None]
    if not terms:
        return None
    if len(terms) == 1:
        ok, b = terms[0]
        return b - ok.all() * b
    return sum(b for _, b in terms) - torch.stack([ok * b for ok, b in terms]).amin(1).sum()


def record(code: torch.Tensor, device) -> None:
    """word |= code (an integer tensor of shape () or (1,)), on the device."""
    word(device).bitwise_or_(code)


def flag(offset: int, oks, device) -> None:
    """Record :func:`failed` of ``oks`` in ``device``'s error word (nothing if no check was made)."""
    code = failed(offset, oks)
    if code is not None:
        record(code, device)


def finite(t):
    """True where a value is finite (NaN and +-inf fail): a tensor, or a numpy array read on the host."""
    return abs(t) < math.inf


def _tracing() -> bool:
    """A graph is being recorded from real tensors (make_fx, torch.jit.trace): a host decision would be baked into
    it, so the checks must be ops of the graph."""
    if torch.jit.is_tracing():
        return True
    proxy = sys.modules.get("torch.fx.experimental.proxy_tensor")  # not imported: nothing traces with it
    return proxy is not None and proxy.get_proxy_mode() is not None


def host_values(tensors: Dict[str, torch.Tensor]):
    """``{name: numpy view}`` of ``tensors`` when their values can be read on the host at no cost: plain CPU tensors
    (no subclass such as FakeTensor, no torch.func wrapper of vmap / grad / functionalize) of a dtype numpy has,
    ``HOST_READS_ON_CPU`` set, not under torch.compile nor while make_fx / torch.jit.trace record a graph. Else None
    (check them with torch ops). No copy: a view shares the tensor's memory."""
    if not HOST_READS_ON_CPU or torch.compiler.is_compiling() or _tracing():
        return None
    for t in tensors.values():
        if (type(t) is not torch.Tensor or t.device.type != "cpu" or t.dtype not in _NUMPY_DTYPES
                or t.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(t)):
            return None
    try:
        return {name: t.numpy() for name, t in tensors.items()}
    except (RuntimeError, TypeError):  # a tensor numpy cannot view (e.g. one with a negative bit): torch ops
        return None


def passes_on_host(tensors: Dict[str, torch.Tensor], rules) -> bool:
    """True if ``tensors`` can be read on the host (:func:`host_values`) and every check of ``rules(values)`` (a
    list of boolean arrays, None: not checked) holds for every sample: the device-side torch ops can be skipped.
    False: make them (they also find which samples failed)."""
    host = host_values(tensors)
    return host is not None and all(ok is None or ok.all() for ok in rules(host))


def messages(value: int) -> List[str]:
    """The rules a word value says were broken, as 'op: argument rule' lines."""
    return [f"{op}: {arg} {rule}" for (op, arg, rule), b in BITS.items() if value & b]


def check_errors(device=None) -> None:
    """Raise :class:`InvalidInputError` if a device-side check failed since the last call on ``device`` (every
    device with an error word if None), then clear the word. One host-device synchronization per device."""
    keys = list(_WORDS) if device is None else [_key(device)]
    found = []
    for key in keys:
        w = _WORDS.get(key)
        if w is None:
            continue
        value = int(w.item())
        if value:
            w.zero_()
            found += [f"{line} (on {key[0]}{'' if key[0] == 'cpu' else ':' + str(key[1])})"
                      for line in messages(value)]
    if found:
        raise InvalidInputError("invalid per-sample inputs were given to grpo_guard ops since the last check "
                                "(their outputs were NaN):\n  " + "\n  ".join(found))
