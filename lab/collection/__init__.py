"""The real collection: LoRA adapters trained on the real demo base for tasks with ground truth."""
