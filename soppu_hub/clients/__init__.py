"""Chat clients for serving backends (LoRAX REST, OpenAI-compatible /v1) behind one interface."""
