"""Decoding loops for methods that change how tokens are chosen, run through `generate(custom_generate=...)`."""
