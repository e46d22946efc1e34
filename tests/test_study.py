"""``grpo-guard demo study``: the analysis (gold at equal proxy, paired t intervals) on synthetic runs, argument
checks, the run locks, and a tiny study end to end that is killed and resumed."""
import csv
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

from grpo_guard.demo import study, study_report  # noqa: E402

T_975 = {2: 4.302652729911275, 3: 3.182446305284263}  # Student-t 0.975 quantiles (printed tables)


def test_t_interval_is_the_student_t_interval():
    x = [1.0, 2.0, 3.0, 4.0]
    sd = math.sqrt(sum((v - 2.5) ** 2 for v in x) / 3)
    mean, lo, hi = study_report.t_interval(x)
    assert mean == 2.5
    assert lo == pytest.approx(2.5 - T_975[3] * sd / 2, rel=1e-12)
    assert hi == pytest.approx(2.5 + T_975[3] * sd / 2, rel=1e-12)


def test_crossing_is_the_first_crossing_linearly_interpolated():
    ev = {0: {"proxy_logit": 5.0, "gold": 1.0}, 10: {"proxy_logit": 6.0, "gold": 0.9},
          20: {"proxy_logit": 8.0, "gold": 0.7}, 30: {"proxy_logit": 7.0, "gold": 0.5}}
    assert study_report.crossing(ev, 7.0) == pytest.approx((15.0, 0.8))  # not step 30, which also has 7.0
    assert study_report.crossing(ev, 4.0) == (0.0, 1.0)
    assert study_report.crossing(ev, 8.0) == pytest.approx((20.0, 0.7))
    assert study_report.crossing(ev, 8.5) is None


def _fake_run(path, proxies, golds, ratio=(1.0, 0.99), grad=(1.0, 4.0)):
    """A finished run as the trainer and the demo write it: eval.json and a 2-step metrics.jsonl."""
    os.makedirs(path)
    evals = {str(10 * i): {"proxy_logit": p, "gold": g, "digit_prob": g, "realism": g}
             for i, (p, g) in enumerate(zip(proxies, golds))}
    with open(os.path.join(path, "eval.json"), "w") as f:
        json.dump({"evals": evals, "wall_s": 1.0}, f)
    ts = [{"index": i, "sigma": 1.0 - 0.3 * i, "ratio_mean": ratio[i], "grad_norm": grad[i], "clipfrac": 0.5}
          for i in range(2)]
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step in (1, 2):
            f.write(json.dumps({"step": step, "updates": [{"timesteps": ts}, {"timesteps": ts}]}) + "\n")


def test_analysis_pairs_seeds_at_the_common_proxy_level(tmp_path):
    """Three seeds x (grpo, guard): P* = min over methods of each run's max proxy; gold at P* interpolated; the
    paired differences and their t interval; one unfinished run leaves its seed out of the statistics."""
    out = str(tmp_path)
    st = {"methods": ["grpo", "guard"], "baseline": "grpo", "rl_seeds": [0, 1, 2, 3], "run": {}}
    rng = np.random.default_rng(0)
    expect = []
    for s in range(3):
        pg = [5.0, 6.0 + s, 9.0]               # grpo reaches 9
        qg = [5.0, 6.5, 7.0 + 0.5 * s]          # guard's max is the level
        gg_ = [1.0, 0.9, 0.6]
        qq = [1.0, *rng.uniform(0.8, 1.0, 2)]
        _fake_run(study.run_dir(out, s, "grpo"), pg, gg_)
        _fake_run(study.run_dir(out, s, "guard"), qg, qq, ratio=(1.0, 1.0), grad=(1.0, 1.5))
        level = max(qg)
        grpo_gold = float(np.interp(level, pg, gg_))  # grpo's proxy is increasing: first crossing = interp
        expect.append(qq[2] - grpo_gold)
    _fake_run(study.run_dir(out, 3, "grpo"), [5.0, 6.0], [1.0, 0.9])  # seed 3: guard never finished
    res = study_report.analyze(out, st)
    assert res["complete"] == [0, 1, 2] and res["missing"] == [(3, "guard")]
    d = [r["value"] for r in res["rows"] if r["section"] == "paired" and r["metric"] == "gold_at_equal_proxy"
         and r["statistic"] == "difference"]
    assert d == pytest.approx(expect, rel=1e-12)
    mean, lo, hi, wins = res["paired"][("guard", "gold_at_equal_proxy")]
    sd = float(np.std(expect, ddof=1))
    half = T_975[2] * sd / math.sqrt(3)
    assert (mean, lo, hi) == pytest.approx((np.mean(expect), np.mean(expect) - half, np.mean(expect) + half), rel=1e-10)
    assert wins == sum(x > 0 for x in expect)
    # the diagnostics: grpo's ratio deviation 0.01 and gradient spread 4, guard's 0 and 1.5; lower is better
    assert res["paired"][("guard", "ratio_mean_dev")][:3] == pytest.approx((-0.01, -0.01, -0.01))
    assert res["paired"][("guard", "grad_spread")][3] == 3


