"""Evaluation of a checkpoint: needle-in-a-haystack retrieval (niah.py) and perplexity (ppl.py)."""
