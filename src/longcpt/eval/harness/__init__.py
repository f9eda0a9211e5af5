"""EleutherAI's lm-evaluation-harness on longcpt models: the backend `longcpt` (backend.py), the
`longcpt eval harness` command (command.py) and `python -m longcpt.eval.harness`, the harness's own
command line with that backend registered (__main__.py). docs/evaluation.md shows how to use them.
"""
