"""`python -m longcpt.eval.harness ARGS`: the harness's own command line (`lm_eval ARGS`) with the
`longcpt` backend registered.

lm-evaluation-harness 0.4.13 finds a model in its own table (`lm_eval.models.MODEL_MAPPING`) or
among classes registered by modules already imported; it reads no plugin entry points, so a plain
`lm_eval --model longcpt` cannot see this backend. Importing it first and handing the arguments to
`lm_eval`'s entry point unchanged gives every flag of the harness:

    python -m longcpt.eval.harness --model longcpt \
        --model_args '{"pretrained": "runs/cpt/hf", "attention": "infllm", "max_length": 32768}' \
        --tasks longbench_hotpotqa --output_path out/ --log_samples
"""

from lm_eval.__main__ import cli_evaluate

from longcpt.eval.harness import backend  # noqa: F401  (registers the model name "longcpt")

if __name__ == "__main__":
    cli_evaluate()
