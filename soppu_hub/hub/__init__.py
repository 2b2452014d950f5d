"""All Hub traffic, through huggingface_hub: pull (sources, adapters, models), push (one commit per repo), info.

So HF_ENDPOINT, HF_TOKEN / `hf auth login`, the cache and private repos work as they do for any Hub tool. Tokens
are never put into messages. Nothing else in soppu_hub calls the Hub.
"""
