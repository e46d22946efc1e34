"""``grpo-guard demo study``: a paired multi-seed comparison of the RL methods on the demo's miniature.

    grpo-guard demo study --out runs/study                    # grpo, guard, dppo; 6 seeds x 150 steps, clip 2e-6
    grpo-guard demo study --out runs/study                    # again after a kill: continues where it stopped
    grpo-guard demo study --out runs/study --report-only      # STUDY.md from the runs finished so far

Design (fixed here, before any run; see :mod:`grpo_guard.demo.study_report` for the analysis):

- The reward models and the evaluation set are fixed by ``--reward-seed``; RL seed ``k`` (``--first-seed`` +
  0..``--seeds``-1) changes only the RL noise: LoRA initialisation, prompts, rollout noise. Every method of a seed
  starts from the same state with the same noise, so the methods are compared in pairs, seed by seed.
- Primary metric: **gold at equal proxy** (``study_report.EQUAL_PROXY``), paired difference method - ``grpo``,
  mean and two-sided 95 % Student-t interval over seeds.
- Each (seed, method) run is its own trainer run under ``<out>/runs/s<seed>/<method>/`` (metrics.jsonl,
  eval.json, TensorBoard). A run is finished when its eval.json exists; a run is claimed with an exclusive lock
  file, so several workers (``--workers``) or several invocations share one study; a killed run restarts from
  its beginning (runs are deterministic: the rerun is the run that was lost).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import shutil
import socket
import sys
import time
from typing import Dict, List, Tuple

METHODS = ("grpo", "mean_revised", "ratio_norm", "guard", "dppo")
BASELINE = "grpo"
DEFAULTS = {"methods": "grpo,guard,dppo", "seeds": 6, "steps": 150, "clip_range": 2e-6}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grpo-guard demo study", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--out", required=True, help="the study's folder (created; an existing study there is resumed)")
    p.add_argument("--methods", default=DEFAULTS["methods"],
                   help=f"comma-separated, from {', '.join(METHODS)}; must include the baseline {BASELINE!r}")
    p.add_argument("--seeds", type=int, default=DEFAULTS["seeds"], help="number of RL seeds (>= 2)")
    p.add_argument("--first-seed", type=int, default=0, help="RL seeds are first-seed .. first-seed + seeds - 1")
    p.add_argument("--reward-seed", type=int, default=0, help="fits the reward models, draws the evaluation set")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="training steps per run")
    p.add_argument("--clip-range", type=float, default=DEFAULTS["clip_range"],
                   help="clip range of the clipped methods (default 2e-6, GRPO-Guard's published one)")
    p.add_argument("--kl-threshold", type=float, default=1e-5, help="dppo's KL threshold (Flow-DPPO's default)")
    p.add_argument("--eval-every", type=int, default=10, help="evaluate the fixed set every k steps")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs in parallel, one CPU thread each (default: min(2, CPU cores))")
    p.add_argument("--weights", help="base weights (.safetensors; default: the shipped ones)")
    p.add_argument("--report-only", action="store_true", help="write STUDY.md from the finished runs, train nothing")
    return p


def settings_from_args(args) -> Dict:
    """The study's settings as a JSON-able dict; raises SystemExit naming a bad argument."""
    from . import experiment as ex

    def bad(msg):
        raise SystemExit(f"grpo-guard demo study: {msg}")

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        bad(f"--methods: unknown method(s) {', '.join(map(repr, unknown))}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        bad(f"--methods lists a method twice: {args.methods!r}")
    if BASELINE not in methods or len(methods) < 2:
        bad(f"--methods must include the baseline {BASELINE!r} and at least one other method, got {args.methods!r}")
    if args.seeds < 2:
        bad(f"--seeds must be >= 2 (a paired interval needs two seeds), got {args.seeds}")
    if args.first_seed < 0 or args.reward_seed < 0:
        bad("--first-seed and --reward-seed must be >= 0")
    if args.steps < 1:
        bad(f"--steps must be >= 1, got {args.steps}")
    if args.eval_every < 1:
        bad(f"--eval-every must be >= 1, got {args.eval_every}")
    if not 0 < args.clip_range < 1:
        bad(f"--clip-range must be in (0, 1), got {args.clip_range}")
    if not (math.isfinite(args.kl_threshold) and args.kl_threshold > 0):
        bad(f"--kl-threshold must be finite and > 0, got {args.kl_threshold}")
    if args.workers < 1:
        bad(f"--workers must be >= 1, got {args.workers}")
    base = ex.Settings()
    run = dataclasses.replace(base, steps=args.steps, reward_seed=args.reward_seed, clip_range=args.clip_range,
                              kl_threshold=args.kl_threshold, eval_every=args.eval_every, methods=methods,
                              weights=args.weights or base.weights)
    return {"methods": methods, "baseline": BASELINE, "rl_seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
            "run": dataclasses.asdict(run)}


def _settings(study: Dict, seed: int):
    from . import experiment as ex

    return dataclasses.replace(ex.Settings(**study["run"]), seed=seed)


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _start(out: str, study: Dict) -> None:
    """Create the study's folder and study.json, or check that an existing one has the same settings."""
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    path = os.path.join(out, "study.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != json.loads(json.dumps(study)):
            diff = sorted(k for k in set(old) | set(study) if k != "run" and old.get(k) != study.get(k))
            diff += sorted(f"run.{k}" for k in set(old.get("run", {})) | set(study["run"])
                           if old.get("run", {}).get(k) != study["run"].get(k))
            raise SystemExit(f"grpo-guard demo study: {out} holds a study with other settings ({', '.join(diff)}); "
                             "resume it with its own settings or choose another --out")
    else:
        _write_json(path, study)


def base_eval(out: str, study: Dict) -> Dict:
    """The base model on the evaluation set (the gold normalizers), computed once per study (base.json)."""
    from . import experiment as ex

    path = os.path.join(out, "base.json")
    if not os.path.exists(path):
        b = ex.base_eval(_settings(study, study["rl_seeds"][0]))  # independent of the RL seed
        _write_json(path, {k: b[k] for k in ("raw", "scores", "scales")})
    with open(path) as f:
        return json.load(f)


def run_dir(out: str, seed: int, method: str) -> str:
    return os.path.join(out, "runs", f"s{seed}", method)


def finished(out: str, seed: int, method: str) -> bool:
    return os.path.exists(os.path.join(run_dir(out, seed, method), "eval.json"))


def _alive(owner: str) -> bool:
    """Whether the lock's owner ("host pid") may still be running (another host's owner: assumed alive)."""
    try:
        host, pid = owner.split()
        if host != socket.gethostname():
            return True
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        return True
    return True


def claim(out: str, seed: int, method: str) -> bool:
    """Take the run's lock (exclusive create); a lock whose process is gone is taken over. True if ours."""
    lock = run_dir(out, seed, method) + ".lock"
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(lock) as f:
                    owner = f.read()
            except FileNotFoundError:
                continue
            if _alive(owner):
                return False
            try:
                os.remove(lock)  # stale: its process died
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}")
        return True
    return False


def _release(out: str, seed: int, method: str) -> None:
    try:
        os.remove(run_dir(out, seed, method) + ".lock")
    except FileNotFoundError:
        pass


def plan(study: Dict) -> List[Tuple[int, str]]:
    """Seed-major order, so that whole seeds (pairs) finish first."""
    return [(seed, m) for seed in study["rl_seeds"] for m in study["methods"]]


def run_one(out: str, study: Dict, seed: int, method: str, scales: Dict[str, float]) -> Dict:
    """Train one (seed, method) run from its beginning (a partial folder left by a killed run is removed)."""
    from . import experiment as ex

    d = run_dir(out, seed, method)
    if os.path.exists(d):
        shutil.rmtree(d)
    parent = os.path.dirname(d)
    r = ex.run_method(_settings(study, seed), method, parent, scales, progress=False)
    return r


def worker(out: str, study: Dict, scales: Dict[str, float]) -> int:
    """Run every unfinished, unclaimed run of the plan; returns how many this worker ran."""
    import torch

    torch.set_num_threads(1)
    done = 0
    for seed, method in plan(study):
        if finished(out, seed, method) or not claim(out, seed, method):
            continue
        try:
            if finished(out, seed, method):  # finished between the check and the claim
                continue
            r = run_one(out, study, seed, method, scales)
            f = r["evals"][max(r["evals"])]
            print(f"[seed {seed} {method}] proxy {f['proxy_logit']:.3f}, gold {f['gold']:.3f} ({r['wall_s']:.0f} s)",
                  flush=True)
            done += 1
        finally:
            _release(out, seed, method)
    return done


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    study = settings_from_args(args)
    out = args.out
    _start(out, study)
    todo = [(s, m) for s, m in plan(study) if not finished(out, s, m)]
    import torch

    torch.set_num_threads(1)
    scales = base_eval(out, study)["scales"]  # the report needs it too
    if not args.report_only and todo:
        t0 = time.perf_counter()
        n = min(args.workers, len(todo))
        print(f"grpo-guard demo study: {len(todo)} of {len(plan(study))} runs to do "
              f"({', '.join(study['methods'])} x seeds {study['rl_seeds'][0]}..{study['rl_seeds'][-1]}, "
              f"{study['run']['steps']} steps), {n} worker(s) -> {out}", flush=True)
        if n == 1:
            worker(out, study, scales)
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(n) as pool:
                pool.starmap(worker, [(out, study, scales)] * n)
        print(f"runs done in {time.perf_counter() - t0:.0f} s", flush=True)
    from . import study_report

    path = study_report.write(out, study, command="grpo-guard demo study " + " ".join(argv if argv is not None
                                                                                       else sys.argv[1:]))
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