def test_report_numbers_are_in_the_csv(tmp_path):
    out = str(tmp_path)
    st = {"methods": ["grpo", "dppo"], "baseline": "grpo", "rl_seeds": [0, 1], "run": {"eval_every": 10,
                                                                                      "reward_seed": 0}}
    for s in (0, 1):
        _fake_run(study.run_dir(out, s, "grpo"), [5.0, 7.0, 8.0], [1.0, 0.9, 0.8 - 0.01 * s])
        _fake_run(study.run_dir(out, s, "dppo"), [5.0, 6.0, 7.5], [1.0, 0.95, 0.9 + 0.02 * s])
    with open(os.path.join(out, "base.json"), "w") as f:
        json.dump({"raw": {"digit_prob": 0.9, "realism": 0.4, "proxy_logit": 5.0}}, f)
    path = study_report.write(out, st, "test")
    text = open(path).read()
    with open(os.path.join(out, "study.csv")) as f:
        rows = list(csv.DictReader(f))
    primary = next(line for line in text.splitlines() if line.startswith("- Flow-DPPO"))
    mean = next(float(r["value"]) for r in rows if r["section"] == "paired" and r["method"] == "dppo"
                and r["metric"] == "gold_at_equal_proxy" and r["statistic"] == "mean")
    assert f"{mean:.3f}" in primary
    # every number of the tables is a csv value as the report formats it (or a seed / step / count)
    formatted = {study_report._fmt(float(r["value"])) for r in rows}
    table = [line for line in text.split("## Paired differences")[1].split("## Figures")[0].splitlines()
             if line.startswith("| ") and not line.startswith("| metric") and not line.startswith("| seed")]
    import re
    nums = [n for line in table for n in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]\d+)?", line.split("|", 2)[2])]
    assert len(nums) > 40
    assert all(n in formatted or re.fullmatch(r"\d+", n) for n in nums), [n for n in nums if n not in formatted]
    for name in ("study_gold_vs_proxy.png", "study_paired_differences.png", "study_per_timestep.png"):
        assert open(os.path.join(out, name), "rb").read(8) == b"\x89PNG\r\n\x1a\n" and f"({name})" in text


@pytest.mark.parametrize("argv, match", [
    (["--seeds", "1"], "--seeds must be >= 2"),
    (["--methods", "grpo,ppo"], "--methods: unknown method"),
    (["--methods", "guard,dppo"], "--methods must include the baseline 'grpo'"),
    (["--kl-threshold", "0"], "--kl-threshold must be finite and > 0"),
    (["--kl-threshold", "inf"], "--kl-threshold must be finite and > 0"),
    (["--clip-range", "1.5"], "--clip-range must be in"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_arguments_name_the_argument(tmp_path, argv, match):
    with pytest.raises(SystemExit, match=match):
        study.main(["--out", str(tmp_path / "s")] + argv)
    assert not (tmp_path / "s").exists()


def test_locks_are_exclusive_and_a_dead_owner_is_taken_over(tmp_path):
    out = str(tmp_path)
    assert study.claim(out, 0, "grpo")
    assert not study.claim(out, 0, "grpo")  # held by this (living) process
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(os.path.join(out, "runs", "s1"))
    with open(study.run_dir(out, 1, "grpo") + ".lock", "w") as f:
        f.write(f"{socket.gethostname()} {dead.pid}")
    assert study.claim(out, 1, "grpo")
    os.makedirs(os.path.join(out, "runs", "s2"))
    with open(study.run_dir(out, 2, "grpo") + ".lock", "w") as f:
        f.write(f"another-host {os.getpid()}")  # another machine's process: never taken over
    assert not study.claim(out, 2, "grpo")


def test_a_study_refuses_other_settings(tmp_path):
    args = ["--out", str(tmp_path), "--steps", "1", "--seeds", "2", "--report-only"]
    study.main(args + ["--methods", "grpo,guard"])
    with pytest.raises(SystemExit, match=r"other settings \(run.steps\)"):
        study.main(["--out", str(tmp_path), "--steps", "2", "--seeds", "2", "--methods", "grpo,guard",
                    "--report-only"])


@pytest.mark.slow
def test_study_end_to_end_killed_and_resumed(tmp_path):
    """2 seeds x (grpo, guard) x 1 step; then one run is 'killed' (its eval.json gone, a partial file and a dead
    owner's lock left): the resumed study reruns exactly that run, which comes out identical (runs are
    deterministic), and the report covers both seeds."""
    n = torch.get_num_threads()
    out = tmp_path / "st"
    args = ["--out", str(out), "--seeds", "2", "--steps", "1", "--eval-every", "1", "--methods", "grpo,guard",
            "--workers", "1"]
    try:
        study.main(args)
        victim = out / "runs" / "s1" / "guard"
        before = json.loads((victim / "eval.json").read_text())["evals"]
        mtimes = {p: (out / "runs" / p / "eval.json").stat().st_mtime_ns for p in ("s0/grpo", "s0/guard", "s1/grpo")}
        (victim / "eval.json").unlink()
        (victim / "partial.tmp").write_text("x")
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (out / "runs" / "s1" / "guard.lock").write_text(f"{socket.gethostname()} {dead.pid}")
        study.main(args)
    finally:
        torch.set_num_threads(n)
    assert json.loads((victim / "eval.json").read_text())["evals"] == before
    assert not (victim / "partial.tmp").exists() and not (out / "runs" / "s1" / "guard.lock").exists()
    assert {p: (out / "runs" / p / "eval.json").stat().st_mtime_ns for p in mtimes} == mtimes
    text = (out / "STUDY.md").read_text()
    assert "seeds with every run finished: 2 of 2" in text and "partial" not in text
