"""What a rollout stores per sample (image or video), as arithmetic from the latent shape: the table in
configs/README.md ("What is stored per trained step") is this module's output (``python -m
grpo_guard.trainer.memory``; a test checks that the README holds exactly it, and the trainer's own count
``stored_mib`` against :func:`trajectory_bytes`).

Per sample and trained step j: x_j (latent dtype) and v_old_j (compute dtype); once per sample the latent after
the last trained step, and the prompt embeddings (SD3's negative prompt, and Wan's, are encoded once and shared).
"""
from __future__ import annotations

from math import prod
from typing import List, NamedTuple, Tuple


class Shape(NamedTuple):
    name: str
    latent: Tuple[int, ...]   # one sample's latent as stored (C, H, W) or (C, F', H, W)
    trained: int              # trained steps K of the published-style recipe
    tokens: int               # prompt embedding tokens x width 4096 per sample


SHAPES: List[Shape] = [
    Shape("SD3.5-M 512 px, 10 steps", (16, 64, 64), 9, 77 + 128),
    Shape("Flux 1024 px (SD3.5 at 1024 px: same latents)", (16, 128, 128), 9, 512),
    Shape("Wan 2.1 240 x 416, 33 frames, 20 steps", (16, 9, 30, 52), 19, 512),
    Shape("Wan 2.1 480 x 832, 33 frames", (16, 9, 60, 104), 19, 512),
    Shape("Wan 2.1 480 x 832, 81 frames", (16, 21, 60, 104), 19, 512),
]


def trajectory_bytes(numel: int, trained: int, latent_bytes: int, compute_bytes: int) -> int:
    """Bytes of one sample's stored trajectory: K + 1 latents and K velocities of ``numel`` elements."""
    return (trained + 1) * numel * latent_bytes + trained * numel * compute_bytes


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:,.2f} MiB" if n < 10 * 2 ** 20 else f"{n / 2 ** 20:,.1f} MiB"


def table() -> str:
    """The markdown table of :data:`SHAPES`: bf16 everywhere, and flow_grpo's precision (float32 latents, a
    16-bit velocity)."""
    rows = ["| shape (K trained steps) | latent elements D | per trained step, bf16 | per trained step, fp32 "
            "latents + 16-bit velocity | whole trajectory (K steps + final latent), bf16 / fp32 + 16-bit | "
            "prompt embeddings, bf16 |",
            "|---|---|---|---|---|---|"]
    for s in SHAPES:
        D = prod(s.latent)
        rows.append(f"| {s.name} (K = {s.trained}) | {D:,} = {' x '.join(map(str, s.latent))} | {_mib(4 * D)} | "
                    f"{_mib(6 * D)} | {_mib(trajectory_bytes(D, s.trained, 2, 2))} / "
                    f"{_mib(trajectory_bytes(D, s.trained, 4, 2))} | {_mib(s.tokens * 4096 * 2)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
