"""The shipped ResNet18-UNet (checkpoints/busi_unet_resnet18.safetensors), stage 1 of 3: the original recipe's
network (ResNet18, no pretrained weights, pixel-wise BCE) on BUSI at 128x128 with 2x expansion and Adam, the
original 7x / 200-epoch schedule not fitting a CPU session. Stopped by hand after 38 of 60 planned epochs (the
plateau schedule does not depend on the planned total, so 38 reproduces it). bf16 autocast on a CPU with AMX."""
base = "configs/original.py"
split_file = "checkpoints/busi_split.json"
out_dir = "runs/resnet18_stage1"
image_size = 128
expand = 2
epochs = 38
optimizer = "adam"
lr = 0.001
lr_patience = 4
cpu_bf16 = True
