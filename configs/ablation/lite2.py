"""Ablation arm: EfficientNet-Lite2 (ImageNet) encoder instead of Lite0."""
base = "configs/ablation/base.py"
encoder = "efficientnet-lite2"
