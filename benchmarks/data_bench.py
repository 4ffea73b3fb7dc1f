#!/usr/bin/env python
"""The data path at scale (issue #16): D1-D4 on a synthetic corpus, ratios measured side by side in one run.

    python benchmarks/data_bench.py [--scale 1] [--json benchmarks/results/data_scale1.json] [--work DIR]
                                    [--only D1,D2,D3,D4] [--repeats 3] [--reuse-prepared]

It builds, under --work (reused between runs when the settings match):
  - a seeded synthetic text corpus: JSONL files of {"text": ...} documents planned at 200-2,000 tokens, words
    drawn from a pseudo-word lexicon with Zipf frequencies; files of 2.5M x scale tokens each, 8 of them for the 1x
    corpus (20M x scale tokens) and 80 for the 10x corpus (200M x scale; its first 8 files are the 1x files,
    hard-linked);
  - a byte-level BPE tokenizer trained here with `tokenizers` (vocabulary 16,384: uint16 shards), saved as a
    transformers tokenizer directory (PreTrainedTokenizerFast; <pad> 0, <s> 1, </s> 2, <unk> 3);
  - the tiny models of calm_dist.tiny_setup (a 4-block Llama anchor, a 4-block GPT-2 augmenting model) with that
    vocabulary and those special ids.

  D1  per-rank peak RSS (VmHWM) of a 2-rank ZeRO-3 run, 20 steps, format=text, packing, seq_len 64, on the
      prepared 10x corpus / on the prepared 1x corpus                                          target <= 1.1
  D2  `calm-dist prepare --workers 2` tokens/s / `datasets` (load_dataset json + map(batched=True,
      num_proc=2)) with the same tokenizer on the same 1x files                                 target >= 1.0
      `calm-dist prepare --workers 2` / `--workers 1` tokens/s                                  target >= 1.7
  D3  launch -> first "step 1/" line of that run, on the 10x corpus / on the 1x corpus          target <= 1.2
      (beside it, in one process: the data part of a rank's start-up on each corpus, interleaved)
  D4  bytes on disk per token of the prepared 10x shards                                         target <= 2.1

Times are wall-clock (the work is spread over processes; CPU time would not show the parallelism): the
variants of a ratio run one after another, round-robin with the order alternating, and the medians are compared.
Every process runs one thread (OMP_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false); D2 also times, for
information, `--workers 1` with the tokenizer's own thread pool on (TOKENIZERS_PARALLELISM unset, a user's
default). The data is prepared before the training runs, so D1 and D3 measure training, not preparing.
benchmarks/README.md ("The data path at scale") has the results and what they mean.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
from data_corpus import (DOC_TOKENS, FILE_TOKENS, FILES_10X, FILES_1X, VOCAB, build_corpus,  # noqa: E402
                         build_tokenizer, disk_needed)
from data_report import analyse, markdown  # noqa: E402
from machine import machine_info as base_machine_info  # noqa: E402

from calm_dist.training.dist_env import free_port  # noqa: E402
REPO = HERE.parent

SEQ_LEN, STEPS, MICRO_BATCH = 64, 20, 8


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {msg}", flush=True)


STARTED = time.perf_counter()


def child_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


# ========================================================================================== measurements

def busy_jiffies() -> int:
    """CPU time (clock ticks) the whole machine has spent busy, every core and process together."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]) - v[3] - v[4]  # user nice system idle iowait irq softirq steal: all but idle and iowait


class Usage:
    """Wall time, the CPU time of the children waited for meanwhile (user + sys, every descendant), and the
    cores the rest of the machine kept busy meanwhile (other jobs share it): `others_cores` 0.5 means half a
    core was taken from this measurement on average."""

    def __enter__(self):
        self.t0, self.ru0, self.j0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN), busy_jiffies()
        self.self0 = resource.getrusage(resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc):
        ru, me = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
        self.wall = time.perf_counter() - self.t0
        self.cpu = (ru.ru_utime - self.ru0.ru_utime) + (ru.ru_stime - self.ru0.ru_stime)
        mine = self.cpu + (me.ru_utime - self.self0.ru_utime) + (me.ru_stime - self.self0.ru_stime)
        busy = (busy_jiffies() - self.j0) / os.sysconf("SC_CLK_TCK")
        self.others_cores = max(0.0, busy - mine) / self.wall if self.wall > 0 else 0.0

    def as_dict(self) -> dict:
        return {"wall_s": self.wall, "cpu_s": self.cpu, "others_cores": self.others_cores}


