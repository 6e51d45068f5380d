"""Floor 2, data: tokenizers (ours and Hugging Face tokenizer.json), the file formats every stage reads,
and tokenizing / batching. Imports only minialign.models.
"""
