"""Evaluation of edits, one concern per module:

- `datasets/`: loaders of every data format into `EditRequest`s (+ ROME's attribute snippets);
- `kernels`: the jitted log p(target token) / argmax; `prefix_cache`: a context run once into
  a KV cache; `scoring`: batching of teacher-forced queries (`score_targets` reads a model's
  context edit);
- `metrics`: the literature's formulas, pure numpy, each with its source;
- `generation`: ROME's decoding (seeded top-k 5, 100 tokens) for fluency and consistency;
- `measure`: what a request is scored on and its per-case metrics;
- `runner`: edit through the method protocol and measure, one function per mode, resumable;
- `report`: summaries, tables, results.md.
"""
