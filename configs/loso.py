"""The leave-one-source-out recipe at full budget: python loso.py configs/loso.py (each fold about 30 min on 2 cores).

For now the ablation baseline (configs/ablation/base.py: EfficientNet-Lite0, BCE + soft Dice of the union of the
lesion channels, scanner augmentation, AdamW one-cycle) at the size and length of the run that reached 0.735 on
BUS-UCLM when trained on BUSI + BUS-BRA: 160 px, 20,000 draws. The arms that beat the baseline on the mean over
both ablation folds (checkpoints/ablation.md) are to be added here, one line each, before the long runs.
"""
base = "configs/ablation/base.py"
image_size = 160
epochs = 10
draws_per_epoch = 2000