def run_timed(cmd: list[str], env: dict, log_path: Path, timeout: float = 3600) -> dict:
    """`cmd` from launch to exit: Usage's wall_s, cpu_s, others_cores; its output goes to log_path; a failure
    raises with the output's tail."""
    with open(log_path, "w") as out, Usage() as usage:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
    return usage.as_dict()


def write_recipe(work: Path, tok_dir: Path, models: Path) -> Path:
    import yaml

    recipe = {
        "model": {"anchor": str(models / "anchor"), "augmenting": [str(models / "augmenting")],
                  "layer_pairs": [[[1, 1], [3, 3]]]},
        "data": {"train": str(work / "corpus_1x"), "tokenizer": str(tok_dir), "format": "text", "packing": True,
                 "seq_len": SEQ_LEN},
        "optim": {"lr": 3.0e-3, "warmup_steps": 2},
        "train": {"steps": STEPS, "micro_batch_size": MICRO_BATCH, "log_every": 1, "output_dir": str(work / "run")},
        "distributed": {"deepspeed_config": str(REPO / "ds_configs" / "zero3.json")},
        "tracking": {"enabled": False},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def prepare_cmd(recipe: Path, corpus: Path, cache: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "calm_dist.cli", "prepare", "--config", str(recipe), "--workers", str(workers),
            f"data.train={corpus}", f"data.cache_dir={cache}"]


def prepared_dir(cache: Path) -> Path:
    dirs = [d for d in cache.glob("tokens-*") if (d / "manifest.json").exists()]
    if len(dirs) != 1:
        raise RuntimeError(f"{cache}: expected one prepared directory, found {dirs}")
    return dirs[0]


def shard_stats(directory: Path) -> dict:
    """Bytes on disk (apparent and allocated) of a prepared directory, per token; document lengths."""
    import numpy as np

    manifest = json.loads((directory / "manifest.json").read_text())
    files = [p for p in directory.iterdir() if p.is_file()]
    apparent = sum(p.stat().st_size for p in files)
    allocated = sum(p.stat().st_blocks * 512 for p in files)
    token_bytes = sum(p.stat().st_size for p in files if p.name.endswith(".tokens.bin"))
    lengths = np.concatenate([np.diff(np.load(p)) for p in sorted(directory.glob("shard-*.index.npy"))])
    n = manifest["n_tokens"]
    return {"n_tokens": n, "n_docs": manifest["n_docs"], "n_rows": manifest["n_rows"], "dtype": manifest["dtype"],
            "n_shards": len(manifest["shards"]), "files": len(files), "bytes": apparent,
            "bytes_allocated": allocated, "bytes_per_token": apparent / n, "bytes_allocated_per_token": allocated / n,
            "token_bytes_per_token": token_bytes / n,
            "doc_tokens": {"min": int(lengths.min()), "p1": float(np.percentile(lengths, 1)),
                           "median": float(np.median(lengths)), "p99": float(np.percentile(lengths, 99)),
                           "max": int(lengths.max()), "mean": float(lengths.mean())},
            "shard_sha256": [s["files"] for s in manifest["shards"]]}


def child_startup(args) -> int:
    """D3's data part, in one process: what a rank does with the data before its first step (open_source, then
    load_rows of prepared shards: the fingerprint memo, the manifest, TokenRows; the sampler's first batch; one
    micro-batch read), on each corpus, interleaved, `repeats` times after a warm-up."""
    import resource as res

    from calm_dist.config import load_config
    from calm_dist.data.prepare import load_rows
    from calm_dist.data.sampler import GlobalBatchSampler
    from calm_dist.data.sources import open_source
    from calm_dist.data.tokenizer import Tokenizer

    corpora = {c: (str(Path(args.work) / f"corpus_{c}"), str(Path(args.work) / f"cache_{c}")) for c in ("1x", "10x")}
    cfg = load_config(args.recipe)
    tok = Tokenizer(cfg.data.tokenizer)
    times = {c: {"wall": [], "cpu": []} for c in corpora}
    rows_n = {}

    def once(c):
        spec, cache = corpora[c]
        open_source(spec, "data.train")
        rows = load_rows(cfg.data, spec, "data.train", tok, cache, is_writer=False)
        sampler = GlobalBatchSampler(len(rows), MICRO_BATCH * 2, cfg.train.seed)
        rows.batch(sampler.micro_batch_indices(0, 0, 0, 2, MICRO_BATCH))
        rows.close()
        rows_n[c] = len(rows)

    for c in corpora:
        once(c)  # warm-up
    for r in range(args.repeats):
        for c in (("1x", "10x") if r % 2 == 0 else ("10x", "1x")):
            w0, c0 = time.perf_counter(), time.process_time()
            once(c)
            times[c]["wall"].append(time.perf_counter() - w0)
            times[c]["cpu"].append(time.process_time() - c0)
    Path(args.json).write_text(json.dumps({
        "times": times, "rows": rows_n, "sampler_permutation_bytes": {c: 8 * n for c, n in rows_n.items()},
        "peak_rss_bytes": res.getrusage(res.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0


def child_datasets(args) -> int:
    """D2's reference, in its own process: load_dataset("json") of the files (num_proc workers), then
    map(batched=True, num_proc) with the same tokenizer, bos + text + eos as prepare writes each document."""
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    files = sorted(str(p) for p in Path(args.files).glob("*.jsonl"))
    t1 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=args.cache, num_proc=args.num_proc)
    t2 = time.perf_counter()

    def encode(batch):
        return {"input_ids": [[bos] + ids + [eos]
                              for ids in tok(batch["text"], add_special_tokens=False)["input_ids"]]}

    out = ds.map(encode, batched=True, num_proc=args.num_proc, remove_columns=ds.column_names)
    t3 = time.perf_counter()
    n_tokens = int(pc.sum(pc.list_value_length(out.data.column("input_ids"))).as_py())
    first = out[0]["input_ids"]
    Path(args.json).write_text(json.dumps({
        "import_and_tokenizer_s": t1 - t0, "load_dataset_s": t2 - t1, "map_s": t3 - t2, "n_tokens": n_tokens,
        "n_docs": len(out), "first_doc_sha256": hashlib.sha256(json.dumps(first).encode()).hexdigest(),
        "cache_files": [c["filename"] for c in out.cache_files]}))
    return 0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure_d2(work: Path, recipe: Path, tok_dir: Path, repeats: int, rayon: bool) -> dict:
    """prepare --workers 2, --workers 1 and datasets (num_proc=2) on the 1x corpus, round-robin, fresh caches."""
    corpus = work / "corpus_1x"
    variants = ["prepare_w2", "prepare_w1", "datasets_np2"] + (["prepare_w1_rayon"] if rayon else [])
    times: dict[str, list[float]] = {v: [] for v in variants}
    extra: dict[str, list[dict]] = {v: [] for v in variants}
    n_tokens = None
    hashes = {}
    for r in range(repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            cache = work / f"d2_{v}"
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir()
            logfile = work / f"d2_{v}.log"
            if v.startswith("prepare"):
                workers = 2 if v == "prepare_w2" else 1
                env = child_env(TOKENIZERS_PARALLELISM=None) if v.endswith("rayon") else child_env()
                usage = run_timed(prepare_cmd(recipe, corpus, cache, workers), env, logfile)
                stats = shard_stats(prepared_dir(cache))
                n_tokens = n_tokens or stats["n_tokens"]
                if stats["n_tokens"] != n_tokens:
                    raise RuntimeError(f"{v}: {stats['n_tokens']} tokens, another prepare wrote {n_tokens}")
                hashes.setdefault(v, stats["shard_sha256"])
                extra[v].append(usage)
            else:
                out_json = work / "d2_datasets.json"
                usage = run_timed([sys.executable, str(HERE / "data_bench.py"), "--child-datasets",
                                   "--files", str(corpus), "--tokenizer", str(tok_dir), "--cache", str(cache),
                                   "--num-proc", "2", "--json", str(out_json)], child_env(), logfile)
                info = json.loads(out_json.read_text())
                info.update(usage, cache_bytes=dir_bytes(cache))
                extra[v].append(info)
            times[v].append(usage["wall_s"])
            log(f"  D2 round {r + 1}/{repeats}: {v} {usage['wall_s']:.1f} s wall, {usage['cpu_s']:.1f} s CPU, "
                f"other jobs took {usage['others_cores']:.2f} cores")
            shutil.rmtree(cache, ignore_errors=True)
    ds_tokens = {e["n_tokens"] for e in extra["datasets_np2"]}
    same_bytes = all(h == hashes["prepare_w2"] for h in hashes.values())
    return {"variants": variants, "wall_s": times, "runs": extra, "n_tokens": n_tokens,
            "datasets_n_tokens": sorted(ds_tokens), "same_tokens_as_datasets": ds_tokens == {n_tokens},
            "prepare_bytes_identical_across_workers": same_bytes,
            "tokens_per_s": {v: n_tokens / statistics.median(t) for v, t in times.items()}}


class RankWatcher(threading.Thread):
    """Polls the rank processes (the launcher's children, identified by RANK in their environment) every
    `period` s: VmHWM (the kernel's peak RSS of the process: exact, however short the peak) and the largest
    RssAnon / RssFile seen."""

    def __init__(self, pid: int, period: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.period, self.stop = pid, period, threading.Event()
        self.ranks: dict[int, dict] = {}

    @staticmethod
    def _status(pid: int) -> dict:
        out = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    def run(self):
        import psutil

        try:
            agent = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            try:
                kids = agent.children(recursive=False)
            except psutil.NoSuchProcess:
                break
            for k in kids:
                try:
                    info = self.ranks.get(k.pid)
                    if info is None:
                        env = k.environ()
                        if "RANK" not in env:
                            continue
                        info = self.ranks[k.pid] = {"rank": int(env["RANK"]), "hwm": 0, "anon": 0, "file": 0}
                    s = self._status(k.pid)
                    info["hwm"] = max(info["hwm"], s.get("VmHWM", 0))
                    info["anon"] = max(info["anon"], s.get("RssAnon", 0))
                    info["file"] = max(info["file"], s.get("RssFile", 0))
                except (psutil.Error, OSError, ValueError):
                    continue
            self.stop.wait(self.period)


def train_once(work: Path, recipe: Path, corpus: str, port: int) -> dict:
    """One 2-rank training run on a prepared corpus: launch -> 'step 1/' seconds, per-rank peak RSS."""
    cache = work / f"cache_{corpus}"
    out_dir = work / f"run_{corpus}"
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(REPO / "calm_dist" / "train.py"), "--config", str(recipe),
           f"data.train={work / ('corpus_' + corpus)}", f"data.cache_dir={cache}", f"train.output_dir={out_dir}"]
    lines: list[str] = []
    first_step = {}
    usage = Usage().__enter__()
    t0 = usage.t0
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    watcher = RankWatcher(proc.pid)
    watcher.start()
    pattern = re.compile(r"\bstep 1/\d+")
    last_step = None
    for line in proc.stdout:
        now = time.perf_counter() - t0
        lines.append(line)
        if "t" not in first_step and pattern.search(line):
            first_step["t"] = now
        if re.search(rf"\bstep {STEPS}/{STEPS}\b", line):
            last_step = now
    rc = proc.wait()
    usage.__exit__(None, None, None)
    watcher.stop.set()
    watcher.join()
    (work / f"train_{corpus}.log").write_text("".join(lines))
    if rc != 0 or "t" not in first_step:
        raise RuntimeError(f"training on {corpus} exited {rc}:\n{''.join(lines)[-3000:]}")
    ranks = sorted(watcher.ranks.values(), key=lambda r: r["rank"])
    if len(ranks) != 2:
        raise RuntimeError(f"saw {len(ranks)} rank processes, expected 2")
    return {"launch_to_step1_s": first_step["t"], "launch_to_last_step_s": last_step, "total_s": usage.wall,
            "cpu_s": usage.cpu, "others_cores": usage.others_cores,
            "peak_rss_bytes": [r["hwm"] for r in ranks], "max_rss_anon_bytes": [r["anon"] for r in ranks],
            "max_rss_file_bytes": [r["file"] for r in ranks]}


def measure_d1_d3(work: Path, recipe: Path, repeats: int) -> dict:
    """A warm-up run on 1x, then `repeats` rounds of (10x, 1x), the order alternating."""
    log("  D1/D3: warm-up run on the 1x corpus")
    warm = train_once(work, recipe, "1x", free_port())
    runs = {"1x": [], "10x": []}
    for r in range(repeats):
        for corpus in (("10x", "1x") if r % 2 == 0 else ("1x", "10x")):
            res = train_once(work, recipe, corpus, free_port())
            runs[corpus].append(res)
            log(f"  D1/D3 round {r + 1}/{repeats}: {corpus} step 1 at {res['launch_to_step1_s']:.1f} s, peak RSS "
                f"{[round(b / 2**20) for b in res['peak_rss_bytes']]} MiB")
    return {"warmup": warm, "runs": runs}


def machine_info() -> dict:
    """benchmarks/machine.py's record, with this machine's memory and the data libraries' versions."""
    info = base_machine_info()
    info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    import datasets
    import tokenizers
    import torch
    import transformers

    info.update(torch=torch.__version__, transformers=transformers.__version__, datasets=datasets.__version__,
                tokenizers=tokenizers.__version__)
    return info


def code_info() -> dict:
    """What was measured: the commit, and a hash of the data path's files (they may be uncommitted)."""
    files = sorted((REPO / "calm_dist" / "data").glob("*.py")) + [REPO / "calm_dist" / "cli.py"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "calm_dist"], cwd=REPO, capture_output=True,
                           text=True)
    return {"git_head": head.stdout.strip(), "calm_dist_uncommitted_changes": bool(dirty.stdout.strip()),
            "data_path_sha256": h.hexdigest()[:16], "data_path_files": [str(f.relative_to(REPO)) for f in files]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="1: the 1x corpus is 20M tokens, the 10x 200M")
    ap.add_argument("--json", help="write the results here (default benchmarks/results/data_scale<scale>.json)")
    ap.add_argument("--work", default=os.environ.get("CALM_DATA_BENCH_DIR", "/tmp/calm_data_bench"),
                    help="corpus, tokenizer, models and prepared shards (reused when the settings match)")
    ap.add_argument("--only", default="", help="comma-separated subset of D1,D2,D3,D4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-rayon", action="store_true", help="skip D2's informational TOKENIZERS_PARALLELISM variant")
    ap.add_argument("--reuse-prepared", action="store_true",
                    help="keep shards an earlier run prepared (D4 is read from them; no prepare throughput)")
    ap.add_argument("--child-datasets", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-startup", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--num-proc", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_datasets:
        return child_datasets(args)
    if args.child_startup:
        return child_startup(args)

    only = {s.strip().upper() for s in args.only.split(",") if s.strip()}
    if only - {"D1", "D2", "D3", "D4"}:
        ap.error(f"--only: unknown ids {sorted(only - {'D1', 'D2', 'D3', 'D4'})}")
    want = lambda *ids: not only or bool(only & set(ids))  # noqa: E731
    need_10x = want("D1", "D3", "D4")
    scale = args.scale
    work = Path(args.work) / f"scale{scale:g}"
    work.mkdir(parents=True, exist_ok=True)
    subset = "_" + "".join(sorted(only)) if only else ""  # a subset never replaces a whole run's file
    out_json = Path(args.json) if args.json else HERE / "results" / f"data_scale{scale:g}{subset}.json"
    command = "python benchmarks/data_bench.py " + " ".join(sys.argv[1:])

    log(f"tokenizer (BPE, vocabulary {VOCAB}) under {work}")
    tok_dir, tpw, bpt = build_tokenizer(work, args.seed)
    need = disk_needed(scale, bpt, need_10x)
    free = shutil.disk_usage(work).free
    if free < need:
        print(f"data_bench: {work} has {free / 2**30:.1f} GiB free, this run needs about {need / 2**30:.1f} GiB "
              f"(scale {scale:g}); free some space, pass --work on a larger disk, or a smaller --scale",
              file=sys.stderr)
        return 2
    log(f"disk: {free / 2**30:.1f} GiB free, about {need / 2**30:.1f} GiB needed; tokens/word {tpw:.3f}, "
        f"text bytes/token {bpt:.2f}")
    results: dict = {"scale": scale, "command": command, "machine": machine_info(), "code": code_info(),
                     "repeats": args.repeats,
                     "settings": {"file_tokens": int(FILE_TOKENS * scale), "files_1x": FILES_1X,
                                  "files_10x": FILES_10X, "doc_tokens": DOC_TOKENS, "vocab": VOCAB,
                                  "seq_len": SEQ_LEN, "steps": STEPS, "micro_batch_size": MICRO_BATCH, "world": 2,
                                  "tokens_per_word": tpw, "text_bytes_per_token": bpt, "seed": args.seed},
                     "errors": {}}
    log(f"corpus: {FILES_10X if need_10x else FILES_1X} files of ~{int(FILE_TOKENS * scale):,} tokens")
    meta = build_corpus(work, args.seed, scale, tpw, need_10x)
    results["corpus_files"] = meta["files"]

    from calm_dist.tiny_setup import make_models

    models = work / "models"
    if not (models / "anchor" / "config.json").exists():
        make_models(models, VOCAB, seed=args.seed)
    recipe = write_recipe(work, tok_dir, models)

    if want("D2"):
        log(f"D2: prepare (2 workers, 1 worker) vs datasets (num_proc=2) on the 1x corpus, {args.repeats} rounds")
        try:
            results["d2"] = measure_d2(work, recipe, tok_dir, args.repeats, rayon=not args.no_rayon)
        except Exception as e:  # noqa: BLE001
            results["errors"]["d2"] = f"{type(e).__name__}: {e}"
            log(f"  D2 FAILED: {e}")

    results["prepared"] = {}
    for corpus in (("1x", "10x") if need_10x else ("1x",)):
        cache = work / f"cache_{corpus}"
        reused = args.reuse_prepared and any(cache.glob("tokens-*/manifest.json"))
        if not reused:
            shutil.rmtree(cache, ignore_errors=True)
        log(f"preparing the {corpus} corpus (2 workers) into {cache}{' (reusing its shards)' if reused else ''}")
        usage = run_timed(prepare_cmd(recipe, work / f"corpus_{corpus}", cache, 2), child_env(),
                          work / f"prepare_{corpus}.log")
        stats = shard_stats(prepared_dir(cache))
        stats.pop("shard_sha256")
        wall = usage["wall_s"]
        results["prepared"][corpus] = {**usage, "tokens_per_s": None if reused else stats["n_tokens"] / wall,
                                       "reused": reused, "stats": stats}
        log(f"  {stats['n_tokens']:,} tokens in {wall:.1f} s ({stats['n_tokens'] / wall:,.0f} tokens/s, "
            f"{usage['cpu_s']:.1f} s CPU, other jobs took {usage['others_cores']:.2f} cores), "
            f"{stats['bytes_per_token']:.3f} bytes/token")
    results["corpus_tokens"] = {c: p["stats"]["n_tokens"] for c, p in results["prepared"].items()}

    if want("D3"):
        log(f"D3: the data part of a rank's start-up, 1x and 10x interleaved, {2 * args.repeats + 1} times each")
        try:
            out = work / "startup.json"
            run_timed([sys.executable, str(HERE / "data_bench.py"), "--child-startup", "--work", str(work),
                       "--recipe", str(recipe), "--repeats", str(2 * args.repeats + 1), "--json", str(out)],
                      child_env(), work / "startup.log")
            results["startup"] = json.loads(out.read_text())
        except Exception as e:  # noqa: BLE001
            results["errors"]["startup"] = f"{type(e).__name__}: {e}"
            log(f"  D3 data start-up FAILED: {e}")

    if want("D1", "D3"):
        log(f"D1/D3: 2-rank ZeRO-3 training, {STEPS} steps, on the prepared 1x and 10x corpora")
        try:
            results["train"] = measure_d1_d3(work, recipe, args.repeats)
        except Exception as e:  # noqa: BLE001
            results["errors"]["train"] = f"{type(e).__name__}: {e}"
            log(f"  D1/D3 FAILED: {e}")

    results["rows"] = rows = analyse(results)
    results["wall_s"] = time.perf_counter() - STARTED
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md = markdown(results, rows)
    print("\n" + md)
    print(f"results: {out_json} ({results['wall_s']:.0f} s)")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
