"""Context compression at inference time (issue #21): token merging in prefill, evaluator-head KV
compression (EHPC), REFORM-style recurrent chunked prefill, and the sink+window / random baselines.
Entry point: `compress.prefill.compressed_prefill`; see docs/compression.md."""
