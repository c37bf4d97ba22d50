"""Stage 3: change the graph: merge every plan's member slices, compensate means, refit
consumers."""
