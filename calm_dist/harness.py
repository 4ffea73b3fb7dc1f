"""A saved composition (or LoRA baseline) as an lm-evaluation-harness model: `--model calm`.

    calm-dist lm-eval --model calm --model_args composition=runs/x/final --tasks hellaswag
    calm-dist lm-eval --model calm --model_args composition=DIR,tokenizer=tok.model --batch_size 32 --tasks ...

lm-eval 0.4 finds a model by name in its registry, which holds its own models (lm_eval/models/__init__.py's
MODEL_MAPPING) and whatever an imported module registered; it reads no entry points. So importing this module
registers "calm" (`register_model`), and `calm-dist lm-eval` (calm_dist/harness_cli.py) is lm-eval's own
command line run after that import. From Python: `import calm_dist.harness` before `lm_eval.simple_evaluate(
model="calm", model_args={"composition": DIR})`, or pass `CalmLM(composition=DIR)` as the model.

The three request types run on calm_dist's own model: the composed forward for loglikelihood and
loglikelihood_rolling (lm-eval's rolling windows), `ComposedModel.generate` (one KV cache per model) for
generate_until; requests are sorted by length (lm-eval's Collator) and run `batch_size` at a time, left-padded
as calm_dist pads. Token ids are calm_dist's: bos (when the tokenizer has one) before every context, as
training and `calm-dist eval` feed prompts; lm-eval's "prefix token" before an empty context is that bos, else
eos.

model_args: composition (required); anchor, augmenting (`+`-separated) to load other copies of the base models
than the recorded ones; tokenizer (default: the one saved with the anchor); max_length (default: the shortest
position limit of the models); max_gen_toks (default 256); dtype (float32, bfloat16, float16); prefix_only (the
prefix-encoder ablation in generate_until: the augmenting models see the prompt only); compile_decoding (one
compiled graph per decoding step, calm_dist/model/compiled_decoding.py: a compilation of tens of seconds per batch
shape, which many batches of long generations earn back). lm-eval's own --batch_size
(default 16 here; "auto" is 16 too: no search for the largest batch that fits) and --device (default: calm_dist's
choice, cuda:LOCAL_RANK or cpu) apply.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from calm_dist.config import ConfigError
from calm_dist.data.tokenizer import Tokenizer, saved_tokenizer
from calm_dist.model.baselines import LoRAAnchor
from calm_dist.model.composition import ComposedModel, export_config
from calm_dist.model.generation import eos_ids
from calm_dist.model.io import load_causal_lm
from calm_dist.training.dist_env import DistEnv, local_device

DEFAULT_BATCH_SIZE = 16


def load_model(directory: str | Path, anchor: str | None, augmenting: list[str] | None, dtype):
    """A composition, or a LoRA baseline (composition.json says which), on the recorded base models unless
    others are given."""
    config = export_config(directory)
    if config.get("method") == "lora":
        recorded = config["anchor"]
        base = load_causal_lm(anchor or recorded["name_or_path"], None if anchor else recorded.get("revision"),
                              dtype)
        return LoRAAnchor.from_export(directory, base), base.config
    model = ComposedModel.from_composition(directory, anchor=anchor, augmenting=augmenting, dtype=dtype)
    return model, model.anchor.config


def _batch_size(value) -> int:
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE  # no search for the largest batch that fits: a fixed, known default
    size = int(value)
    if size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {value}")
    return size


@register_model("calm")
class CalmLM(TemplateLM):
    def __init__(self, composition: str, anchor: str | None = None, augmenting: str | None = None,
                 tokenizer: str | None = None, batch_size=DEFAULT_BATCH_SIZE, max_batch_size=None,
                 max_length: int | None = None, max_gen_toks: int = 256, device: str | None = None,
                 dtype: str | None = None, prefix_only: bool = False, compile_decoding: bool = False, **unused):
        super().__init__()
        if compile_decoding and export_config(composition).get("method") == "lora":
            raise ConfigError("compile_decoding: a LoRA export decodes with transformers' generate; drop it")
        torch_dtype = getattr(torch, dtype) if dtype and dtype != "auto" else None
        parts = [p for p in str(augmenting).split("+") if p] if augmenting else None
        self.model, anchor_config = load_model(composition, anchor, parts, torch_dtype)
        self._device = torch.device(device) if device else local_device(DistEnv.from_environ())
        self.model.to(self._device).eval()
        self.tokenizer = self._tokenizer(tokenizer)
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks, self.prefix_only = int(max_gen_toks), bool(prefix_only)
        self.compile_decoding = bool(compile_decoding)
        configs = [anchor_config, *getattr(self.model, "augmenting_configs", [])]
        limits = [c.max_position_embeddings for c in configs if getattr(c, "max_position_embeddings", None)]
        self._max_length = int(max_length) if max_length else min(limits or [2048])
        self.stops = eos_ids(self.tokenizer.eos_id, anchor_config.eos_token_id)  # Llama-3 configs list several
        self.composition = str(composition)

    def _tokenizer(self, path: str | None) -> Tokenizer:
        if path:
            return Tokenizer(path, "tokenizer")
        anchor = self.model.description["anchor"]
        found = saved_tokenizer(anchor["name_or_path"], anchor.get("revision"), "the composition's anchor")
        if found is None:
            raise ConfigError(f"the anchor {anchor['name_or_path']} was saved without a tokenizer: pass "
                              "tokenizer=PATH in --model_args")
        return found

    # ---- what TemplateLM asks -------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """bos + the text's ids, as calm_dist feeds a prompt (add_special_tokens=False: the ids alone)."""
        bos = [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None and add_special_tokens is not False else []
        return bos + self.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row):], mask[r, width - len(row):] = torch.tensor(row), 1
        return ids.to(self._device), mask.to(self._device)

    # ---- loglikelihood --------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Each (key, context ids, continuation ids): the continuation's summed log-probability and whether greedy
        decoding would produce it. Longest first, `batch_size` rows a forward; the context is cut on the left to
        fit max_length."""
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="calm loglikelihood")
        for chunk in collator.get_batched(n=self.batch_size):
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            ids, mask = self._left_pad(rows)
            logprobs = F.log_softmax(self.model(ids, attention_mask=mask).logits.float(), dim=-1)
            for r, (key, _, cont) in enumerate(chunk):
                if not cont:  # nothing to score (a slice [-0:] would take the whole row)
                    results.append((0.0, True))
                    continue
                # left padding: every row ends at the last column, so its continuation is the last len(cont) logits
                scores = logprobs[r, -len(cont):]
                target = torch.tensor(cont, device=scores.device)
                answer = (float(scores.gather(-1, target[:, None]).sum()), bool((scores.argmax(-1) == target).all()))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            bar.update(len(chunk))
        bar.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood in lm-eval's disjoint rolling windows of max_length tokens, the first
        conditioned on the prefix token."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """calm_dist's KV-cached decoding, a batch of requests with the same generation arguments at a time. A row
        ends at an eos id; the text is then cut at the first `until` string (decoding does not stop at strings:
        rows run to max_gen_toks or their eos)."""
        collator = Collator([req.args for req in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                            group_by="gen_kwargs", group_fn=lambda a: a[1])
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="calm generate_until")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = dict(normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            max_new = kwargs.pop("max_gen_toks")
            room = self.max_length - max_new
            if room <= 0:
                raise ConfigError(f"max_gen_toks {max_new} leaves no room for a context in max_length "
                                  f"{self.max_length}")
            ids, mask = self._left_pad([self.tok_encode(c)[-room:] for c in contexts])
            sampling = bool(kwargs.get("do_sample"))
            out = self.model.generate(
                ids, attention_mask=mask, max_new_tokens=max_new, do_sample=sampling,
                temperature=float(kwargs.get("temperature") or 1.0) if sampling else 1.0,
                top_k=kwargs.get("top_k") if sampling else None, top_p=kwargs.get("top_p") if sampling else None,
                eos_token_id=self.stops or None, pad_token_id=self.tokenizer.pad_id,
                **({"refresh_augmenting": False} if self.prefix_only else {}),
                **({"compile_step": True} if self.compile_decoding else {}))
            for context, row, gen_kwargs in zip(contexts, out[:, ids.shape[1]:].tolist(), all_kwargs):
                ends = [i for i, t in enumerate(row) if t in self.stops]
                text = postprocess_generated_text(self.tok_decode(row[:ends[0]] if ends else row), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            bar.update(len(chunk))
        bar.close()
        return collator.get_original(results)

    def get_model_info(self) -> dict:
        """What lm-eval records of the model in its results' config."""
        config = export_config(self.composition)
        mlflow = (config.get("training") or {}).get("mlflow") or {}
        return {"composition": self.composition, "method": config.get("method", "calm"),
                "anchor": config["anchor"].get("name_or_path"), "anchor_revision": config["anchor"].get("revision"),
                "mlflow_run_id": mlflow.get("run_id")}
