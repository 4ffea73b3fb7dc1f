"""The key-value task of CALM (Bansal et al. 2024, Table 1) at tiny scale: keys, values, expressions.

Everything here is pure Python and deterministic for a given :class:`TaskSettings` (one
``random.Random(seed)`` per artefact, seeded from the settings), so two runs with the same settings write
byte-identical files.

Vocabulary of the task (every item is one SentencePiece token, see :mod:`kv_task.tokenizer`):

* operators ``+ - =``;
* numbers ``-(V-1) .. 2(V-1)`` (every operand and every result of a two-operand ``+``/``-`` expression
  over values ``0..V-1``);
* keys: ``n_keys`` distinct lower-case strings of 3-5 letters (no digits, so they never collide with
  numbers or operators).

Values: key ``i`` (after a seeded shuffle) gets value ``i mod V``, so every value has the same number of
keys (``n_keys / V``). The composition keys (D_C) are drawn *per value*: ``dc_frac`` of each value's keys,
so D_C covers every value while spanning only ``dc_frac`` of the keys; every other key is held out.

Records are ``{"prompt": ..., "completion": ...}`` with words separated by single spaces:

* numeric arithmetic:  ``"12 - 30 ="`` -> ``"-18"``
* KV-substitution:     ``"qzv - abcd ="`` -> ``"12 - 30"``
* KV-arithmetic:       ``"qzv - abcd ="`` -> ``"-18"``
* key-value facts:     ``"qzv"`` -> ``"12"`` (what the augmenting model memorises)
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import string
from typing import Iterable, Iterator

OPS = ("+", "-")
EQ = "="


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    seed: int = 0
    n_keys: int = 900           # distinct keys
    n_values: int = 30          # values are 0..n_values-1, each shared by n_keys/n_values keys
    dc_frac: float = 0.2        # fraction of keys the composition data D_C may use
    key_min_len: int = 3
    key_max_len: int = 5
    n_dc_train: int = 20000     # KV-arithmetic records in D_C (both keys from the D_C keys)
    dc_arith_frac: float = 0.25  # share of numeric-arithmetic replay records in dc_train (no keys)
    n_kv_sub_train: int = 20000  # KV-substitution records over all keys (augmenting model's corpus)
    n_eval: int = 500           # records in each evaluation set

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.n_keys % self.n_values:
            raise ValueError(f"n_keys ({self.n_keys}) must be a multiple of n_values ({self.n_values})")
        per_value = self.n_keys // self.n_values
        n_dc = int(self.dc_frac * per_value)
        if not (0 <= self.dc_arith_frac < 1):
            raise ValueError("dc_arith_frac must be in [0, 1)")
        if not (0 < self.dc_frac <= 0.2):
            raise ValueError("dc_frac must be in (0, 0.2]: D_C spans at most 20% of the keys")
        if n_dc < 1 or n_dc >= per_value:
            raise ValueError(f"dc_frac * keys per value = {self.dc_frac} * {per_value} must leave >= 1 "
                             "D_C key and >= 1 held-out key per value")
        if 26 ** self.key_min_len < 4 * self.n_keys and self.key_max_len == self.key_min_len:
            raise ValueError("key length too short for that many distinct keys")


def numbers(n_values: int) -> list[int]:
    """Every integer an operand or a result can take: -(V-1) .. 2(V-1)."""
    return list(range(-(n_values - 1), 2 * (n_values - 1) + 1))


def _rng(settings: TaskSettings, what: str) -> random.Random:
    h = hashlib.sha256(f"{settings.seed}:{what}".encode()).hexdigest()
    return random.Random(int(h[:16], 16))


@dataclasses.dataclass
class KeySpace:
    keys: list[str]              # all keys, in vocabulary order
    value: dict[str, int]        # key -> value
    dc_keys: list[str]           # keys D_C may use (dc_frac of each value's keys)
    heldout_keys: list[str]      # every other key (evaluation)

    def to_dict(self) -> dict:
        return {"keys": self.keys, "value": self.value, "dc_keys": self.dc_keys,
                "heldout_keys": self.heldout_keys}


def make_keys(settings: TaskSettings) -> KeySpace:
    settings.validate()
    rng = _rng(settings, "keys")
    seen: set[str] = set()
    keys: list[str] = []
    while len(keys) < settings.n_keys:
        n = rng.randint(settings.key_min_len, settings.key_max_len)
        k = "".join(rng.choice(string.ascii_lowercase) for _ in range(n))
        if k not in seen:
            seen.add(k)
            keys.append(k)
    order = list(range(settings.n_keys))
    rng.shuffle(order)
    value = {keys[j]: i % settings.n_values for i, j in enumerate(order)}
    by_value: dict[int, list[str]] = {v: [] for v in range(settings.n_values)}
    for k in keys:
        by_value[value[k]].append(k)
    per_value_dc = int(settings.dc_frac * (settings.n_keys // settings.n_values))
    dc: set[str] = set()
    for v in range(settings.n_values):
        ks = list(by_value[v])
        rng.shuffle(ks)
        dc.update(ks[:per_value_dc])
    dc_keys = [k for k in keys if k in dc]
    heldout = [k for k in keys if k not in dc]
    return KeySpace(keys=keys, value=value, dc_keys=dc_keys, heldout_keys=heldout)


def evaluate_expr(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def fmt(*words) -> str:
    return " ".join(str(w) for w in words)


# ----------------------------------------------------------------------------------------- records
def arith_record(a: int, op: str, b: int) -> dict:
    return {"prompt": fmt(a, op, b, EQ), "completion": fmt(evaluate_expr(a, op, b))}


def kv_arith_record(ks: KeySpace, k1: str, op: str, k2: str) -> dict:
    return {"prompt": fmt(k1, op, k2, EQ),
            "completion": fmt(evaluate_expr(ks.value[k1], op, ks.value[k2]))}


def kv_sub_record(ks: KeySpace, k1: str, op: str, k2: str) -> dict:
    return {"prompt": fmt(k1, op, k2, EQ), "completion": fmt(ks.value[k1], op, ks.value[k2])}


def fact_record(ks: KeySpace, k: str) -> dict:
    return {"prompt": k, "completion": fmt(ks.value[k])}


def all_arith(n_values: int) -> list[dict]:
    """The whole numeric-arithmetic table: every a op b with a, b in 0..V-1 (2 V^2 records)."""
    return [arith_record(a, op, b) for a in range(n_values) for op in OPS for b in range(n_values)]


def sample_exprs(rng: random.Random, keys: list[str], n: int, exclude: set | None = None,
                 unique: bool = True) -> list[tuple[str, str, str]]:
    """n distinct (k1, op, k2) over ``keys`` (not in ``exclude``)."""
    total = len(keys) * len(keys) * len(OPS)
    exclude = exclude or set()
    if unique and n > total - len(exclude):
        raise ValueError(f"asked for {n} distinct expressions over {len(keys)} keys ({total} exist)")
    out: list[tuple[str, str, str]] = []
    seen: set = set(exclude)
    while len(out) < n:
        e = (rng.choice(keys), rng.choice(OPS), rng.choice(keys))
        if unique and e in seen:
            continue
        seen.add(e)
        out.append(e)
    return out


def build_datasets(settings: TaskSettings, ks: KeySpace | None = None) -> dict[str, list[dict]]:
    """All data sets of the task, by file stem. Deterministic in ``settings``."""
    ks = ks or make_keys(settings)
    V = settings.n_values
    rng_dc = _rng(settings, "dc")
    rng_sub = _rng(settings, "kv_sub")
    rng_eval = _rng(settings, "eval")

    dc_exprs = sample_exprs(rng_dc, ks.dc_keys, settings.n_dc_train)
    heldout_exprs = sample_exprs(rng_eval, ks.heldout_keys, settings.n_eval)
    # training keys, expressions not in D_C: how far the blocks generalise over expressions vs keys
    dc_key_exprs = sample_exprs(rng_eval, ks.dc_keys, settings.n_eval, exclude=set(dc_exprs))
    arith = all_arith(V)
    arith_eval = [arith[i] for i in sorted(rng_eval.sample(range(len(arith)), min(settings.n_eval, len(arith))))]
    # augmenting model's substitution corpus: all keys, but never a held-out evaluation expression
    sub_exprs = sample_exprs(rng_sub, ks.keys, settings.n_kv_sub_train, exclude=set(heldout_exprs))
    dc_kv = [kv_arith_record(ks, *e) for e in dc_exprs]
    # numeric-arithmetic replay inside the composition data: keeps the composed model's arithmetic
    # (without it the blocks also write into number positions and the composition forgets arithmetic)
    n_replay = round(len(dc_kv) * settings.dc_arith_frac / (1 - settings.dc_arith_frac))
    replay = [arith[rng_dc.randrange(len(arith))] for _ in range(n_replay)]
    dc_train = dc_kv + replay
    rng_dc.shuffle(dc_train)

    return {
        # base-model corpora
        "arith_train": arith,                                             # anchor: numbers only
        "kv_facts": [fact_record(ks, k) for k in ks.keys],                # augmenting: every key's value
        "kv_sub_train": [kv_sub_record(ks, *e) for e in sub_exprs],       # augmenting: substitution
        # composition data: KV-arithmetic over the D_C keys only (+ numeric replay in dc_train)
        "dc_train": dc_train,
        "dc_kv_arith": dc_kv,
        # evaluation
        "eval_kv_arith_heldout": [kv_arith_record(ks, *e) for e in heldout_exprs],
        "eval_kv_sub_heldout": [kv_sub_record(ks, *e) for e in heldout_exprs],
        "eval_kv_arith_dc_keys": [kv_arith_record(ks, *e) for e in dc_key_exprs],
        "eval_arith": arith_eval,
    }


def vocabulary_words(settings: TaskSettings, ks: KeySpace) -> list[str]:
    """Every word of the task, in the order they get token ids: operators, numbers, keys."""
    return list(OPS) + [EQ] + [str(n) for n in numbers(settings.n_values)] + list(ks.keys)


def record_text(records: Iterable[dict]) -> Iterator[str]:
    for r in records:
        yield fmt(r["prompt"], r["completion"])


def keys_of(record: dict) -> list[str]:
    """The keys used in a record's prompt (words that are neither operators nor numbers)."""
    out = []
    for w in record["prompt"].split():
        if w in OPS or w == EQ:
            continue
        try:
            int(w)
        except ValueError:
            out.append(w)
    return out
