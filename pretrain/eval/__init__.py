"""Evaluation of a checkpoint: needle-in-a-haystack retrieval (niah.py), perplexity (ppl.py), HumanEval
(humaneval.py) and single-line infilling (infilling.py), the last two through completion.py and code_eval.py,
with model-written programs run in sandbox.py."""
