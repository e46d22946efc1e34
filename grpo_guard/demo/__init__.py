"""``grpo-guard demo``: implicit over-optimization and GRPO-Guard's cure, in miniature, on a CPU, offline.

A tiny diffusers ``SD3Transformer2DModel`` generates scikit-learn's 8x8 handwritten digits from prompts such
as "a handwritten 7" (:mod:`.model`, weights shipped in ``assets/``, re-created by :mod:`.pretrain`). The
trainer fine-tunes it against an exploitable proxy reward while two gold rewards that are never optimized
are logged (:mod:`.rewards`); :mod:`.experiment` runs Flow-GRPO and GRPO-Guard with identical settings, and
:mod:`.figures` / :mod:`.report` write the PNGs and REPORT.md.
"""
