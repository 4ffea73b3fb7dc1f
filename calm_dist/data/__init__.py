"""Data at any size: sources (local files, directories, globs, Hugging Face datasets) -> `prepare` (N worker
processes tokenize once into memory-mapped token shards) -> `TokenRows` (each rank reads only its micro-batches'
rows) and the global-batch sampler, a pure function of (seed, step).

    sources.py    the inputs: a spec (file, directory, glob, hf:name) -> its parts; content fingerprints
    parts.py      one file, saved dataset or hub split, streamed record by record; the memo of file hashes
    tokenizer.py  each model's tokenizer (one vocabulary for all, or each its own); prompt and completion ids
    prepare.py    `calm-dist prepare`, and load_rows: prepare once on rank 0, then every rank reads the shards
    shards.py     the shard format (uint16/uint32 tokens, document offsets, loss starts) and the row reader
    texts.py      with data.different_tokenizers: each document's text and its anchor tokens' spans, per shard
    text_records.py  records as models of different tokenizers read them: ids, spans, both row lengths fitted
    aligned_rows.py  AlignedRows: each augmenting model's reading of a row's text, aligned when a batch is read
    mixture.py    several weighted training sources: MixtureSampler (each source's quota of every batch), MixedRows
    sampler.py    GlobalBatchSampler, and sampler_for (one source or a mixture)
"""
