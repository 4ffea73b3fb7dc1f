"""The verdicts and the table of benchmarks/data_bench.py: each ratio of D1-D4 from the measured runs, against its
target (medians over the repeats)."""
from __future__ import annotations

import statistics

TARGETS = {"D1": ("<=", 1.1), "D2": (">=", 1.0), "D2w": (">=", 1.7), "D3": ("<=", 1.2), "D4": ("<=", 2.1)}


def med(xs):
    return statistics.median(xs)


# ================================================================================================ report

def analyse(r: dict) -> list[dict]:
    rows = []

    def add(rid, what, value, note):
        sense, target = TARGETS[rid]
        met = value <= target if sense == "<=" else value >= target
        rows.append({"id": rid if rid != "D2w" else "D2b", "what": what, "value": value,
                     "target": f"{sense} {target}", "met": met, "note": note})

    t = r.get("train")
    if t and t["runs"]["1x"] and t["runs"]["10x"]:
        runs = t["runs"]
        mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
        peak = {c: [med([run["peak_rss_bytes"][k] for run in runs[c]]) for k in range(2)] for c in runs}
        span = {c: [(min(run["peak_rss_bytes"][k] for run in runs[c]), max(run["peak_rss_bytes"][k] for run in runs[c]))
                    for k in range(2)] for c in runs}
        anon = {c: [med([run["max_rss_anon_bytes"][k] for run in runs[c]]) for k in range(2)] for c in runs}
        file_ = {c: [med([run["max_rss_file_bytes"][k] for run in runs[c]]) for k in range(2)] for c in runs}
        per_rank = [peak["10x"][k] / peak["1x"][k] for k in range(2)]
        add("D1", "per-rank peak RSS, 10x corpus / 1x corpus (2 ranks, ZeRO-3, 20 steps)", max(per_rank),
            f"VmHWM medians of {len(runs['1x'])} runs: rank 0 {mib(peak['1x'][0])} -> {mib(peak['10x'][0])} MiB, "
            f"rank 1 {mib(peak['1x'][1])} -> {mib(peak['10x'][1])} MiB (the larger rank ratio is the value; runs "
            f"spread {mib(min(x[0] for x in span['1x'] + span['10x']))}-"
            f"{mib(max(x[1] for x in span['1x'] + span['10x']))} MiB); rank 0 anonymous {mib(anon['1x'][0])} -> "
            f"{mib(anon['10x'][0])}, file-backed {mib(file_['1x'][0])} -> {mib(file_['10x'][0])} MiB")
        s1 = {c: med([run["launch_to_step1_s"] for run in runs[c]]) for c in runs}
        others = med([run["others_cores"] for c in runs for run in runs[c]])
        add("D3", "launch -> first step line, 10x corpus / 1x corpus", s1["10x"] / s1["1x"],
            f"medians {s1['1x']:.1f} s (1x) vs {s1['10x']:.1f} s (10x); per run 1x "
            f"{[round(x['launch_to_step1_s'], 1) for x in runs['1x']]}, 10x "
            f"{[round(x['launch_to_step1_s'], 1) for x in runs['10x']]}; other jobs took {others:.2f} cores "
            f"(median)" + startup_note(r.get("startup")))
    d2 = r.get("d2")
    if d2:
        tps, runs = d2["tokens_per_s"], d2["runs"]
        cpu = {v: med([e["cpu_s"] for e in runs[v]]) for v in runs}
        wall = {v: med(d2["wall_s"][v]) for v in runs}
        others = {v: med([e["others_cores"] for e in runs[v]]) for v in runs}
        add("D2", "`calm-dist prepare --workers 2` tokens/s / datasets load_dataset + map(batched, num_proc=2)",
            tps["prepare_w2"] / tps["datasets_np2"],
            f"{tps['prepare_w2']:,.0f} vs {tps['datasets_np2']:,.0f} tokens/s ({d2['n_tokens']:,} tokens; wall "
            f"{wall['prepare_w2']:.1f} vs {wall['datasets_np2']:.1f} s, CPU {cpu['prepare_w2']:.1f} vs "
            f"{cpu['datasets_np2']:.1f} s); datasets' map alone {med([e['map_s'] for e in runs['datasets_np2']]):.1f}"
            f" s, load_dataset {med([e['load_dataset_s'] for e in runs['datasets_np2']]):.1f} s; same token count: "
            f"{d2['same_tokens_as_datasets']}; other jobs took {others['prepare_w2']:.2f} / "
            f"{others['datasets_np2']:.2f} cores")
        note = (f"{tps['prepare_w1']:,.0f} tokens/s with 1 worker (wall {wall['prepare_w1']:.1f} s, CPU "
                f"{cpu['prepare_w1']:.1f} s; 2 workers: CPU {cpu['prepare_w2']:.1f} s); other jobs took "
                f"{others['prepare_w2']:.2f} / {others['prepare_w1']:.2f} cores; same shard bytes for any worker "
                f"count: {d2['prepare_bytes_identical_across_workers']}")
        if "prepare_w1_rayon" in tps:
            note += (f"; 1 worker with the tokenizer's thread pool on (TOKENIZERS_PARALLELISM unset): "
                     f"{tps['prepare_w1_rayon']:,.0f} tokens/s, CPU {cpu['prepare_w1_rayon']:.1f} s")
        add("D2w", "`calm-dist prepare` tokens/s, 2 workers / 1 worker", tps["prepare_w2"] / tps["prepare_w1"], note)
    p = r.get("prepared", {})
    if "10x" in p or "1x" in p:
        c = "10x" if "10x" in p else "1x"
        s = p[c]["stats"]
        add("D4", f"bytes on disk per token of the prepared shards ({c} corpus)", s["bytes_per_token"],
            f"{s['bytes']:,} bytes for {s['n_tokens']:,} tokens in {s['n_shards']} shards ({s['dtype']}); token "
            f"files alone {s['token_bytes_per_token']:.3f}; allocated blocks {s['bytes_allocated_per_token']:.3f}")
    return rows


def startup_note(st) -> str:
    """D3's data part (child_startup), in words."""
    if not st:
        return ""
    ms = {c: 1000 * med(st["times"][c]["wall"]) for c in st["times"]}
    return (f"; the data part of a rank's start-up (open_source, load_rows of the prepared shards, the sampler's "
            f"permutation, one micro-batch) {ms['1x']:.0f} ms (1x) vs {ms['10x']:.0f} ms (10x), medians of "
            f"{len(st['times']['1x']['wall'])}; the sampler's permutation holds "
            f"{st['sampler_permutation_bytes']['10x'] / 2**20:.1f} MiB at 10x")


def fmt(x):
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def markdown(r: dict, rows: list[dict]) -> str:
    m = r["machine"]
    head = (f"Machine: {m.get('cpu_model')} ({m.get('cpus')} CPUs), {m.get('mem_gib')} GiB, load average at start "
            f"{' '.join(m.get('loadavg_at_start', []))}; {m['date_utc']}; scale {r['scale']} "
            f"(1x {r['corpus_tokens']['1x']:,} tokens, 10x {r['corpus_tokens'].get('10x', 0):,}); "
            f"{r['repeats']} repeats; command `{r['command']}`\n\n")
    lines = ["| id | measurement | value | target | met | notes |", "|---|---|---:|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['id']} | {row['what']} | {fmt(row['value'])} | {row['target']} | {fmt(row['met'])} | "
                     f"{row['note']} |")
    return head + "\n".join(lines) + "\n"
