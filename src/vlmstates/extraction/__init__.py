"""Extract and merge: a model's shards run by the engine (batching, capture, hooks, positions), the families'
adapters, and the extraction commands outside the workflow (`extract`, `predict`, the benchmark)."""
