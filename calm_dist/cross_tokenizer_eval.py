"""`calm-dist eval` of a composition whose augmenting models read the text through their own tokenizers
(data.different_tokenizers, docs/cross_tokenizer.md).

The column's functions take the records' strings beside the anchor's left-padded ids: greedy decoding re-reads
the growing text through every augmenting tokenizer (model/cross_tokenizer_generation.py, row by row; the new ids
become text as the composition's training records read: data/text_records.completion_decoding), and the
completion loss reads each record as training does (data/text_records.anchor_reading: prompt + completion, each
anchor token with its character span), each augmenting model aligned to it by characters (token_alignment.align).
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from calm_dist.config import DataConfig
from calm_dist.data.text_records import anchor_reading, gives_back
from calm_dist.model.cross_tokenizer_generation import generate_across_tokenizers
from calm_dist.model.token_alignment import align


def across_tokenizer_fns(model, data_cfg: DataConfig, anchor_tok, augmenting_toks: list, stops: list[int],
                         decoding: str = "after_prompt"):
    """(generate, logits) for task_eval.evaluate_set, both marked `reads_text`: generate(ids, mask, n, prompts)
    and logits(ids, mask, records), `ids`/`mask` the anchor's left-padded batch. `decoding`: how a completion's
    ids become text (model/completion_text.decoded_completion), as in the composition's training records."""
    device = next(model.parameters()).device
    records_cfg = dataclasses.replace(data_cfg, format="prompt_completion")  # eval sets are prompt/completion

    def generate(ids: torch.Tensor, mask: torch.Tensor, n: int, prompts: list[str]) -> torch.Tensor:
        decoded = generate_across_tokenizers(model, prompts, anchor_tok, augmenting_toks, max_new_tokens=n,
                                             eos_token_id=stops, decoding=decoding)
        new = torch.full((len(prompts), n), anchor_tok.pad_id, dtype=torch.long)
        for row, tokens in enumerate(decoded.ids):
            new[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return torch.cat([ids.cpu(), new], dim=1)

    warned = False

    def logits(ids: torch.Tensor, mask: torch.Tensor, records: list[dict]) -> torch.Tensor:
        nonlocal warned
        spans = torch.zeros(*ids.shape, 2, dtype=torch.long)
        texts = []
        for row, record in enumerate(records):
            row_ids, loss_start, text, row_spans = anchor_reading(record, f"record {row}", records_cfg, anchor_tok)
            completion = text[len(record[data_cfg.prompt_field]):]
            completion_ids = row_ids[loss_start:-1]  # less eos (evaluate_set refuses a tokenizer without one)
            if not warned and not gives_back(anchor_tok, row_ids[:loss_start], completion_ids, decoding, completion):
                warned = True  # once per column: the set's data, not one record, is the cause
                warnings.warn(f"completions such as {completion!r} do not read back from the anchor's ids decoded "
                              f"{decoding}: decoding gives the augmenting models another text than training did "
                              "(docs/cross_tokenizer.md)", stacklevel=2)
            real = mask[row].bool()
            if ids[row, real].tolist() != row_ids:  # the same tokens evaluate_set built, read with their spans
                raise ValueError(f"record {row}: the anchor's reading differs from the evaluated ids")
            spans[row, real] = torch.tensor(row_spans, dtype=torch.long).view(-1, 2)
            texts.append(text)
        inputs = [align(texts, spans, mask.cpu(), tok, pad_id=tok.pad_id, padding_side="left").to(device)
                  for tok in augmenting_toks]
        return model(ids.to(device), attention_mask=mask.to(device), augmenting_inputs=inputs).logits

    generate.reads_text = logits.reads_text = True
    return generate, logits
