"""What a graph says its random inputs must respect, read once and handed to every random run."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from .caches import CacheDims, cache_dims
from .tokens import InputValue, input_values, token_id_limits


@dataclass
class InputHints:
    """id_limits: input name -> rows of the embedding table it indexes; values: input name -> the
    one value it should hold (a mask, a branch selector); cache: fixed sizes and sums of the dims
    of fused attention's cache and mask inputs."""

    id_limits: dict[str, int] = field(default_factory=dict)
    values: dict[str, InputValue] = field(default_factory=dict)
    cache: CacheDims = field(default_factory=CacheDims)

    def random_options(self, dims: dict[str, int] | None = None) -> dict:
        """Keyword arguments of runtime.feeds.random_feeds; `dims` forced over the cache's."""
        return {
            "id_limits": self.id_limits or None,
            "values": {k: v.value for k, v in self.values.items()},
            "dims": {**self.cache.fixed, **(dims or {})},
            "sums": self.cache.sums,
        }

    def described(self) -> str:
        """'; name = value (why)' for each input given one value, for a report line."""
        return "".join(f"; {k} = {v.value} ({v.why})" for k, v in self.values.items())


def input_hints(graph: gs.Graph) -> InputHints:
    """The hints `graph` gives for random inputs (see InputHints)."""
    limits = token_id_limits(graph)
    return InputHints(limits, input_values(graph), cache_dims(graph, list(limits)))
