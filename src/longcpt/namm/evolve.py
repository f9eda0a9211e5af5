"""`longcpt namm train RECIPE [key=value ...]`: evolve a NAMM with CMA-ES for a frozen model.

    longcpt namm train recipes/namm_passkey_tiny.yaml namm.generations=40

The model (`model.pretrained`) never changes; only the NAMM's flat parameter vector (a few
thousand numbers, `longcpt.model.attention.namm`) evolves, because keep/evict has no gradient.

One generation g:
  1. A fresh sample of examples, draw g of the fitness tasks (`longcpt.data.fitness`): the
     reference resamples its prompts every step, so the population is never tuned to a fixed set.
     The all-zero policy (it keeps every token: the full cache) reads them first; its answer
     probabilities are the references and the examples it gets wrong are left out (they carry no
     signal).
  2. CMA-ES proposes `namm.population` parameter vectors (random numbers seeded by the recipe's
     seed and the generation number, so a resumed run draws the same ones). Worker processes score
     them: every example is read through the `namm` kind, prompt then answer (teacher forcing); an
     example's score is the answer's geometric-mean token probability divided by the full cache's.
     A member's fitness is the mean over tasks of its mean example ratio, minus
     `namm.cache_weight` x the share of the KV cache it held through the prompts (`kv_kept_mean`:
     a policy cannot keep everything until the last update and still look small).
  3. CMA-ES updates its mean from the better half of the population (`cmaes`, elite ratio 0.5).
  4. The CMA-ES mean (the reference's prefer_mean_to_best) is scored on the validation draw, fixed
     and never drawn for training; `policy.pt` is the mean with the best validation fitness so
     far. The optimiser state goes to `out_dir/namm/es_state` and then the policy to
     `out_dir/namm/policy.pt`, each atomically; the fitness curve to `fitness.png`; metrics to the
     CSV/TensorBoard logs under `out_dir/namm/logs`.
Launching the same command again resumes after the last completed generation and gives the same
result as an uninterrupted run (tests/namm/test_evolve.py kills a run with SIGKILL).

Before generation 0 the all-zero policy reads the validation draw: its reference scores, the
examples it answers, and the mean and standard deviation of the spectrogram features it sees at
every update (every layer, head and valid token) become the policy's fixed feature normalisation.
It runs where the trainer would (`trainer.accelerator`: the first GPU unless `cpu`).

Optimiser: `cmaes` (CyberAgent's, the library behind Optuna's CMA-ES sampler): small, numpy
only, ask/tell, picklable. `namm.covariance: full` (`cmaes.CMA`) is the reference's full
covariance with its recombination weights (positive and active negative ones); `diagonal` (the
default) is sep-CMA-ES, linear in the number of parameters, whose weights are the positive ones
only. A full eigendecomposition of the 4,172 x 4,172 covariance per generation takes minutes on a
small CPU.

Workers: `namm.workers` processes (0 = one per GPU, else one per CPU core), each with the model
loaded once; on GPUs each worker owns one device.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import multiprocessing
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longcpt.config import load_config, validate
from longcpt.data.fitness import VALIDATION, Example, build_examples
from longcpt.errors import ConfigError, LongcptError
from longcpt.model.attention.namm import NammPolicy, NammSpec, load_policy
from longcpt.namm.config import NammRecipe

NAMM_DIR = "namm"
ES_STATE = "es_state"
POLICY = "policy.pt"
STATE_VERSION = 2


# ----------------------------------------------------------------------------------------------
# Scoring candidate policies (in each worker process).


class PolicyScorer:
    """A frozen model run as `namm` with a policy whose parameters are swapped per candidate.

    Args:
        model_dir: the HF folder of the frozen model.
        spec: the NAMM architecture.
        feature_mean, feature_std: the policy's feature normalisation.
        device: where the model runs.
    """

    def __init__(self, model_dir: str, spec: NammSpec, feature_mean: torch.Tensor, feature_std: torch.Tensor,
                 device: str = "cpu"):
        from longcpt.model import from_pretrained

        self.policy = NammPolicy.zeros(spec)
        self.policy.feature_mean, self.policy.feature_std = feature_mean.clone(), feature_std.clone()
        self.policy.to_(device)
        self.model = from_pretrained(model_dir, attention="namm", policy=self.policy, dtype=torch.float32)
        self.model = self.model.to(device).eval()
        self.device = device

    @torch.inference_mode()
    def run(self, params: np.ndarray | None, examples: list[Example], collect_features: bool = False) -> dict[str, Any]:
        """Score one parameter vector (None: the all-zero policy, i.e. the full cache) on `examples`.

        Returns:
            {"scores": per-example geometric-mean answer probability, "correct": per-example
            greedy answer right, "kv_kept", "kv_kept_mean", "kv_peak": the cache held at the end,
            through the sequence and at its largest (`cache_use`), mean over examples, and with
            `collect_features` the feature sums "sum", "sumsq", "count" over every update}.
        """
        from longcpt.model.generation import cache_use, mean_cache_use

        flat = torch.zeros(self.policy.params.shape) if params is None else torch.as_tensor(params, dtype=torch.float32)
        self.policy.params.copy_(flat)
        self.policy.feature_sums = {} if collect_features else None
        scores, correct, uses = [0.0] * len(examples), [False] * len(examples), []
        groups: dict[tuple[int, int], list[int]] = {}  # equal lengths run as one batch (rows evict apart)
        for i, ex in enumerate(examples):
            groups.setdefault((len(ex.prompt), len(ex.answer)), []).append(i)
        for (_, answer_len), idx in groups.items():
            ids = torch.tensor([examples[i].prompt + examples[i].answer for i in idx], device=self.device)  # (B, L+A)
            state: dict = {}
            hidden = self.model.hidden_states(ids[:, :-1], state=state)  # (B, L + A - 1, C)
            logits = self.model.lm_head(hidden[:, -answer_len:]).float()  # (B, A, V)
            target = ids[:, -answer_len:]  # (B, A)
            logp = torch.log_softmax(logits, dim=-1).gather(-1, target[..., None]).squeeze(-1)  # (B, A)
            for row, i in enumerate(idx):
                scores[i] = math.exp(float(logp[row].mean()))
                correct[i] = bool((logits[row].argmax(-1) == target[row]).all())
            uses += [cache_use(state) or {"kv_kept": 1.0, "kv_kept_mean": 1.0, "kv_peak": 1.0}] * len(idx)
        out = {"scores": scores, "correct": correct, **mean_cache_use(uses)}
        if collect_features:
            out.update(self.policy.feature_sums)
            self.policy.feature_sums = None
        return out


_WORKER: PolicyScorer | None = None


def _init_worker(model_dir, spec, mean, std, devices, threads: int) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    device = devices.get() if devices is not None else "cpu"
    _WORKER = PolicyScorer(model_dir, spec, mean, std, device)


def _score_in_worker(job: tuple[np.ndarray | None, list[Example]]) -> dict[str, Any]:
    return _WORKER.run(*job)


# ----------------------------------------------------------------------------------------------
# The evolution loop.


@dataclass
class NammResult:
    """What a finished (or resumed-and-finished) `namm train` produced."""

    out_dir: Path
    generations: int
    policy: Path
    best_fitness: float
    best_kv_kept: float
    seconds: float


def spec_of(cfg: NammRecipe) -> NammSpec:
    n = cfg.namm
    return NammSpec(scorer=n.scorer, selection=n.selection, hidden=n.hidden, update_every=n.update_every)


def _fingerprint(cfg: NammRecipe) -> dict[str, Any]:
    """Settings a resumed run must share with the saved state (everything but `generations`/`workers`)."""
    n = dataclasses.asdict(cfg.namm)
    n.pop("generations")
    n.pop("workers")
    tokenizer = cfg.model.tokenizer or cfg.model.pretrained
    return {"model.pretrained": str(Path(cfg.model.pretrained).resolve()),
            "model.tokenizer": str(Path(tokenizer).resolve()), **{f"namm.{k}": v for k, v in n.items()}}


def fitness_of(result: dict[str, Any], reference: list[float], tasks: list[str], examples: list[Example],
               cache_weight: float) -> float:
    """Mean over tasks of the mean score / reference ratio, minus `cache_weight` x kv_kept_mean (the
    share of the cache held through the prompts)."""
    per_task: dict[str, list[float]] = {}
    for ex, score, ref in zip(examples, result["scores"], reference):
        per_task.setdefault(ex.task, []).append(score / ref)
    task_means = [sum(v) / len(v) for t in tasks if (v := per_task.get(t))]
    return sum(task_means) / len(task_means) - cache_weight * result["kv_kept_mean"]


def _new_optimizer(cfg: NammRecipe, mean: np.ndarray):
    from cmaes import CMA, SepCMA

    cls = SepCMA if cfg.namm.covariance == "diagonal" else CMA
    return cls(mean=mean.astype(np.float64), sigma=cfg.namm.sigma, population_size=cfg.namm.population,
               seed=cfg.namm.seed)


def evolve_step(es, seed: int, generation: int, population: int, evaluate) -> tuple[list[float], list, list]:
    """One CMA-ES generation: ask `population` members, score them with the current mean, tell.

    Args:
        es: a `cmaes` optimiser (minimises, so fitness is negated for it).
        seed, generation: seed the member draws, so a resumed run draws the same members.
        population: members per generation.
        evaluate: `[mean, *members] -> [(fitness, anything), ...]`, fitness to maximise.

    Returns:
        (fitness, parameter vectors and the evaluation's other outputs, each for [mean, *members]).
    """
    es.reseed_rng((seed * 1_000_003 + generation) % 2**32)
    members = [es.ask() for _ in range(population)]
    center = np.array(es.mean, copy=True)
    scored = evaluate([center, *members])
    fitness = [f for f, _ in scored]
    es.tell([(x, -f) for x, f in zip(members, fitness[1:])])
    return fitness, [center, *members], [extra for _, extra in scored]


def _save_state(path: Path, state: dict[str, Any]) -> None:
    from longcpt.fsio import atomic_file

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(state, f)
        f.flush()
        os.fsync(f.fileno())


def _load_state(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
    except Exception as e:  # an unreadable file: say so rather than starting over silently
        raise LongcptError(f"{path}: unreadable NAMM optimiser state ({type(e).__name__}: {e}); "
                           f"delete {path.parent} to start over") from None
    if state.get("version") != STATE_VERSION:
        raise LongcptError(f"{path}: state version {state.get('version')!r}, this longcpt writes {STATE_VERSION}; "
                           f"delete {path.parent} to start over")
    changed = [f"{k}: {state['fingerprint'].get(k)!r} in the saved run, {v!r} now"
               for k, v in fingerprint.items() if state["fingerprint"].get(k) != v]
    if changed:
        raise LongcptError(f"{path}: the recipe changed since this run started ({'; '.join(changed)}); set them "
                           f"back to resume, or choose another trainer.out_dir (or delete {path.parent}) to start over")
    return state


def namm_device(cfg: NammRecipe) -> str:
    """Where the full-cache pass runs: the first GPU when there is one, unless trainer.accelerator
    is cpu (as the trainer decides)."""
    return "cuda:0" if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available() else "cpu"


def reference_pass(scorer: PolicyScorer, examples: list[Example], collect_features: bool = False) -> dict[str, Any]:
    """The full cache (the all-zero policy) on `examples`: its scores and the examples it answers."""
    ref = scorer.run(None, examples, collect_features=collect_features)
    ref["used"] = [i for i, ok in enumerate(ref["correct"]) if ok]
    return ref


def _calibrate(cfg: NammRecipe, spec: NammSpec, validation: list[Example]) -> dict[str, Any]:
    """The full-cache pass over the validation draw: its reference scores, the examples it answers
    and the feature statistics (module docstring)."""
    k = spec.frequencies
    scorer = PolicyScorer(cfg.model.pretrained, spec, torch.zeros(k), torch.ones(k), namm_device(cfg))
    ref = reference_pass(scorer, validation, collect_features=True)
    if not ref["used"]:
        raise LongcptError(
            f"model.pretrained={cfg.model.pretrained!r}: with the full cache the model answers none of the "
            f"{len(validation)} validation prompts; NAMM training needs prompts the model can do (shorter "
            "namm.passkey.lengths, or namm.passkey.split_digits as it was fine-tuned)")
    if not ref.get("count"):
        raise LongcptError(f"namm.update_every={cfg.namm.update_every}: no validation prompt reached an eviction, so "
                           "there are no features to normalise (prompts must be at least update_every tokens)")
    mean = ref["sum"] / ref["count"]
    std = (ref["sumsq"] / ref["count"] - mean**2).clamp_min(0).sqrt()
    return {"validation_reference": ref["scores"], "validation_used": ref["used"], "feature_mean": mean.float(),
            "feature_std": std.float()}


def _fresh_state(cfg: NammRecipe, spec: NammSpec, validation: list[Example], fingerprint: dict) -> dict[str, Any]:
    calibration = _calibrate(cfg, spec, validation)
    init = np.zeros(spec.param_count())
    if cfg.namm.init is not None:
        start = load_policy(cfg.namm.init)
        if start.spec != spec:
            raise LongcptError(f"namm.init={cfg.namm.init!r}: a policy with {start.spec}, but the recipe asks for {spec}")
        init = start.params.double().numpy()
    return {"version": STATE_VERSION, "fingerprint": fingerprint, "optimizer": _new_optimizer(cfg, init),
            "generation": 0, "history": [], "best": None, "seconds": 0.0, **calibration}


def _policy(spec: NammSpec, params: np.ndarray, state: dict[str, Any], info: dict[str, Any]) -> NammPolicy:
    return NammPolicy(spec, torch.as_tensor(params, dtype=torch.float32), state["feature_mean"],
                      state["feature_std"], info)


class _Evaluator:
    """Scores (parameters, examples) jobs in worker processes (or in-process with one worker)."""

    def __init__(self, cfg: NammRecipe, spec: NammSpec, state: dict[str, Any]):
        args = (cfg.model.pretrained, spec, state["feature_mean"], state["feature_std"])
        workers, devices = cfg.namm.workers, None
        gpus = torch.cuda.device_count() if namm_device(cfg) != "cpu" else 0
        if workers == 0:
            workers = gpus or os.cpu_count() or 1
        self.pool = None
        if workers == 1:
            self.local = PolicyScorer(*args, "cuda:0" if gpus else "cpu")
            return
        # Workers fork from a server that imported this module (torch, the model code) once: a
        # spawned worker imports them itself (about 7 s of CPU each). The server starts clean, so a
        # worker may still initialise CUDA (which a plain fork of this process could not).
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        if gpus:
            devices = context.Queue()
            for i in range(workers):
                devices.put(f"cuda:{i % gpus}")
        threads = max(1, (os.cpu_count() or 1) // workers)
        self.pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                           initargs=(*args, devices, threads))

    def map(self, jobs: list[tuple[np.ndarray | None, list[Example]]], done=None) -> list[dict[str, Any]]:
        """Results in job order; `done()` is called as each finishes."""
        if self.pool is None:
            results = []
            for job in jobs:
                results.append(self.local.run(*job))
                if done:
                    done()
            return results
        futures = [self.pool.submit(_score_in_worker, job) for job in jobs]
        for _ in concurrent.futures.as_completed(futures):
            if done:
                done()
        return [f.result() for f in futures]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _progress():
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("members"), TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                    disable=not (os.isatty(2) and os.environ.get("TERM", "dumb") != "dumb"))


def train(cfg: NammRecipe) -> NammResult:
    """Evolve a NAMM as the recipe says; resume from `out_dir/namm/es_state` when it exists.

    Raises:
        ConfigError: a bad recipe.
        LongcptError: a model that answers none of the prompts, a changed recipe on resume, an
            unreadable state file.
    """
    validate(cfg)
    if cfg.model.pretrained is None:
        raise ConfigError(["model.pretrained=null: `longcpt namm train` evolves a NAMM for an existing model; "
                           "set it to the model's HF folder"])
    from longcpt.data import load_tokenizer
    from longcpt.eval.figures import fitness_curve
    from longcpt.logs import run_loggers

    n = cfg.namm
    out = Path(cfg.trainer.out_dir).resolve() / NAMM_DIR
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.pretrained)
    validation = build_examples(n, tokenizer, VALIDATION)
    spec = spec_of(cfg)
    fingerprint = _fingerprint(cfg)
    state = _load_state(out / ES_STATE, fingerprint)
    if state is None:
        state = _fresh_state(cfg, spec, validation, fingerprint)
        _save_state(out / ES_STATE, state)
        print(f"namm: the full cache answers {len(state['validation_used'])} of {len(validation)} validation "
              f"examples; {spec.param_count()} parameters ({spec.scorer}, {spec.selection} selection); "
              f"population {n.population}", flush=True)
    else:
        print(f"namm: resuming after generation {state['generation']} ({out / ES_STATE})", flush=True)
    if state["best"] is not None:  # a kill between the two writes leaves policy.pt one generation behind
        _policy(spec, state["best"]["params"], state, state["best"]["info"]).save(out / POLICY)
    loggers = run_loggers(out)
    es = state["optimizer"]
    val_examples = [validation[i] for i in state["validation_used"]]  # only these choose the policy
    val_reference = [state["validation_reference"][i] for i in state["validation_used"]]
    evaluator = _Evaluator(cfg, spec, state) if state["generation"] < n.generations else None
    model_name = "/".join(Path(cfg.model.pretrained).parts[-2:])  # exports are mostly .../hf
    title = f"NAMM ({spec.scorer}) for {model_name}, population {n.population}, cache_weight {n.cache_weight}"
    try:
        with _progress() as progress:
            task = progress.add_task("namm", total=(n.generations - state["generation"]) * (n.population + 2))
            while state["generation"] < n.generations:
                g = state["generation"]
                t0 = time.perf_counter()
                progress.update(task, description=f"generation {g}")
                sample = build_examples(n, tokenizer, g)  # a fresh draw every generation
                ref = evaluator.map([(None, sample)], done=lambda: progress.advance(task))[0]
                used = [i for i, ok in enumerate(ref["correct"]) if ok]
                if not used:
                    raise LongcptError(f"generation {g}: the full cache answers none of the {len(sample)} prompts of "
                                       "this draw; raise namm.passkey.trials (more prompts per draw) or use prompts "
                                       "the model can do")
                train_examples, train_reference = [sample[i] for i in used], [ref["scores"][i] for i in used]

                def evaluate(vectors, train_examples=train_examples, train_reference=train_reference):
                    jobs = [(vectors[0], val_examples)] + [(v, train_examples) for v in vectors[1:]]
                    results = evaluator.map(jobs, done=lambda: progress.advance(task))
                    center = fitness_of(results[0], val_reference, n.tasks, val_examples, n.cache_weight)
                    return [(center, results[0])] + [
                        (fitness_of(r, train_reference, n.tasks, train_examples, n.cache_weight), r) for r in results[1:]]

                fit, params, results = evolve_step(es, n.seed, g, n.population, evaluate)
                center = params[0]
                population = np.array(fit[1:])
                kept = np.array([r["kv_kept_mean"] for r in results[1:]])
                seconds = time.perf_counter() - t0
                state["seconds"] += seconds
                record = {"generation": g, "fitness_mean": float(population.mean()), "fitness_std": float(population.std()),
                          "fitness_best": float(population.max()), "kv_kept_mean": float(kept.mean()),
                          "best_kv_kept_mean": float(kept[population.argmax()]), "train_examples": len(used),
                          "validation_fitness": fit[0], "validation_kv_kept": results[0]["kv_kept"],
                          "validation_kv_kept_mean": results[0]["kv_kept_mean"],
                          "validation_kv_peak": results[0]["kv_peak"], "seconds": seconds}
                state["history"].append(record)
                if state["best"] is None or fit[0] >= state["best"]["fitness"]:
                    info = {"generation": g, "fitness": fit[0], "kv_kept": results[0]["kv_kept"],
                            "kv_kept_mean": results[0]["kv_kept_mean"], "model": str(cfg.model.pretrained),
                            "tasks": list(n.tasks), "population": n.population}
                    state["best"] = {"params": center, "fitness": fit[0], "info": info}
                state["generation"] = g + 1
                _save_state(out / ES_STATE, state)
                _policy(spec, state["best"]["params"], state, state["best"]["info"]).save(out / POLICY)
                for logger in loggers:
                    logger.log_metrics({f"namm/{k}": v for k, v in record.items() if k != "generation"}, step=g)
                    logger.save()
                fitness_curve(state["history"], title, out / "fitness.png")
                print(f"generation {g + 1}/{n.generations}  fitness mean {record['fitness_mean']:.4f} "
                      f"best {record['fitness_best']:.4f} ({len(used)} prompts)  policy on validation {fit[0]:.4f} "
                      f"(kv_kept {results[0]['kv_kept']:.3f}, through the prompt {results[0]['kv_kept_mean']:.3f})  "
                      f"{seconds:.0f}s", file=sys.stdout, flush=True)
    finally:
        if evaluator is not None:
            evaluator.close()
        for logger in loggers:
            logger.finalize("success")
    best = state["best"]
    return NammResult(out, state["generation"], out / POLICY, best["fitness"], best["info"]["kv_kept"], state["seconds"])


def run(args) -> int:
    """Entry point of `longcpt namm train` (see `longcpt.cli`)."""
    cfg = load_config(args.recipe, args.overrides, check_paths=False, schema=NammRecipe)
    result = train(cfg)
    print(f"longcpt namm train: {result.generations} generations; policy {result.policy} "
          f"(fitness {result.best_fitness:.4f}, kv_kept {result.best_kv_kept:.3f}); {result.seconds:.0f}s of evolution")
    return 0
