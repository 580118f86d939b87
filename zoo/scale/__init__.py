"""Scale-out: hidden-state store, block-wise attention transfer over torch.distributed, FSDP2 LoRA, `zoo
plan`."""
