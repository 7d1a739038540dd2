"""Ablation arm: the two largest single levers together: 160 px and EfficientNet-Lite2 (compare with size160 and lite2)."""
base = "configs/ablation/size160.py"
encoder = "efficientnet-lite2"
