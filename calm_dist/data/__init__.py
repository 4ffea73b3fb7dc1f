"""Data: records, one tokenizer for every model, tokenized rows and the resumable global-batch sampler."""
