"""Exact match (greedy decoding) and completion loss for the anchor alone, each augmenting model alone,
and the composition, over prompt/completion data sets: the paper's Table 1 shape.

    calm-dist eval --config recipe.yaml --composition runs/x/final --set kv_arith=data/kv_arith_eval.jsonl \
        [--set name=path ...] [--models anchor,augmenting,composed] [--json out.json]
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from calm_dist.config import ConfigError
from calm_dist.data.sources import open_source
from calm_dist.data.text_records import training_completion_decoding
from calm_dist.cross_tokenizer_eval import across_tokenizer_fns
from calm_dist.data.tokenizer import (Tokenizer, anchor_tokenizer, completion_ids, model_tokenizers, prompt_ids,
                                      whole_text_ids)
from calm_dist.eval_tracking import log_results
from calm_dist.model.lm_loss import IGNORE
from calm_dist.model.baselines import LoRAAnchor
from calm_dist.model.composition import ComposedModel, export_config, position_ids_from_mask
from calm_dist.model.generation import eos_ids
from calm_dist.model.io import load_causal_lm
from calm_dist.model.lm_loss import labelled_tokens, loss_from_logits
from calm_dist.training.dist_env import DistEnv, local_device

# generate(ids, mask, max_new_tokens) and logits(ids, mask) on the anchor's left-padded batch; a column whose
# functions are marked `reads_text` (cross_tokenizer_eval.py) also takes the prompts, and the records, as strings
GenerateFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SetResult:
    exact_match: float
    loss: float
    n: int
    examples: list[dict]


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):], mask[r, width - len(row):] = torch.tensor(row), 1
    return ids, mask


def is_exact_match(generated: list[int], reference: list[int]) -> bool:
    """Exact match, the one definition for `calm-dist eval` and the demo's tools: the generated continuation
    begins with the reference ids, i.e. the completion and eos as training labels them
    (data.completion_ids). Ids, not decoded text: decode is not the inverse of encode for every tokenizer
    (WordLevel joins tokens with spaces). The eos is required, so an answer that runs on is a miss; what
    follows the eos is the generator's padding."""
    return list(generated[:len(reference)]) == list(reference)


def answer_text(tokenizer: Tokenizer, generated: list[int], stops: list[int] | None = None) -> str:
    """The generated continuation up to its first stop id (default: the tokenizer's eos), decoded: what the
    examples show, never what is scored."""
    stops = stops or eos_ids(tokenizer.eos_id)
    ends = [i for i, t in enumerate(generated) if t in stops]
    generated = generated[:ends[0]] if ends else generated
    return tokenizer.decode([t for t in generated if t != tokenizer.pad_id])


def stop_ids(tokenizer: Tokenizer, model_config) -> list[int]:
    """Where decoding stops: the tokenizer's eos, which training labels, and each eos the model's config names
    (Llama-3 lists several: its chat turns end at another one than the text)."""
    return eos_ids(tokenizer.eos_id, getattr(model_config, "eos_token_id", None))


@torch.no_grad()
def evaluate_set(generate: GenerateFn, logits_fn: LogitsFn, tokenizer: Tokenizer, records, *, batch_size: int = 64,
                 max_new_tokens: int | None = None, prompt_field: str = "prompt",
                 completion_field: str = "completion", keep_examples: int = 5,
                 stops: list[int] | None = None, whole_text: bool = False) -> SetResult:
    """Greedy exact match (`is_exact_match`) and the token-mean loss of the completions, both tokenized as
    training tokenizes them: prompt and completion apart, or with `whole_text` as the text prompt + completion
    reads whole (data.tokenizer.whole_text_ids, an augmenting model's reading across tokenizers). `stops`: the ids
    where `generate` ends a row (answer_text cuts the examples there)."""
    if tokenizer.eos_id is None:
        raise ConfigError(f"exact match needs an end-of-sequence token, and data.tokenizer {tokenizer.path} has none")
    correct, loss_sum, loss_tokens, examples = 0, 0.0, 0, []
    records = list(records)
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        if whole_text:
            prompts, references = map(list, zip(*(whole_text_ids(tokenizer, r[prompt_field], r[completion_field])
                                                  for r in chunk)))
        else:
            prompts = [prompt_ids(tokenizer, r[prompt_field]) for r in chunk]
            references = [completion_ids(tokenizer, r[completion_field]) for r in chunk]
        empty = next((start + i for i, prompt in enumerate(prompts) if not prompt), None)
        if empty is not None:  # generation has nothing to start from, and a row of padding scores garbage
            raise ConfigError(f"record {empty} of the set reads to no prompt token through {tokenizer.path}: the "
                              "tokenizer has no bos, and the prompt is empty or its tokens all run into the completion")
        ids, mask = _left_pad(prompts, tokenizer.pad_id)
        n = max_new_tokens or max(map(len, references))
        texts = [r[prompt_field] for r in chunk]
        out = (generate(ids, mask, n, texts) if getattr(generate, "reads_text", False)
               else generate(ids, mask, n))[:, ids.shape[1]:]
        for record, row, reference in zip(chunk, out.tolist(), references):
            hit = is_exact_match(row, reference)
            correct += hit
            if len(examples) < keep_examples:
                examples.append({"prompt": record[prompt_field], "expected": record[completion_field],
                                 "got": answer_text(tokenizer, row, stops), "correct": hit})
        summed, n = _summed_completion_loss(logits_fn, prompts, references, tokenizer.pad_id, chunk)
        loss_sum, loss_tokens = loss_sum + summed, loss_tokens + n
    return SetResult(correct / max(1, len(records)), loss_sum / max(1, loss_tokens), len(records), examples)


