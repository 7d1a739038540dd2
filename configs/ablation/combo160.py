"""Ablation arm: the arms that beat the baseline, together: 160 px, Lite2, recipe augmentation, balanced sources, one class-agnostic channel + head 0.1.

Built on size160.py (the best single arm); adds lite2.py, aug_recipe.py, balance.py and one_channel.py (which
builds on head01.py). Compare with size160: if the sum is not better, the long runs take the single best change.
"""
base = "configs/ablation/size160.py"
encoder = "efficientnet-lite2"
augment = "recipe"
balance_sources = True
head = True
head_weight = 0.1
class_agnostic = True
