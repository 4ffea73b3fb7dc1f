"""benchmarks/decode_bench.py's roofline counts the weights a decoding step reads: found with forward hooks, checked
here against the bytes worked out from each model's own parts. A step runs the anchor whole (its LM head included:
the next token comes from it) and each augmenting model's decoder, never its LM head (the blocks read its hidden
states; the composition drops an untied one, a tied one is its embedding table), and reads one row of each input
embedding table. A tied anchor head reads its whole table. Kept untruncated (`truncate_augmenting=False`), an
augmenting model holds its untied LM head, which a step never runs: the count must leave out weights that are held
but not read, not only those the composition drops."""
import sys

import pytest
import torch

from tests.helpers.launch import REPO
from tests.helpers.tiny import composed

sys.path.insert(0, str(REPO / "benchmarks"))
import decode_bench  # noqa: E402


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values())


def weight_bytes_by_parts(model) -> int:
    """Every parameter of the anchor, the augmenting models and the blocks, less what a step does not read whole."""
    skipped = [e.weight for m in (model.anchor, *model.augmenting) for e in m.modules()
               if isinstance(e, torch.nn.Embedding)]                      # one row read of each table
    skipped += [m.get_output_embeddings().weight for m in model.augmenting  # never run (the composition drops
                if m.get_output_embeddings() is not None]                   # an untied one)
    kept = [model.anchor.get_output_embeddings().weight]                   # a head tied to its embedding table runs
    skipped_ids = {id(p) for p in skipped} - {id(p) for p in kept}
    return nbytes(p for p in model.parameters() if id(p) not in skipped_ids)


@pytest.mark.parametrize("anchor,augmenting,truncate", [("llama", ("qwen2",), True),
                                                         ("gpt2", ("llama", "gpt_neox"), True),
                                                         ("llama", ("qwen2", "llama"), False)])
def test_the_roofline_counts_the_weights_a_step_reads(anchor, augmenting, truncate):
    model = composed(anchor, augmenting, truncate_augmenting=truncate).eval()
    if not truncate:  # each augmenting model holds an untied head that no step runs
        for m in model.augmenting:
            head = m.get_output_embeddings()
            assert head is not None and head.weight is not m.get_input_embeddings().weight
    if anchor == "gpt2":  # a tied head: its table is read whole by the head, once
        assert model.anchor.get_output_embeddings().weight is model.anchor.get_input_embeddings().weight
    assert decode_bench.bytes_per_token(model, context=10.0)["weights"] == weight_bytes_by_parts(model)
