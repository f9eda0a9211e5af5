"""NAMM training: evolve the policy of the `namm` attention kind for a frozen model.

`evolve.py` runs CMA-ES over the policy's flat parameters (`longcpt namm train RECIPE`), scoring
candidates on the fitness tasks of `longcpt.data.fitness` ((prompt, answer) examples built from
this project's task generators).
"""
