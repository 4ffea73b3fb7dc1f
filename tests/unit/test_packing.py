"""Packed rows keep their documents apart in every model and in the cross-attention: every token's logits in a
packed row equal those of its document run alone, for several families on either side with two augmenting
models; the cross-attention mask itself is checked against its definition."""
import pytest
import torch

from calm_dist.model.backbones import BLOCK_LISTS
from calm_dist.model.composition import documents_of
from calm_dist.model.cross_attention import cross_attention_mask
from tests.helpers.tiny import VOCAB, composed

# (anchor family, augmenting families): every supported family on either side, two augmenting models each
PAIRS = [("llama", ("gpt2", "qwen2")), ("gpt2", ("gpt_neox", "llama")), ("qwen2", ("llama", "gpt2")),
         ("gpt_neox", ("qwen2", "gpt_neox")), ("mistral", ("qwen3", "mistral")), ("qwen3", ("mistral", "qwen3"))]

# each row's documents, by length: a one-token document, a row of one document, several short ones
ROWS = [[5, 1, 7, 3], [16], [2, 9, 4, 1]]


def packed_batch(seed=0):
    """input_ids [3, 16], their position_ids (restarting at each document) and each row's documents' ids."""
    g = torch.Generator().manual_seed(seed)
    ids, positions, docs = [], [], []
    for lengths in ROWS:
        row_docs = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
        docs.append(row_docs)
        ids.append(torch.cat(row_docs))
        positions.append(torch.cat([torch.arange(n) for n in lengths]))
    return torch.stack(ids), torch.stack(positions), docs


@pytest.mark.parametrize("anchor,augmenting", PAIRS, ids=[f"{a}+{'+'.join(b)}" for a, b in PAIRS])
def test_each_document_in_a_packed_row_has_the_logits_it_has_alone(anchor, augmenting):
    model = composed(anchor, augmenting).eval()
    ids, positions, docs = packed_batch()
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits
        unseparated = model(ids).logits
        anchor_packed = model.anchor_logits(ids, position_ids=positions)
        leaked = False
        for r, row_docs in enumerate(docs):
            at = 0
            for doc in row_docs:
                alone = model(doc[None]).logits[0]
                torch.testing.assert_close(packed[r, at:at + len(doc)], alone, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(anchor_packed[r, at:at + len(doc)], model.anchor_logits(doc[None])[0],
                                           rtol=1e-4, atol=1e-5)
                leaked |= at > 0 and not torch.allclose(unseparated[r, at:at + len(doc)], alone, atol=1e-3)
                at += len(doc)
    assert leaked  # without position_ids the documents do see each other: the comparison can fail


def test_every_supported_family_is_checked_on_both_sides():
    """Every family keeps packed documents apart through transformers' packed-sequence masks (position ids
    restarting, no attention mask), so none needs rows split at document boundaries; a family added to
    BLOCK_LISTS is added here, and the test above decides whether it can take that path."""
    assert {a for a, _ in PAIRS} == {f for _, augs in PAIRS for f in augs} == set(BLOCK_LISTS)


def test_the_cross_attention_of_packed_rows_sees_the_same_document_only():
    """A query sees a key iff the key is at or before it and in its document; checked against the definition."""
    _, positions, _ = packed_batch()
    documents = documents_of(positions)
    t = positions.shape[1]
    mask = cross_attention_mask(torch.arange(t), None, t, documents)
    assert mask.shape == (3, 1, t, t)
    for r in range(3):
        for q in range(t):
            for k in range(t):
                assert bool(mask[r, 0, q, k]) == (k <= q and bool(documents[r, k] == documents[r, q]))
    assert documents[0].tolist() == [1] * 5 + [2] + [3] * 7 + [4] * 3


def test_the_cross_attention_alone_keeps_the_documents_apart():
    """The composition's own part: with the anchor and augmenting models told about the documents but the
    cross-attention not, a later document's logits change (so the test above checks the block too)."""
    model = composed("llama", ("gpt2", "qwen2")).eval()
    ids, positions, docs = packed_batch()
    with torch.no_grad():
        separated = model(ids, position_ids=positions).logits
        import calm_dist.model.composition as composition

        original = composition.documents_of
        composition.documents_of = lambda p: torch.zeros_like(p)  # one document, as far as the blocks know
        try:
            blocks_unseparated = model(ids, position_ids=positions).logits
        finally:
            composition.documents_of = original
    first = len(docs[0][0])
    torch.testing.assert_close(blocks_unseparated[0, :first], separated[0, :first])
    assert not torch.allclose(blocks_unseparated[0, first:], separated[0, first:], atol=1e-3)


def test_packed_rows_with_padding_are_refused():
    model = composed("llama", ("gpt2",)).eval()
    ids, positions, _ = packed_batch()
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="packed rows"):
        model(ids, attention_mask=mask, position_ids=positions)
