"""Floor 1, the network: the decoder (minialign.models.decoder), LoRA adapters, the Hugging Face weight
mapping, and the CPU decode fast path. Imports nothing else of minialign.
"""
