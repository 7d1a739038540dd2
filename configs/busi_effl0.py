"""The BUSI-only EfficientNet-Lite0 model (checkpoints/busi_unet_efficientnet_lite0.safetensors): ImageNet
encoder, classification head (weight 0.3), BCE + SMP's per-channel soft Dice, scanner augmentation, 192x192,
25 epochs of 2x expansion, AdamW 3e-4 one-cycle, on the grouped BUSI split. 67 min on 2 cores (fp32)."""
data_dir = "data/BUSI"
split_file = "checkpoints/busi_split_grouped.json"
out_dir = "runs/busi_effl0"
encoder = "efficientnet-lite0"
encoder_weights = "imagenet"
head = True
head_weight = 0.3
loss = "bce+dice"
augment = "scanner"
image_size = 192
expand = 2
epochs = 25
optimizer = "adamw"
lr = 0.0003
weight_decay = 0.01
lr_schedule = "onecycle"
num_threads = 2
progress = False
