"""A tiny world for the lm-evaluation-harness tests: a word-level transformers tokenizer (one token per word of
calm_dist.tiny_setup's task, so the ids of a text never depend on where it is split), a Llama anchor and a GPT-2
augmenting model of that vocabulary saved with it, task YAMLs over local JSONL files."""
from __future__ import annotations

import json
from pathlib import Path

from calm_dist.tiny_setup import WORDS

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0-3, as tests.helpers.tiny.SPECIAL has them
VOCAB = SPECIAL + ["reverse:", "="] + list(WORDS)


def word_tokenizer(directory: Path) -> None:
    """A WordLevel tokenizer whose encode with special tokens prepends <s> (as Llama's does), so lm-eval's own
    HF model and calm_dist feed the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(directory)


def models(directory: Path) -> tuple[Path, Path]:
    """anchor/ (Llama, with the tokenizer) and augmenting/ (GPT-2) of the tokenizer's vocabulary."""
    from tests.helpers.tiny import tiny_model

    anchor, augmenting = directory / "anchor", directory / "augmenting"
    tiny_model("llama", seed=1, hidden=48, layers=4, vocab=len(VOCAB)).save_pretrained(anchor)
    tiny_model("gpt2", seed=2, hidden=32, layers=4, vocab=len(VOCAB)).save_pretrained(augmenting)
    word_tokenizer(anchor)
    return anchor, augmenting


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_yaml(directory: Path, name: str, data: Path, output_type: str, **fields) -> Path:
    """A task over a local JSONL (datasets' json builder: no hub), its one split called test."""
    import yaml

    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": output_type, **fields}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path
