"""The lm-evaluation-harness backend `longcpt`: the harness's requests on longcpt's model.

    simple_evaluate(model=LongcptLM("runs/cpt/hf", attention="infllm"), tasks=[...])
    python -m longcpt.eval.harness --model longcpt --model_args pretrained=DIR,attention=infllm --tasks ...
    longcpt eval harness --model DIR --tasks ... --output OUT          (command.py)

Requests are answered as the harness's `hf` backend (`lm_eval.models.huggingface.HFLM`) answers
them, so that a plain model gets the same numbers from both (tests/eval/test_harness_backend.py):

  * tokens: the tokenizer's own special tokens (BOS for Llama), none when the text already starts
    with BOS; `add_bos_token` forces them on or off as in `hf`;
  * loglikelihood: context + continuation encoded whole and split after the context's tokens
    (`TemplateLM`); an input longer than max_length + 1 loses tokens from the left; the
    continuation's log-probabilities are summed, and it is greedy when every token of it is the
    argmax. Requests that share context + continuation[:-1] run once (`hf`'s logits cache), the
    one-token multiple-choice case of MMLU;
  * loglikelihood_rolling: the harness's rolling windows of max_length tokens (each token predicted
    once, from up to max_length - 1 tokens), summed per document;
  * generate_until: the context left-truncated to max_length - max_gen_toks, greedy (or sampled
    with do_sample) for up to max_gen_toks tokens, stopping at EOS or once a stop string has been
    generated; the text is cut before the first stop string.

What is longcpt's own: the model, any attention kind (`attention`, `attention_options`), RoPE
scaling and checkpoints that were never exported (`longcpt.eval.loading`), and how a request runs.
An input is read as longcpt's generation reads a prompt (`longcpt.model.generation.prefill`): in
chunks of `prefill_chunk` tokens through the kind's state (a KV cache, InfLLM's block memory, an
evicting cache, Infini's compressive memory), the token that predicts the first scored token as a
step of its own (InfLLM retrieves once per step), then the rest of the continuation. For `full`
this is the same computation as one forward pass, cut differently.

max_length is the model's context length with its RoPE scaling (`ModelArgs.context_length`)
unless `max_length` is given; a kind that reads any length with bounded state (infllm, namm, h2o,
streaming, infini: `longcpt.model.attention.reads_any_length`) reads every input whole by default
(max_length `UNBOUNDED`): cutting it to the window would hide what the memory is for. Inputs cut
to max_length are counted (`truncated` in `stats`).

Batches: requests whose inputs have the same number of tokens (and, for log-likelihoods, the same
number of scored tokens) run as rows of one batch, up to `batch_tokens` tokens and `batch_size`
rows. Rows share positions (no padding), which every kind's state supports.

Shapes: B rows, n input tokens, m scored tokens, C hidden size, V vocabulary.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from longcpt.errors import LongcptError
from longcpt.model.generation import DEFAULT_PREFILL_CHUNK, cache_use, forward_chunks, generate, prefill

DEFAULT_MAX_GEN_TOKS = 256  # as `hf`
# The max_length of a kind that reads any length: longer than any input (a whole input, one rolling window).
UNBOUNDED = 2**31 - 1
LOGIT_CHUNK = 1024  # hidden states turned into (t, V) float32 log-probabilities this many at a time
SAMPLING_KEYS = ("do_sample", "temperature", "top_p")  # generation kwargs besides until / max_gen_toks


@dataclass
class Scored:
    """One log-likelihood input run by the model: what every request sharing it needs.

    Attributes:
        logprobs: (m,) log-probability of each target token of the representative request.
        greedy: (m,) whether each of them is the argmax.
        last: (V,) log-probabilities at the last position, for requests that differ only there.
    """

    logprobs: torch.Tensor
    greedy: torch.Tensor
    last: torch.Tensor


@register_model("longcpt")
class LongcptLM(TemplateLM):
    """An lm-evaluation-harness `LM` running a longcpt model (see the module docstring).

    Args:
        pretrained: exported folder or training checkpoint (`--model` of every `longcpt eval`).
        attention: attention kind to run (default: the model's own).
        attention_options: that kind's options, a dict or a JSON object string.
        rope_scaling: an HF rope_scaling dict (or JSON) replacing the folder's.
        max_length: longest input in tokens (default: the model's context length).
        batch_size: most rows per batch; None or "auto" for as many as `batch_tokens` allows.
        max_batch_size: accepted for the harness's command line; unused.
        batch_tokens: most tokens per batch.
        prefill_chunk: input tokens per model call.
        device: where the model runs (default: the GPU if there is one; the harness's command line
            asks for cuda:0, which falls back to the CPU on a machine without one, as `hf` does).
        tokenizer: a tokenizer folder replacing the model's.
        add_bos_token: force the tokenizer's special tokens on or off (default: its own rule).
        seed: seed of sampled generations (do_sample).
        progress: show a progress bar with tokens/s.
        dtype: parameter dtype, e.g. "bfloat16" (default: as stored).
        trust_remote_code: accepted for the harness's command line; longcpt never runs a folder's code.

    Raises:
        LongcptError: an unknown argument, or what loading the model refuses.
    """

    def __init__(
        self,
        pretrained: str,
        attention: str | None = None,
        attention_options: dict | str | None = None,
        rope_scaling: dict | str | None = None,
        max_length: int | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        batch_tokens: int = 32768,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        device: str | None = None,
        tokenizer: str | None = None,
        add_bos_token: bool | None = None,
        seed: int = 0,
        progress: bool = True,
        dtype: str | None = None,
        trust_remote_code: bool | None = None,
        **unknown,
    ) -> None:
        super().__init__()
        from longcpt.eval.loading import load_model_and_tokenizer, load_tokenizer
        from longcpt.model.hf_io import _as_dtype

        if unknown:
            raise LongcptError(f"model_args {', '.join(sorted(unknown))}: not arguments of the longcpt backend "
                               "(see longcpt.eval.harness.backend.LongcptLM)")

        options = _json_arg(attention_options, "attention_options") or {}
        scaling = _json_arg(rope_scaling, "rope_scaling")
        model, tok = load_model_and_tokenizer(pretrained, scaling, attention, options)
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer else tok
        self._device = pick_device(device)
        self.model = model.to(self._device, _as_dtype(dtype)) if dtype else model.to(self._device)
        self._max_length = int(max_length) if max_length else None
        self.batch_rows = _rows(batch_size)
        self.batch_tokens = int(batch_tokens)
        self.prefill_chunk = int(prefill_chunk)
        self.add_bos_token = add_bos_token
        self.seed = int(seed)
        self.progress = bool(progress)
        self.settings = {"model": str(pretrained), "attention": model.args.attention,
                         "attention_options": dict(model.args.attention_options), "rope_scaling": scaling,
                         "max_length": self.max_length}
        self.stats = new_stats()

    # -- what the harness reads -------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window condition on: BOS, else EOS (as `hf`)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        from longcpt.model.attention import reads_any_length

        return UNBOUNDED if reads_any_length(self.model.args.attention) else self.model.args.context_length

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        """Recorded by the harness in its results' `config`."""
        return {"longcpt": self.settings}

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Token ids of `string` as `hf` encodes a context (no special tokens before a written BOS)."""
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        ids = self.tokenizer.encode(string, **self._special_tokens(add_special_tokens))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _special_tokens(self, add_special_tokens: bool | None) -> dict:
        flag = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        return {} if flag is None else {"add_special_tokens": flag}

    # -- loglikelihood ------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy) for `(strings, context ids, continuation ids)` requests.

        Raises:
            LongcptError: a continuation longer than max_length.
        """
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)  # context + continuation[:-1] -> requests
        for i, (_, context, continuation) in enumerate(requests):
            if len(continuation) > self.max_length:
                raise LongcptError(f"a continuation of {len(continuation)} tokens is longer than max_length "
                                   f"{self.max_length}; raise max_length")
            groups[tuple(context + continuation[:-1])].append(i)
        # One input per group, from the request with the longest continuation (its targets cover
        # every member's but the last); the longest inputs first, as `hf` orders them.
        inputs = {key: max(members, key=lambda i: len(requests[i][2])) for key, members in groups.items()}
        order = sorted(inputs.values(), key=lambda i: (-len(requests[i][1]) - len(requests[i][2]), requests[i][1:]))
        plans = {i: self._input(requests[i][1], requests[i][2]) for i in order}
        results: list = [None] * len(requests)
        with self._timed("loglikelihood", sum(len(ids) for ids, _ in plans.values())) as advance:
            for batch in self._batches(order, lambda i: (len(plans[i][0]), len(plans[i][1])), lambda i: len(plans[i][0])):
                scored = self._score([plans[i][0] for i in batch], [plans[i][1] for i in batch], advance)
                for i, row in zip(batch, scored):
                    key = tuple(requests[i][1] + requests[i][2][:-1])
                    for j in groups[key]:
                        results[j] = _answer(row, requests[j][2])
                        if requests[j][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[j][0], results[j])
        return results

    def _input(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """(input ids, target ids): the last max_length tokens before each target, as `hf` cuts them."""
        whole = context + continuation
        if len(whole) > self.max_length + 1:
            self.stats["truncated"] += 1
        return whole[-(self.max_length + 1):][:-1], continuation

    @torch.inference_mode()
    def _score(self, inputs: list[list[int]], targets: list[list[int]], advance: Callable[[int], None]) -> list[Scored]:
        """Run rows of equal length; the last m positions predict the m targets of each row."""
        ids = torch.tensor(inputs, device=self.device)  # (B, n)
        goal = torch.tensor(targets, device=self.device)  # (B, m)
        n, m = ids.shape[1], goal.shape[1]
        split = n - m + 1  # the input up to the position predicting the first target
        state: dict = {}
        pieces = [prefill(self.model, ids[:, :split], state, self.prefill_chunk, advance)[:, None]]  # (B, 1, C)
        pieces += [h for _, h in forward_chunks(self.model, ids[:, split:], state, self.prefill_chunk, start=split)]
        advance(n - split)
        logprobs, greedy, offset = [], [], 0
        for hidden in pieces:
            for s in range(0, hidden.shape[1], LOGIT_CHUNK):
                lp = F.log_softmax(self.model.lm_head(hidden[:, s : s + LOGIT_CHUNK]).float(), dim=-1)  # (B, t, V)
                y = goal[:, offset : offset + lp.shape[1]]  # (B, t)
                logprobs.append(lp.gather(-1, y[..., None])[..., 0])
                greedy.append(lp.argmax(dim=-1) == y)
                offset += lp.shape[1]
        self._record(state, n * len(inputs))
        logprobs, greedy = torch.cat(logprobs, dim=1).cpu(), torch.cat(greedy, dim=1).cpu()  # (B, m)
        return [Scored(logprobs[b], greedy[b], lp[b, -1].cpu()) for b in range(len(inputs))]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each `(text,)` request over the harness's rolling windows of max_length tokens."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generate_until -----------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The text each `(context, gen_kwargs)` request generates, cut before its first stop string."""
        by_kwargs: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            by_kwargs[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        results: list = [None] * len(requests)
        for indices in by_kwargs.values():
            gen_kwargs = requests[indices[0]].args[1]
            for i, text in zip(indices, self._generate([requests[i].args[0] for i in indices], gen_kwargs)):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _generate(self, contexts: Sequence[str], gen_kwargs: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        eos_text = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_new = kwargs.pop("max_gen_toks")
        unknown = sorted(set(kwargs) - set(SAMPLING_KEYS))
        if unknown:
            raise LongcptError(f"generation_kwargs {', '.join(unknown)}: not supported by the longcpt backend "
                               f"(it takes until, max_gen_toks, {', '.join(SAMPLING_KEYS)})")
        if max_new >= self.max_length:
            raise LongcptError(f"max_gen_toks {max_new} leaves no room for the prompt in max_length {self.max_length}")
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        top_p = float(kwargs.get("top_p", 1.0))
        prompts = [self._prompt(c, self.max_length - max_new) for c in contexts]
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), contexts[i]))
        stop = stop_checker(self.tokenizer, [s for s in until if s])
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        texts: list = [None] * len(prompts)
        with self._timed("generate", sum(len(p) + max_new for p in prompts)) as advance:
            for batch in self._batches(order, lambda i: len(prompts[i]), lambda i: len(prompts[i]) + max_new):
                ids = torch.tensor([prompts[i] for i in batch], device=self.device)  # (B, n)
                state: dict = {}
                out = generate(self.model, ids, max_new, temperature=temperature, top_p=top_p,
                               eos_id=self.eot_token_id, prefill_chunk=self.prefill_chunk, generator=generator,
                               progress=advance, state=state, stop=stop)  # (B, N)
                self._record(state, ids.numel() + out.numel())
                for i, row in zip(batch, out.tolist()):
                    texts[i] = postprocess_generated_text(self.tokenizer.decode(row, skip_special_tokens=True),
                                                          until, None)
        return texts

    def _prompt(self, context: str, max_tokens: int) -> list[int]:
        """Prompt ids as `hf` encodes a generation context, keeping the last `max_tokens`."""
        bos = self.tokenizer.bos_token
        flag = False if bos is not None and context.startswith(bos) else None
        ids = self.tokenizer.encode(context, **self._special_tokens(flag))
        if len(ids) > max_tokens:
            self.stats["truncated"] += 1
        return ids[-max_tokens:]

    # -- batching, progress, telemetry --------------------------------------------------------

    def _batches(self, order: list[int], key: Callable[[int], object], tokens: Callable[[int], int]):
        """Runs of `order` with equal `key`, each cut to `batch_tokens` tokens and `batch_rows` rows."""
        runs: dict[object, list[int]] = defaultdict(list)
        for i in order:
            runs[key(i)].append(i)
        for run in runs.values():
            rows = max(1, self.batch_tokens // max(1, tokens(run[0])))
            if self.batch_rows is not None:
                rows = min(rows, self.batch_rows)
            for first in range(0, len(run), rows):
                yield run[first : first + rows]

    @contextmanager
    def _timed(self, description: str, total: int):
        """Times a call into `stats`; yields `advance(tokens)` for the progress bar (tokens/s)."""
        start = time.perf_counter()
        if not self.progress:
            yield lambda n: None
        else:
            from longcpt.eval.progress import token_progress

            with token_progress() as bar:
                task = bar.add_task(f"{description} ({self.settings['attention']})", total=total)
                yield lambda n: bar.advance(task, n)
        self.stats["seconds"] += time.perf_counter() - start

    def _record(self, state: dict, tokens: int) -> None:
        self.stats["tokens"] += tokens
        if (use := cache_use(state)) is not None:
            self.stats["cache_use"].append(use)


def new_stats() -> dict:
    """Telemetry of a backend since the last reset: tokens read and generated, seconds in the model,
    cache use per batch (evicting kinds), inputs cut to max_length."""
    return {"tokens": 0, "seconds": 0.0, "cache_use": [], "truncated": 0}


def stop_checker(tokenizer, stops: Sequence[str]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`generate`'s `stop`: rows whose last tokens decode to text containing a stop string.

    The last (longest stop in tokens + 2) tokens are decoded each step, as `hf`'s
    `MultiTokenEOSCriteria` looks back; the returned text is cut at the first stop string whatever
    step noticed it, so looking back further would change no text.
    """
    if not stops:
        return None
    lookback = max(len(tokenizer.encode(s, add_special_tokens=False)) for s in stops) + 2

    def finished(generated: torch.Tensor) -> torch.Tensor:  # (B, n) -> (B,)
        tails = tokenizer.batch_decode(generated[:, -lookback:].tolist())
        return torch.tensor([any(s in text for s in stops) for text in tails])

    return finished


def _answer(row: Scored, continuation: list[int]) -> tuple[float, bool]:
    """(log-probability, greedy) of a continuation scored on its group's input: its tokens but the
    last are the input's last targets; its last token is read from the last position."""
    m = len(continuation) - 1
    shared_lp = row.logprobs[-1 - m : -1] if m else row.logprobs[:0]
    shared_greedy = row.greedy[-1 - m : -1] if m else row.greedy[:0]
    last = continuation[-1]
    logprob = float(shared_lp.double().sum() + row.last[last].double())
    greedy = bool(shared_greedy.all()) and int(row.last.argmax()) == last
    return logprob, greedy


def pick_device(device: str | None) -> torch.device:
    """`device`, or the CPU when it names a GPU this machine does not have (with a warning)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"device={device!r}: no CUDA GPU here, running on the CPU", stacklevel=2)
        return torch.device("cpu")
    return chosen


def _rows(batch_size: int | str | None) -> int | None:
    if batch_size is None or (isinstance(batch_size, str) and batch_size.startswith("auto")):
        return None
    return max(1, int(batch_size))


def _json_arg(value: dict | str | None, name: str) -> dict | None:
    """A dict argument given as a dict or a JSON object string (the harness's --model_args)."""
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise LongcptError(f"{name}={value!r}: not a JSON object ({e.msg})") from None
    if not isinstance(parsed, dict):
        raise LongcptError(f"{name}={value!r}: not a JSON object")
    return parsed
