"""`calm-dist prepare | cache | train | eval | generate | compare | plan | lm-eval`.

Every command that takes a config reads the same recipe format as `calm_dist/train.py`
(`--config recipe.yaml key=value ...`) and refuses a bad one with one line and exit code 2.

Each command imports what it runs inside its function: `calm-dist --help`, a bad argument and a bad config
never wait for torch.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from calm_dist.config import ConfigError, load_config
from calm_dist.console import quiet_libraries
from calm_dist.train import main as train_main
from calm_dist.training.dist_env import DistEnv


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML recipe: a path, or a shipped recipe's name (tiny)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")


def _load(args, need_train_data: bool = True, training: bool = False):
    from calm_dist.training.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    env = DistEnv.from_environ()
    return cfg, env, preflight(cfg, env, need_train_data=need_train_data, training=training)


def cmd_prepare(args) -> int:
    """Tokenize data.train and data.eval into token shards once (training and caching reuse them)."""
    cfg = load_config(args.config, args.overrides)
    workers = cfg.data.workers if args.workers is None else args.workers
    if workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {workers}")
    from calm_dist.data.aligned_rows import reading_tokenizers
    from calm_dist.data.prepare import load_rows, read_manifest
    from calm_dist.data.sources import open_source
    from calm_dist.data.tokenizer import anchor_tokenizer
    from calm_dist.training.preflight import data_cache_dir

    splits = {key: spec for key, spec, _ in cfg.data.train_sources() + [("data.eval", cfg.data.eval, 1.0)] if spec}
    if not splits:
        raise ConfigError("data.train and data.eval are not set: nothing to prepare")
    for key, spec in splits.items():
        open_source(spec, key)  # every input exists and is of one kind, before the first one is tokenized
    tokenizer = anchor_tokenizer(cfg)  # data.tokenizer, else the anchor's own
    augmenting = reading_tokenizers(cfg)  # with different tokenizers the rows fit each one's length
    for key, spec in splits.items():
        rows = load_rows(cfg.data, spec, key, tokenizer, data_cache_dir(cfg), workers=workers, augmenting=augmenting)
        m = read_manifest(rows.directory)
        print(f"{key}: {m['n_docs']:,} records, {m['n_tokens']:,} tokens ({m['dtype']}), {len(rows):,} rows of "
              f"{cfg.data.seq_len} in {len(m['shards'])} shards -> {rows.directory}", flush=True)
    return 0


def cmd_cache(args) -> int:
    from calm_dist.training.states_cache import check_rows_per_shard, run_cache_job

    check_rows_per_shard(args.rows_per_shard)  # before any model or data is read
    cfg, env, resolved = _load(args)
    if args.estimate:
        from calm_dist.training.states_cache import estimate

        print(json.dumps(estimate(cfg, resolved, flops_per_s=args.flops_per_s, read_bytes_per_s=args.read_bytes_per_s,
                                  write_bytes_per_s=args.write_bytes_per_s), indent=2))
        return 0
    quiet_libraries()
    for split, path in run_cache_job(cfg, env, resolved, rows_per_shard=args.rows_per_shard).items():
        if env.is_main:
            print(f"cached {split}: {path}")
    return 0


def cmd_train(args) -> int:
    return train_main((["--config", args.config] if args.config else []) + args.overrides)


def cmd_eval(args) -> int:
    cfg = load_config(args.config, args.overrides)  # a bad config is refused before torch loads
    from calm_dist.task_eval import main as eval_main

    return eval_main(args, cfg)


def cmd_generate(args) -> int:
    sampling = sampling_arguments(args)  # bad values are refused before torch loads
    import torch

    from calm_dist import ComposedModel
    from calm_dist.data.tokenizer import Tokenizer, saved_tokenizer
    from calm_dist.model.composition import read_composition_config
    from calm_dist.model.hub import local_path
    from calm_dist.task_eval import answer_text, stop_ids
    from calm_dist.training.dist_env import local_device

    training = read_composition_config(args.composition).get("training", {})
    across = bool(training.get("different_tokenizers"))
    if across and sampling["do_sample"]:
        raise ConfigError("calm-dist generate: a composition of different tokenizers decodes greedily: drop "
                          "--temperature, --top-k and --top-p")
    if across and args.compile:
        raise ConfigError("calm-dist generate: --compile decodes compositions whose models share one tokenizer; "
                          "this one reads the text through several (data.different_tokenizers)")
    if args.augmenting_tokenizer and not across:
        raise ConfigError("--augmenting-tokenizer: this composition's augmenting models read the anchor's tokens "
                          "(it was not trained with data.different_tokenizers)")
    device = local_device(DistEnv.from_environ())
    model = ComposedModel.from_composition(args.composition).to(device)
    recorded = training.get("tokenizers", {})
    if args.tokenizer:
        tokenizer = Tokenizer(args.tokenizer, "--tokenizer")
    elif across and recorded.get("anchor"):  # the one its training read the text with
        key = "the composition's data.tokenizer"
        tokenizer = Tokenizer(local_path(recorded["anchor"], None, key, weights=False), key)
    else:  # the one saved with the anchor the composition names
        anchor = model.description["anchor"]
        tokenizer = saved_tokenizer(anchor["name_or_path"], anchor["revision"], "the composition's anchor")
        if tokenizer is None:
            raise ConfigError(f"the anchor {anchor['name_or_path']} was saved without a tokenizer: pass --tokenizer")
    stops = stop_ids(tokenizer, model.anchor.config)  # Llama-3 style configs list several eos ids
    if across:
        new = generate_across(model, args, tokenizer, training, stops)
    else:
        ids = [tokenizer.bos_id] * (tokenizer.bos_id is not None) + tokenizer.encode(args.prompt)
        generator = torch.Generator(device).manual_seed(args.seed) if sampling["do_sample"] else None
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=args.max_new_tokens, **sampling,
                             generator=generator, eos_token_id=stops or None, pad_token_id=tokenizer.pad_id,
                             compile_step=args.compile)
        new = out[0, len(ids):].tolist()
    print(answer_text(tokenizer, new, stops))
    return 0


def generate_across(model, args, anchor_tokenizer, training: dict, stops: list[int]) -> list[int]:
    """Greedy decoding of a composition whose augmenting models read the text through their own tokenizers
    (docs/cross_tokenizer.md): each model's tokenizer as in training (--augmenting-tokenizer, else the one the
    composition recorded, else the one saved with the model, else the anchor's); returns the new anchor ids.
    `training`: what the composition recorded of its training."""
    from calm_dist.data.tokenizer import augmenting_tokenizer
    from calm_dist.model.cross_tokenizer_generation import generate_across_tokenizers

    described = model.description["augmenting"]
    recorded = training.get("tokenizers", {}).get("augmenting")
    given, key = (args.augmenting_tokenizer, "--augmenting-tokenizer") if args.augmenting_tokenizer else \
        (recorded, "the composition's data.augmenting_tokenizers")
    given = given or [None] * len(described)
    if len(given) != len(described):
        raise ConfigError(f"{key}: {len(given)} tokenizer(s) for {len(described)} augmenting model(s)")
    tokenizers = [augmenting_tokenizer(i, d["name_or_path"], d["revision"], g, anchor_tokenizer, key)
                  for i, (d, g) in enumerate(zip(described, given))]
    # the new ids become text as the training records' completions read (an export that predates the record: as a
    # text reads on)
    decoding = training.get("completion_decoding", "after_prompt")
    return generate_across_tokenizers(model, [args.prompt], anchor_tokenizer, tokenizers, decoding=decoding,
                                      max_new_tokens=args.max_new_tokens, eos_token_id=stops or None).ids[0]


def sampling_arguments(args) -> dict:
    """Greedy unless --temperature, --top-k or --top-p asks for sampling (a temperature of 1 when only a top-k or
    top-p is given); values out of range are one line, exit 2."""
    t, k, p = args.temperature, args.top_k, args.top_p
    if t is not None and t < 0:
        raise ConfigError(f"--temperature must be >= 0, got {t}")
    if k is not None and k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {k}")
    if p is not None and not 0 < p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {p}")
    do_sample = bool(t) or k is not None or p is not None
    if t == 0 and do_sample:
        raise ConfigError("--temperature 0 is greedy decoding: it takes no --top-k or --top-p")
    return {"do_sample": do_sample, "temperature": t or 1.0, "top_k": k, "top_p": p}


def eval_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `calm-dist eval` (calm_dist.task_eval.main reads them)."""
    p.add_argument("--config", help="the training recipe (models, tokenizer)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--composition", action="append", default=[], metavar="[NAME=]DIR",
                   help="a trained export (composition or LoRA baseline); repeat for several columns "
                        "(default: composed=<train.output_dir>/final)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=PATH", help="a prompt/completion data set")
    p.add_argument("--models", default="augmenting,anchor",
                   help="base-model columns: anchor, augmenting (comma list; empty for none)")
    p.add_argument("--prefix-only", action="store_true",
                   help="also evaluate each composition with the augmenting models seeing the prompt only")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--limit", type=int, help="at most this many examples per set")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--mlflow-run-id", help="the parent of the child runs the base models' results go to (default: "
                                           "the first export's training run; each export's results go to its own)")


