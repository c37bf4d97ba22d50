"""Channel importance: how much each channel of a group matters (`--importance`).

weight: no scores; clustering features are the weights as they are. act: a channel's importance is
what it contributes to the next layer: the RMS of its activation at the input of the group's
consumer (the MatMul/Gemm/Conv whose weight columns follow the group) times the norm of that
consumer's weight slice for the channel, the structured analogue of Wanda's |activation| x |weight|
score. Activations come from calibration inputs (--calib) or data-free: a causal LM writes its own
calibration text (sequences sampled from the model, from random first tokens, as LLM-QAT does);
other token models get random token ids (every integer input that indexes an embedding table gets
uniform ids over the table's rows, masks get ones and positions 0..L-1). Even random tokens show
which channels the network actually drives (massive-activation channels included), which weight
norms alone do not: on SmolLM2-135M weight-norm pruning of MLP channels is worse than random
removal, activation-aware pruning much better; generated text is better still
(benchmarks/results/smollm2.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError, literal, log
from ..runtime.stats import stats_of

# config imports IMPORTANCES from here: onnx, onnxruntime and onnx-graphsurgeon load on use
if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from ..groups.group import Group


@dataclass
class Scores:
    """What an Importance measured: gid -> channel importance (n,) float64 of the groups it could
    observe (the others keep weight norms); what it was measured on; gid -> mean activation per
    consumer input entry (n * repeat,), and the feeds (input name -> (N, ...)) those means were
    measured on (None: no means)."""

    scores: dict[int, np.ndarray] = field(default_factory=dict)
    source: str = ""
    means: dict[int, np.ndarray] = field(default_factory=dict)
    feeds: dict[str, np.ndarray] | None = None


class WeightImportance:
    """No activation scores: k-means and pruning work on the weights alone."""

    name = "weight"

    def measure(
        self, graph: gs.Graph, groups: list[Group], calib: dict | None, seed: int
    ) -> Scores:
        """Scores of the groups being folded (none here)."""
        return Scores()

    def note(self, scores: Scores, groups: list[Group]) -> str | None:
        """A report line, if this importance has something to say."""
        return None


class ActivationImportance(WeightImportance):
    """Activation RMS x consumer weight norm, on `calib` inputs or data-free for token models."""

    name = "act"

    def measure(
        self, graph: gs.Graph, groups: list[Group], calib: dict | None, seed: int
    ) -> Scores:
        if not groups:
            return Scores()
        if calib is not None:
            return channel_importance(graph, groups, calib, source="--calib inputs")
        return importance_data_free(graph, groups, seed)

    def note(self, scores: Scores, groups: list[Group]) -> str | None:
        return (
            f"importance: activation x consumer weight norm for {len(scores.scores)} of "
            f"{len(groups)} foldable groups being folded ({scores.source}); the rest by weights"
        )


IMPORTANCES = {cls.name: cls for cls in (WeightImportance, ActivationImportance)}


class ScoresMemo:
    """Scores kept between folds of the same model on the same calibration inputs (a --target
    search's candidates): measured once per importance and set of groups folded, the dense model's
    activations being the same whatever the ratio."""

    def __init__(self) -> None:
        self._kept: dict[tuple, Scores] = {}

    def measure(
        self,
        importance: WeightImportance,
        graph: gs.Graph,
        groups: list[Group],
        calib: dict | None,
        seed: int,
    ) -> Scores:
        """importance.measure(graph, groups, calib, seed), or what it gave the first time, or
        the part of a measurement kept for more groups (a group's scores come from the dense model
        whatever else is measured: --measure's single-group folds)."""
        gids = frozenset(g.gid for g in groups)
        key = (importance.name, seed, gids)
        if key not in self._kept:
            wider = next(
                (
                    kept
                    for (name, s, had), kept in self._kept.items()
                    if name == importance.name and s == seed and gids < had
                ),
                None,
            )
            self._kept[key] = (
                importance.measure(graph, groups, calib, seed)
                if wider is None
                else _part(wider, gids)
            )
        return self._kept[key]


def _part(scores: Scores, gids: frozenset) -> Scores:
    """The scores and means of `gids` only."""
    return Scores(
        {g: v for g, v in scores.scores.items() if g in gids},
        scores.source,
        {g: v for g, v in scores.means.items() if g in gids},
        scores.feeds,
    )


def channel_importance(
    graph: gs.Graph,
    groups: list[Group],
    feeds: dict[str, np.ndarray],
    session=None,
    source: str = "",
) -> Scores:
    """Scores for every group with a consumer whose activation input can be observed, from one
    onnxruntime run over `feeds` (input name -> (N, ...)), on `session` if given (a
    statistics_session of these groups)."""
    taps = _taps(groups)
    if not taps:
        return Scores(source=source)
    names = sorted({(name, axis) for name, axis, _, _ in taps.values()})
    sess = session or statistics_session(graph, groups)
    stats = dict(zip(names, stats_of(sess, [n for n, _ in names], [a for _, a in names], feeds)))
    out = Scores(source=source)
    for gid, (name, axis, entry_norms, repeat) in taps.items():
        mean, var = stats[(name, axis)]
        if len(mean) == len(entry_norms):
            energy = (np.square(mean) + var) * np.square(entry_norms)
            out.scores[gid] = np.sqrt(energy.reshape(-1, repeat).sum(axis=1))
            out.means[gid], out.feeds = mean, feeds
    return out


def statistics_session(graph: gs.Graph, groups: list[Group]):
    """One lean onnxruntime session of the graph with every group's consumer activation as an extra
    output (it also serves the model's own outputs, e.g. for generating calibration text)."""
    import onnx_graphsurgeon as gs

    from ..runtime.session import session_with_outputs

    names = sorted({g.consumer.node.inputs[0].name for g in groups if g.consumer is not None})
    return session_with_outputs(gs.export_onnx(graph), names)


def _taps(groups: list[Group]) -> dict[int, tuple[str, int, np.ndarray, int]]:
    return {g.gid: tap for g in groups if (tap := consumer_tap(g)) is not None}


def consumer_tap(group: Group) -> tuple[str, int, np.ndarray, int] | None:
    """(activation tensor name, its channel axis, consumer weight norms per input entry (n *
    repeat,), repeat) of the group's consumer (groups.discover.find_consumer); None if it has
    none."""
    if group.consumer is None:
        return None
    node, m, axis = group.consumer.node, group.consumer.member, group.consumer.axis
    values = np.asarray(m.tensor.values)
    moved = np.moveaxis(values, m.axis, 0).reshape(values.shape[m.axis], -1).astype(np.float64)
    return node.inputs[0].name, axis, np.linalg.norm(moved, axis=1), m.repeat


def importance_data_free(graph: gs.Graph, groups: list[Group], seed: int = 0) -> Scores:
    """channel_importance without --calib. Causal LMs (an output whose last axis is the embedding
    table's rows) write their own calibration text: GENERATED_SEQUENCES x SYNTHETIC_LENGTH tokens
    sampled from the model from a random first token (as LLM-QAT does), activations much closer to
    real text than random ids. Other token models (encoders), or a model that cannot generate, use
    random token ids. One onnxruntime session serves generation and statistics."""
    from ..runtime.tokens import generated_token_feeds, logits_output, synthetic_token_feeds

    synthetic_token_feeds(graph, seed, 1, 1)  # UserError for models without token inputs
    if all(g.consumer is None for g in groups):
        return Scores(source="no observable consumer")
    session = statistics_session(graph, groups)
    feeds = None
    if logits_output(graph) is not None:
        try:
            feeds = generated_token_feeds(graph, seed, session=session)
        except Exception as e:  # noqa: BLE001 - e.g. a position table shorter than SYNTHETIC_LENGTH
            log.info("the model could not generate calibration text, using random token ids: %s", e)
            feeds = None
    if feeds is not None:
        count, length = next(iter(feeds.values())).shape
        return channel_importance(
            graph, groups, feeds, session, f"{count} x {length} tokens generated by the model"
        )
    return importance_from_random_tokens(graph, groups, seed, session)


def importance_from_random_tokens(
    graph: gs.Graph, groups: list[Group], seed: int = 0, session=None
) -> Scores:
    """channel_importance on synthetic_token_feeds: SYNTHETIC_LENGTH tokens per sequence, or shorter
    ones (same token count) when the model rejects that length (a small position table)."""
    from ..runtime.tokens import SYNTHETIC_LENGTH, SYNTHETIC_SEQUENCES, synthetic_token_feeds

    length, error = SYNTHETIC_LENGTH, None
    while length >= 8:
        feeds = synthetic_token_feeds(
            graph, seed, SYNTHETIC_SEQUENCES * SYNTHETIC_LENGTH // length, length
        )
        try:
            return channel_importance(graph, groups, feeds, session, "random token ids")
        except Exception as e:  # noqa: BLE001 - onnxruntime rejects the length: try a shorter one
            log.info("random token ids of length %d rejected (%s); trying shorter", length, e)
            error, length = e, length // 4
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    raise ConfigError(
        "importance",
        "act",
        f"without {{calib}}: the model does not run on random token ids "
        f"({literal(first)}); give {{calib}} FILE.npz",
    )
