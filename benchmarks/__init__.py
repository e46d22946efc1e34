"""Benchmarks of grpo_guard's ops (not part of the installed package; run from a checkout)."""