# These own their argument parsing: everything after the verb goes to their main() untouched.
DELEGATED = {"compare": ("calm_dist.tracking.compare", "compare MLflow runs (calm_dist/tracking/compare.py)"),
             "lm-eval": ("calm_dist.harness_cli",
                         "lm-evaluation-harness with --model calm registered (calm_dist/harness.py)"),
             "plan": ("calm_dist.planning.plan_cli",
                      "predict memory, communication and cache size for a cluster (calm_dist/planning/plan_cli.py)")}


def input_errors() -> tuple[type[Exception], ...]:
    """The errors that mean bad input (one line, exit 2, no traceback): ConfigError, and CacheError and
    CompositionError once their modules are loaded. A module that was never imported raised nothing, and
    importing one here would load torch."""
    errors: list[type[Exception]] = [ConfigError]
    for module, name in (("calm_dist.training.states_cache", "CacheError"),
                         ("calm_dist.model.composition", "CompositionError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="calm-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize the data once into memory-mapped token shards")
    _config_args(p)
    p.add_argument("--workers", type=int, help="tokenizing processes (default data.workers; 0: one per core)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("cache", help="cache the augmenting models' states at the composed layers")
    _config_args(p)
    p.add_argument("--estimate", action="store_true", help="print disk size and cache-vs-recompute break-even only")
    p.add_argument("--rows-per-shard", type=int, default=256,
                   help="rows per cache shard; a resumed build must use the one it started with")
    p.add_argument("--flops-per-s", type=float, default=1e11, help="--estimate: achieved training FLOP/s (all ranks)")
    p.add_argument("--read-bytes-per-s", type=float, default=1e9, help="--estimate: cache read bandwidth")
    p.add_argument("--write-bytes-per-s", type=float, default=5e8, help="--estimate: cache write bandwidth")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("train", help="train a composition (same as calm_dist/train.py)")
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="exact match and loss of anchor, augmenting and composed models")
    eval_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="decode from a saved composition")
    p.add_argument("composition", help="a directory written by save_composition (e.g. <output_dir>/final)")
    p.add_argument("--tokenizer", help="default: the tokenizer saved with the composition's anchor (across "
                                       "tokenizers: the data.tokenizer it was trained with, when it had one)")
    p.add_argument("--augmenting-tokenizer", action="append", metavar="PATH",
                   help="across tokenizers (data.different_tokenizers), once per augmenting model; default: each "
                        "one the composition was trained with")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy; 0: greedy)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens (temperature 1 unless given)")
    p.add_argument("--top-p", type=float, help="sample from the nucleus of mass p (temperature 1 unless given)")
    p.add_argument("--seed", type=int, default=0, help="the sampling generator's seed")
    p.add_argument("--compile", action="store_true",
                   help="one torch.compile graph per decoding step (static caches): faster steps after a "
                        "compilation of tens of seconds, so it pays for long generations (benchmarks/README.md, P4r)")
    p.set_defaults(func=cmd_generate)

    for name, (_, text) in DELEGATED.items():
        sub.add_parser(name, help=text)

    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        return args.func(args)
    except Exception as e:
        if not isinstance(e, input_errors()):
            raise
        print(f"calm-dist: error: {e}", file=sys.stderr)
        return 2


def console_main() -> None:
    """The `calm-dist` command and `python -m calm_dist.cli`: main(), then the process ends without interpreter
    finalization (dist_env.exit_process). main() itself returns, for callers in the same process."""
    from calm_dist.training.dist_env import run_then_exit

    run_then_exit(main)


if __name__ == "__main__":
    console_main()
