"""Helpers shared by tools/make_kv_task.py, tools/pretrain_tiny.py and tests/test_kv_task.py.

Import with ``tools/`` on ``sys.path`` (the tools do this themselves)."""
from .task import TaskSettings, KeySpace, make_keys, build_datasets, vocabulary_words  # noqa: F401
from .tokenizer import PAD_ID, UNK_ID, BOS_ID, EOS_ID, train_tokenizer, load_tokenizer, encode_record  # noqa: F401
