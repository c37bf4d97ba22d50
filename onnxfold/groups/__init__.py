"""Stage 1: channel-coupled groups, derived from the graph by a union-find over channel axes
(state.py) driven by one rule per op (the top-level `patterns` package); discover.py runs the
rules."""
