"""Stage 5: measure the result: dense vs folded outputs (typed Comparison), latency, parameters,
MACs."""
