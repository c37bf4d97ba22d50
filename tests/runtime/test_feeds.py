"""Random feeds for symbolic input shapes (onnxfold.runtime.feeds): one size per dim name, and dims
written as sums (optimum's "past_sequence_length + sequence_length") sized as the sum of their
terms."""

from __future__ import annotations

from onnxfold.runtime.feeds import InputSpec, dim_terms, random_feeds, symbolic_sizes


def test_symbolic_dims_are_sized_consistently_and_sums_add_up():
    assert dim_terms("past_sequence_length + sequence_length") == [
        (1, "past_sequence_length"),
        (1, "sequence_length"),
    ]
    assert dim_terms("a+b-2") == [(1, "a"), (1, "b"), (-1, 2)]
    assert [dim_terms(d) for d in ("batch_size", "unk__3", "2*s", "a +", "")] == [None] * 5
    specs = [
        InputSpec("input_ids", ["batch_size", "sequence_length"], "tensor(int64)"),
        InputSpec(
            "attention_mask",
            ["batch_size", "past_sequence_length + sequence_length"],
            "tensor(int64)",
        ),
        InputSpec("past", ["batch_size", 2, "past_sequence_length", 16], "tensor(float)"),
        InputSpec("step_mask", ["batch_size", "past_sequence_length+1"], "tensor(int64)"),
        InputSpec("window", ["batch_size", "2 + extra - 1"], "tensor(float)"),
        InputSpec("other", ["batch_size", "2*sequence_length", None], "tensor(float)"),
    ]
    sizes = symbolic_sizes(specs, samples=3, other_dim=5)
    assert (
        sizes["batch_size"] == 3 and sizes["sequence_length"] == sizes["past_sequence_length"] == 5
    )
    assert (
        sizes["past_sequence_length + sequence_length"] == 10
        and sizes["past_sequence_length+1"] == 6
    )
    assert sizes["extra"] == 5 and sizes["2 + extra - 1"] == 6  # a name found only inside a sum
    feeds = random_feeds(specs, samples=3, other_dim=5, dims={"past_sequence_length": 0})
    assert {k: v.shape for k, v in feeds.items()} == {
        "input_ids": (3, 5),
        "attention_mask": (3, 5),
        "past": (3, 2, 0, 16),
        "step_mask": (3, 1),
        "window": (3, 6),
        "other": (3, 5, 5),
    }
    assert random_feeds(specs, samples=3, other_dim=5)["attention_mask"].shape == (3, 10)
