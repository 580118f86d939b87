"""The one engine: attention transfer (stage 1) and LoRA (stage 2)."""
