"""Validation feeds when folding changed an input's shape (onnxfold.check.compare): a folded KV
cache gets arrays of its own shape, empty or zero."""

from __future__ import annotations

from onnxfold.check.compare import empty_dims, own_feeds
from onnxfold.runtime.feeds import InputSpec, random_feeds


def test_folded_caches_are_fed_arrays_of_their_own_shape():
    dense = [
        InputSpec("input_ids", ["batch_size", "sequence_length"], "tensor(int64)"),
        InputSpec(
            "attention_mask",
            ["batch_size", "past_sequence_length + sequence_length"],
            "tensor(int64)",
        ),
        InputSpec("past.key", ["batch_size", 2, "past_sequence_length", 4], "tensor(float)"),
    ]
    folded = dense[:2] + [
        InputSpec("past.key", ["batch_size", 1, "past_sequence_length", 4], "tensor(float)")
    ]
    assert empty_dims(dense, dense) == {}
    assert empty_dims(dense, folded) == {"past_sequence_length": 0}
    feeds = random_feeds(dense, samples=2, other_dim=3, dims=empty_dims(dense, folded))
    d, f, notes = own_feeds(dense, folded, feeds)
    assert d["input_ids"] is f["input_ids"] and f["attention_mask"].shape == (2, 3)
    assert d["past.key"].shape == (2, 2, 0, 4) and f["past.key"].shape == (2, 1, 0, 4)
    assert (
        "empty arrays" in notes[0]
        and "past.key [batch_size, 2, past_sequence_length, 4] -> " in notes[0]
    )
    d, f, notes = own_feeds(
        dense, folded, random_feeds(dense, samples=2, other_dim=3)
    )  # e.g. --data
    assert not d["past.key"].any() and f["past.key"].shape == (2, 1, 3, 4) and "zeros" in notes[0]
