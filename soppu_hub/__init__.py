"""soppu-hub: compress LoRA adapters jointly, push them to the Hub, serve them through LoRAX."""

__version__ = "0.1.0"
