"""Ablation arm: every training source drawn equally often (--balance_sources)."""
base = "configs/ablation/base.py"
balance_sources = True
