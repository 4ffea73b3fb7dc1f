"""The key-value task of CALM (Bansal et al. 2024, Table 1) at tiny scale: keys, values, expressions.

Everything here is pure Python and deterministic for a given :class:`TaskSettings` (one
``random.Random(seed)`` per artefact, seeded from the settings), so two runs with the same settings write
byte-identical files.

Vocabulary of the task (see :mod:`kv_task.tokenizer`):

* operators ``+ - =``, one token each (``-`` is also the sign of a negative number);
* numbers are written in decimal and read **one digit per token**, as the paper's tokenizer does: an
  operand ``0..V-1`` is one or two tokens, a result ``-(V-1) .. 2(V-1)`` up to four (``-`` and three digits);
* keys: ``n_keys`` distinct lower-case strings of 3-5 letters, one token each (no digits, so they never
  collide with numbers or operators).

Values: key ``i`` (after a seeded shuffle) gets value ``i mod V``, so every value has the same number of
keys (``n_keys / V``). The keys are split three ways, each *per value* so every split covers every value:
``dc_frac`` of each value's keys may appear in the composition data (D_C), ``val_frac`` are validation keys
(every design choice and recipe knob is chosen on expressions over them) and the rest are test keys, scored
once per reported run. No key is in two splits.

Records are ``{"prompt": ..., "completion": ...}`` with words separated by single spaces:

* numeric arithmetic:  ``"12 - 30 ="`` -> ``"-18"`` (tokens ``- 1 8``)
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
    n_keys: int = 1000          # distinct keys
    n_values: int = 100         # values are 0..n_values-1, each shared by n_keys/n_values keys
    dc_frac: float = 0.2        # fraction of keys the composition data D_C may use
    val_frac: float = 0.1       # fraction of keys for validation (design choices), never trained on nor tested
    key_min_len: int = 3
    key_max_len: int = 5
    n_dc_train: int = 20000     # KV-arithmetic records in D_C (both keys from the D_C keys)
    n_kv_sub_train: int = 20000  # KV-substitution records over all keys (augmenting model's corpus)
    n_eval: int = 500           # records in each evaluation set

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.n_keys % self.n_values:
            raise ValueError(f"n_keys ({self.n_keys}) must be a multiple of n_values ({self.n_values})")
        per_value = self.n_keys // self.n_values
        n_dc, n_val = int(self.dc_frac * per_value), int(self.val_frac * per_value)
        if not (0 < self.dc_frac <= 0.2):
            raise ValueError("dc_frac must be in (0, 0.2]: D_C spans at most 20% of the keys")
        if n_dc < 1 or n_val < 1 or n_dc + n_val >= per_value:
            raise ValueError(f"(dc_frac, val_frac) * keys per value = ({self.dc_frac}, {self.val_frac}) * {per_value} "
                             "must leave >= 1 D_C key, >= 1 validation key and >= 1 test key per value")
        if 26 ** self.key_min_len < 4 * self.n_keys and self.key_max_len == self.key_min_len:
            raise ValueError("key length too short for that many distinct keys")


def _rng(settings: TaskSettings, what: str) -> random.Random:
    h = hashlib.sha256(f"{settings.seed}:{what}".encode()).hexdigest()
    return random.Random(int(h[:16], 16))


@dataclasses.dataclass
class KeySpace:
    keys: list[str]              # all keys, in vocabulary order
    value: dict[str, int]        # key -> value
    dc_keys: list[str]           # keys D_C may use (dc_frac of each value's keys)
    val_keys: list[str]          # validation keys (val_frac of each value's keys): design choices
    heldout_keys: list[str]      # every other key: the test set, scored once per reported run

    def to_dict(self) -> dict:
        return {"keys": self.keys, "value": self.value, "dc_keys": self.dc_keys, "val_keys": self.val_keys,
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
    per_value = settings.n_keys // settings.n_values
    n_dc, n_val = int(settings.dc_frac * per_value), int(settings.val_frac * per_value)
    dc: set[str] = set()
    val: set[str] = set()
    for v in range(settings.n_values):
        ks = list(by_value[v])
        rng.shuffle(ks)
        dc.update(ks[:n_dc])
        val.update(ks[n_dc:n_dc + n_val])
    return KeySpace(keys=keys, value=value, dc_keys=[k for k in keys if k in dc],
                    val_keys=[k for k in keys if k in val],
                    heldout_keys=[k for k in keys if k not in dc and k not in val])


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
    val_exprs = sample_exprs(rng_eval, ks.val_keys, settings.n_eval)
    # training keys, expressions not in D_C: how far the blocks generalise over expressions vs keys
    dc_key_exprs = sample_exprs(rng_eval, ks.dc_keys, settings.n_eval, exclude=set(dc_exprs))
    arith = all_arith(V)
    arith_eval = [arith[i] for i in sorted(rng_eval.sample(range(len(arith)), min(settings.n_eval, len(arith))))]
    # augmenting model's substitution corpus: all keys, but never an evaluation expression
    sub_exprs = sample_exprs(rng_sub, ks.keys, settings.n_kv_sub_train, exclude=set(heldout_exprs) | set(val_exprs))

    # The composition's numeric-arithmetic replay is not built here: the recipe mixes arith_train into
    # data.train as a weighted source (calm_dist/data/mixture.py).
    return {
        # base-model corpora
        "arith_train": arith,                                             # anchor: numbers only
        "kv_facts": [fact_record(ks, k) for k in ks.keys],                # augmenting: every key's value
        "kv_sub_train": [kv_sub_record(ks, *e) for e in sub_exprs],       # augmenting: substitution
        # composition data: KV-arithmetic over the D_C keys only
        "dc_kv_arith": [kv_arith_record(ks, *e) for e in dc_exprs],
        # validation: choose designs and recipes here
        "val_kv_arith": [kv_arith_record(ks, *e) for e in val_exprs],
        "val_kv_sub": [kv_sub_record(ks, *e) for e in val_exprs],         # the augmenting model's, same keys
        # test: scored once per reported run
        "eval_kv_arith_heldout": [kv_arith_record(ks, *e) for e in heldout_exprs],
        "eval_kv_sub_heldout": [kv_sub_record(ks, *e) for e in heldout_exprs],
        "eval_kv_arith_dc_keys": [kv_arith_record(ks, *e) for e in dc_key_exprs],
        "eval_arith": arith_eval,
    }


DIGITS = tuple("0123456789")


def vocabulary_words(ks: KeySpace) -> list[str]:
    """The words that are one token each, in the order they get token ids: operators, digits, keys."""
    return list(OPS) + [EQ] + list(DIGITS) + list(ks.keys)


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
