"""Offline corpus tools: tokenizer training, cleaning, deduplication, tokenization
into Megatron .bin/.idx files, merging and inspection.

The file format itself lives in megagpt.data.indexed so that training shares it.
"""