def _summed_completion_loss(logits_fn: LogitsFn, prompts: list[list[int]], completions: list[list[int]],
                            pad_id: int, records: list[dict]) -> tuple[float, int]:
    """Teacher-forced loss summed over the completion tokens of a batch, and their number: summed, so that
    the set's loss is a mean over tokens, whatever the batches' sizes."""
    full, full_mask = _left_pad([p + c for p, c in zip(prompts, completions)], pad_id)
    labels = torch.full_like(full, IGNORE)
    for r, c in enumerate(completions):
        labels[r, full.shape[1] - len(c):] = torch.tensor(c)
    if getattr(logits_fn, "reads_text", False):
        logits = logits_fn(full, full_mask, records)
    else:
        logits = logits_fn(full, full_mask)
    return loss_from_logits(logits, labels.to(logits.device), "sum").item(), int(labelled_tokens(labels))


def hf_model_fns(model, eos_id, pad_id) -> tuple[GenerateFn, LogitsFn]:
    """A transformers causal LM on its own, with the same left-padding position handling."""
    def generate(ids, mask, n):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              eos_token_id=eos_id, pad_token_id=pad_id)

    def logits(ids, mask):
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return generate, logits


def composed_fns(model, eos_id, pad_id, refresh_augmenting: bool = True) -> tuple[GenerateFn, LogitsFn]:
    def generate(ids, mask, n):
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=eos_id, pad_token_id=pad_id,
                              refresh_augmenting=refresh_augmenting)

    def logits(ids, mask):
        return model(ids, attention_mask=mask).logits
    return generate, logits


def on_device(fns: tuple[GenerateFn, LogitsFn], model) -> tuple[GenerateFn, LogitsFn]:
    """The same functions run where the model's weights are (a GPU when there is one): generated tokens come
    back to the CPU to be decoded, logits stay where they are (the loss is computed there, no B x T x V copy)."""
    device = next(model.parameters()).device
    generate, logits = fns
    return (lambda ids, mask, n: generate(ids.to(device), mask.to(device), n).cpu(),
            lambda ids, mask: logits(ids.to(device), mask.to(device)))


