"""Drop-in signatures of other trainers (flow_grpo)."""
