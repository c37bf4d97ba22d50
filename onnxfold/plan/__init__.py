"""Stage 2: decide what each group keeps: features, importance, the per-group budget, k-means
(numpy, torch or CuPy) and the resulting FoldPlans. Numerical only: the graph is not changed
here."""