def format_table(results: dict[str, dict[str, SetResult]], metric: str = "exact_match") -> str:
    """Markdown table: rows = data sets, columns = models."""
    models = list(results)
    sets = list(dict.fromkeys(s for per_model in results.values() for s in per_model))
    lines = ["| data set | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for s in sets:
        cells = []
        for m in models:
            r = results[m].get(s)
            if r is None:
                cells.append("–")
            else:
                cells.append(f"{100 * r.exact_match:.1f}" if metric == "exact_match" else f"{r.loss:.3f}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_json(results: dict[str, dict[str, SetResult]]) -> dict:
    return {m: {s: vars(r) for s, r in per.items()} for m, per in results.items()}


def recorded_completion_decoding(training: dict, cfg, tokenizer: Tokenizer) -> str:
    """How decoding across tokenizers rebuilds a completion's text: as the export's training record (composition.json's
    "training") says of its training records, else (an export that predates it) as the recipe's training records
    read."""
    recorded = training.get("completion_decoding")
    if recorded is not None:
        return recorded
    return training_completion_decoding(cfg.data, tokenizer) if cfg.data.train else "after_prompt"


def load_export(directory, config: dict, anchor_path: str, anchor_revision: str | None = None):
    """A trained export whose composition.json is `config`: a CALM composition, or the LoRA baseline (`method`)."""
    if config.get("method") == "lora":
        return LoRAAnchor.from_export(directory, load_causal_lm(anchor_path, anchor_revision)).eval()
    return ComposedModel.from_composition(directory, anchor=anchor_path).eval()


def run(cfg, sets: dict[str, str], compositions: dict[str, str], base_models: list[str], batch_size: int = 64,
        max_new_tokens: int | None = None, limit: int | None = None,
        prefix_only: bool = False) -> dict[str, dict[str, SetResult]]:
    """Every column on every set. With data.different_tokenizers each augmenting model alone reads (and is scored
    in) its own tokenizer's ids, of the text prompt + completion read whole as the composition gives it, and a
    composition trained across tokenizers decodes across them."""
    across = cfg.data.different_tokenizers
    tokenizers = model_tokenizers(cfg) if across else None
    tokenizer = tokenizers.anchor if across else anchor_tokenizer(cfg)
    pad = tokenizer.pad_id
    device = local_device(DistEnv.from_environ())
    fns: dict[str, tuple[GenerateFn, LogitsFn]] = {}
    stops: dict[str, list[int]] = {}  # per column: each model stops at its own config's eos ids too
    # each augmenting column's tokenizer; across tokenizers it reads the text whole, in the composition as alone
    column_tokenizer: dict[str, Tokenizer] = {}
    if "augmenting" in base_models:
        revisions = cfg.model.augmenting_revisions or [None] * len(cfg.model.augmenting)
        for i, (path, revision) in enumerate(zip(cfg.model.augmenting, revisions)):
            name = "augmenting" if len(cfg.model.augmenting) == 1 else f"augmenting{i}"
            model = load_causal_lm(path, revision, attn_implementation=cfg.model.attn_implementation).eval().to(device)
            own = tokenizers.augmenting[i] if across else tokenizer
            column_tokenizer[name] = own
            stops[name] = stop_ids(own, model.config)
            fns[name] = on_device(hf_model_fns(model, stops[name], own.pad_id), model)
    if "anchor" in base_models:
        model = load_causal_lm(cfg.model.anchor, cfg.model.anchor_revision,
                               attn_implementation=cfg.model.attn_implementation).eval().to(device)
        stops["anchor"] = stop_ids(tokenizer, model.config)
        fns["anchor"] = on_device(hf_model_fns(model, stops["anchor"], pad), model)
    for name, directory in compositions.items():
        config = export_config(directory)
        training = config.get("training", {})
        model = load_export(directory, config, cfg.model.anchor, cfg.model.anchor_revision).to(device)
        stops[name] = stop_ids(tokenizer, model.model.config if isinstance(model, LoRAAnchor) else model.anchor.config)
        if bool(training.get("different_tokenizers")) != (across and not isinstance(model, LoRAAnchor)):
            raise ConfigError(f"--composition {name}: {directory} was trained "
                              f"{'across' if not across else 'without different'} tokenizers: set "
                              f"data.different_tokenizers={'true' if not across else 'false'} as in its training")
        if across and not isinstance(model, LoRAAnchor):
            if prefix_only:
                raise ConfigError("--prefix-only is not supported with data.different_tokenizers: decoding across "
                                  "tokenizers always refreshes the augmenting readings")
            fns[name] = across_tokenizer_fns(model, cfg.data, tokenizer, tokenizers.augmenting, stops[name],
                                             recorded_completion_decoding(training, cfg, tokenizer))
            continue
        # LoRAAnchor offers the same generate / forward
        fns[name] = on_device(composed_fns(model, stops[name], pad), model)
        if prefix_only and not isinstance(model, LoRAAnchor):
            stops[f"{name}_prefix_only"] = stops[name]
            fns[f"{name}_prefix_only"] = on_device(composed_fns(model, stops[name], pad, refresh_augmenting=False),
                                                   model)
    results: dict[str, dict[str, SetResult]] = {}
    for name, (gen, logits) in fns.items():
        results[name] = {}
        for set_name, path in sets.items():
            records = [record for part in open_source(path, f"--set {set_name}") for _, record in part.records()]
            records = records[:limit] if limit else records
            results[name][set_name] = evaluate_set(gen, logits, column_tokenizer.get(name, tokenizer), records,
                                                   batch_size=batch_size,
                                                   max_new_tokens=max_new_tokens,
                                                   prompt_field=cfg.data.prompt_field,
                                                   completion_field=cfg.data.completion_field,
                                                   stops=stops[name],
                                                   whole_text=across and name in column_tokenizer)
    return results


def _named(items: list[str], what: str, default_name: str) -> dict[str, str]:
    named = {}
    for item in items:
        name, path = item.split("=", 1) if "=" in item else (default_name, item)
        if not Path(path).exists():
            raise ConfigError(f"{what} {name}: {path} does not exist")
        named[name] = path
    return named


def main(args, cfg) -> int:
    """`calm-dist eval`: `args` as calm_dist.cli.eval_arguments defines them, `cfg` the loaded recipe."""
    sets = _named(args.set, "--set", "eval")
    if not sets:
        raise ConfigError("no --set NAME=PATH given")
    compositions = _named(args.composition or [str(Path(cfg.train.output_dir) / "final")], "--composition", "composed")
    base_models = [m.strip() for m in args.models.split(",") if m.strip()]
    results = run(cfg, sets, compositions, base_models, args.batch_size, args.max_new_tokens, args.limit,
                  args.prefix_only)
    print("exact match (%)\n" + format_table(results) + "\n\ncompletion loss\n" + format_table(results, "loss"))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(results), indent=2))
    if args.mlflow_run_id or cfg.tracking.enabled:  # into each export's training run, the rest into child runs
        log_results(cfg, to_json(results), compositions, args.mlflow_run_id)
    return 0

