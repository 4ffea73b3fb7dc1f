"""How a completion's generated ids become the text the augmenting models read, in decoding across tokenizers
(docs/cross_tokenizer.md, "Rebuilding a completion's text"). Torch-free, as data/text_records.py, which imports it
to pick the decoding from the training records, runs in prepare's workers.

Training reads a prompt/completion record's text as prompt + completion, the anchor's ids of the completion read
apart from the prompt's; the ids do not always say what the text was (SentencePiece reads "-18" and " -18" alike,
as "▁- 1 8"), so a decoding names how to rebuild it.
"""
from __future__ import annotations

COMPLETION_DECODINGS = ("after_prompt", "alone")


def decoded_completion(tok, prompt_ids: list[int], completion_ids: list[int], decoding: str) -> str:
    """The text a completion's ids add to its prompt's. "alone": the ids decoded alone, the inverse of reading the
    completion apart from the prompt as training does (a SentencePiece anchor's "▁- 1 8" gives "-18");
    "after_prompt": decoded after the prompt's ids, less the prompt's own text, as a text reads on (" -18": the
    word mark of the first token is a space)."""
    if decoding == "alone":
        return tok.decode(list(completion_ids))
    if decoding != "after_prompt":
        raise ValueError(f"decoding {decoding!r}: one of {', '.join(COMPLETION_DECODINGS)}")
    prompt = tok.decode(list(prompt_ids))
    whole = tok.decode(list(prompt_ids) + list(completion_ids))
    if not whole.startswith(prompt):
        raise ValueError(f"the anchor's tokenizer rewrote text already read: {prompt!r}, then {whole!r}")
    return whole[len(prompt):]
