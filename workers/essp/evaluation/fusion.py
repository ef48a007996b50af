"""Late fusion of the two-stream classifier's outputs: fixed rules, a learned combiner and an LSTM over snippets.

Each stream (``rgb``, ``flow``, ...) gives per-video class probabilities (N, C); optionally also its
time-ordered per-snippet penultimate features (N, T, D). The fixed rules (average, weighted, max,
product) need no training. ``learned`` (a multinomial logistic regression on the streams' log
probabilities) and ``sequence`` (an LSTM over the concatenated snippet features, the "feature
aggregation" of Peng et al., LSVC'17 §3.5) are fitted on training videos only; a fitted fuser
records the training video ids and refuses to predict on any of them, so a test score can never
come from a combiner that has seen the test videos.

The strategies are a registry (:data:`FUSIONS`, the `fusion` param's choices). This module needs no
torch; the two learned combiners (:mod:`essp.evaluation.learned`) import it when they fit or predict.

A fitted fuser serialises to plain JSON (:meth:`Fuser.state`) and back (:meth:`Fuser.from_state`) with
bit-identical predictions, so fitting and scoring can run in different processes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from essp.errors import EsspError
from essp.evaluation.metrics import video_metrics
from essp.registry import Registry

STATE_FORMAT = "essp.fusion/1"  # a format id stored with every fusion state: never renamed
# Added before taking logs, so a probability of exactly 0 gives a large finite negative, not -inf.
LOG_EPS = 1e-8



class FusionError(EsspError, ValueError):
    """Stream scores, weights, a strategy or a fitted state that fusion cannot use; the message says why."""


# A fixed rule: the streams' normalised probabilities (S, N, C), their names and the weights -> (N, C).
Rule = Callable[[np.ndarray, list[str], "dict[str, float] | None"], np.ndarray]


@dataclass(frozen=True)
class FusionStrategy:
    """One way of fusing the streams: a fixed ``rule``, or (``learned``) a combiner fitted on training videos."""

    name: str
    description: str
    learned: bool = False
    rule: Rule | None = None


FUSIONS: Registry[FusionStrategy] = Registry("fusion strategy", unknown=FusionError)


def fixed_rule(name: str, description: str) -> Callable[[Rule], Rule]:
    """Register a training-free fusion rule under ``name``."""
    def register(rule: Rule) -> Rule:
        FUSIONS.add(name, FusionStrategy(name, description, rule=rule))
        return rule
    return register


@dataclass
class StreamScores:
    """The per-stream outputs for one set of videos (one split): class probabilities, optionally snippet features."""

    video_ids: list[str]
    labels: np.ndarray
    scores: dict[str, np.ndarray]
    snippet_features: dict[str, np.ndarray] | None = None

    @property
    def streams(self) -> list[str]:
        """Stream names in sorted order: the order in which the learned fusions stack them."""
        return sorted(self.scores)

    @property
    def num_classes(self) -> int:
        """C, the number of score columns (the same for every stream once validated)."""
        return int(np.asarray(next(iter(self.scores.values()))).shape[1])

    def validate(self) -> StreamScores:
        """Check shapes and values agree across streams; raise FusionError naming the first inconsistency."""
        ids = list(self.video_ids)
        n = len(ids)
        if n < 1:
            raise FusionError("video_ids: no videos")
        if not all(isinstance(v, str) for v in ids):
            raise FusionError("video_ids: must all be strings")
        if len(set(ids)) != n:
            dup = next(v for v, count in Counter(ids).items() if count > 1)
            raise FusionError(f"video_ids: {dup!r} appears more than once")
        if not isinstance(self.scores, dict) or not self.scores:
            raise FusionError("scores: need at least one stream (a dict stream name -> (N, C) array)")

        classes: int | None = None
        for name in self.streams:
            arr = np.asarray(self.scores[name])
            where = f"scores[{name!r}]"
            if arr.ndim != 2:
                raise FusionError(f"{where}: must be 2-D (videos, classes), got shape {arr.shape}")
            if arr.shape[0] != n:
                raise FusionError(f"{where}: has {arr.shape[0]} rows but there are {n} video ids")
            if not np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_:
                raise FusionError(f"{where}: must be numeric, got dtype {arr.dtype}")
            if arr.shape[1] < 1:
                raise FusionError(f"{where}: has no classes")
            if not np.isfinite(arr).all():
                raise FusionError(f"{where}: contains NaN or infinite values")
            if (arr < 0).any():
                raise FusionError(f"{where}: contains negative values; expected class probabilities")
            if classes is None:
                classes = arr.shape[1]
            elif arr.shape[1] != classes:
                first = self.streams[0]
                raise FusionError(f"{where}: has {arr.shape[1]} classes but scores[{first!r}] has {classes}")
        assert classes is not None

        labels = np.asarray(self.labels)
        if labels.shape != (n,):
            raise FusionError(f"labels: must have shape ({n},) to match the video ids, got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise FusionError(f"labels: must be integer class indices, got dtype {labels.dtype}")
        if ((labels < 0) | (labels >= classes)).any():
            raise FusionError(f"labels: must lie in [0, {classes}), got values from {labels.min()} to {labels.max()}")

        if self.snippet_features is not None:
            feats = self.snippet_features
            if not isinstance(feats, dict) or set(feats) != set(self.scores):
                got = sorted(feats) if isinstance(feats, dict) else type(feats).__name__
                raise FusionError(f"snippet_features: streams {got} differ from the scores' streams {self.streams}")
            steps: int | None = None
            for name in self.streams:
                arr = np.asarray(feats[name])
                where = f"snippet_features[{name!r}]"
                if arr.ndim != 3:
                    raise FusionError(f"{where}: must be 3-D (videos, snippets, dims), got shape {arr.shape}")
                if arr.shape[0] != n:
                    raise FusionError(f"{where}: has {arr.shape[0]} videos but there are {n} video ids")
                if arr.shape[1] < 1 or arr.shape[2] < 1:
                    raise FusionError(f"{where}: has no snippets or no feature dimensions (shape {arr.shape})")
                if not np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_:
                    raise FusionError(f"{where}: must be numeric, got dtype {arr.dtype}")
                if not np.isfinite(arr).all():
                    raise FusionError(f"{where}: contains NaN or infinite values")
                if steps is None:
                    steps = arr.shape[1]
                elif arr.shape[1] != steps:
                    first = self.streams[0]
                    raise FusionError(
                        f"{where}: has {arr.shape[1]} snippets but snippet_features[{first!r}] has {steps}"
                    )
        return self


def _normalised_rows(p: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1 (snippet-averaged softmaxes only sum to ~1); an all-zero row becomes uniform."""
    p = np.asarray(p, dtype=np.float64)
    sums = p.sum(axis=1, keepdims=True)
    uniform = np.full_like(p, 1.0 / p.shape[1])
    return np.where(sums > 0, p / np.where(sums > 0, sums, 1.0), uniform)


def _check_weights(weights: object) -> dict[str, float]:
    """Validate weights for the weighted rule: a dict stream -> finite float >= 0 with a positive sum."""
    if weights is None:
        raise FusionError("weights: the 'weighted' strategy needs weights, a dict stream name -> weight")
    if not isinstance(weights, dict) or not weights:
        raise FusionError(f"weights: must be a non-empty dict stream name -> weight, got {weights!r}")
    out: dict[str, float] = {}
    for name, value in weights.items():
        if not isinstance(name, str):
            raise FusionError(f"weights: stream names must be strings, got {name!r}")
        try:
            w = float(value)
        except (TypeError, ValueError) as exc:
            raise FusionError(f"weights[{name!r}]: not a number ({value!r})") from exc
        if not math.isfinite(w) or w < 0:
            raise FusionError(f"weights[{name!r}]: must be finite and >= 0, got {value!r}")
        out[name] = w
    if sum(out.values()) <= 0:
        raise FusionError(f"weights: must not all be zero, got {out}")
    return out


@fixed_rule("average", "the mean of the streams' probabilities")
def _average(probs: np.ndarray, streams: list[str], weights: dict[str, float] | None) -> np.ndarray:
    return probs.mean(axis=0)


@fixed_rule("weighted", "the streams' probabilities weighted by the fusion_weights param")
def _weighted(probs: np.ndarray, streams: list[str], weights: dict[str, float] | None) -> np.ndarray:
    assert weights is not None
    missing = [s for s in streams if s not in weights]
    if missing:
        raise FusionError(f"weights: no weight for stream {missing[0]!r} (streams: {streams})")
    unknown = sorted(set(weights) - set(streams))
    if unknown:
        raise FusionError(f"weights: stream {unknown[0]!r} is not among the scores' streams {streams}")
    w = np.array([weights[s] for s in streams], dtype=np.float64)
    if w.sum() <= 0:
        raise FusionError(f"weights: the weights of streams {streams} sum to 0")
    return np.tensordot(w, probs, axes=1) / w.sum()


@fixed_rule("max", "per class, the most confident stream")
def _max(probs: np.ndarray, streams: list[str], weights: dict[str, float] | None) -> np.ndarray:
    return _normalised_rows(probs.max(axis=0))


@fixed_rule("product", "the geometric mean of the streams' probabilities")
def _product(probs: np.ndarray, streams: list[str], weights: dict[str, float] | None) -> np.ndarray:
    return _normalised_rows(np.exp(np.log(probs + LOG_EPS).mean(axis=0)))


FUSIONS.add("learned", FusionStrategy("learned", "a logistic regression on the streams' log probabilities, fitted on "
                                                 "training videos", learned=True))
FUSIONS.add("sequence", FusionStrategy("sequence", "an LSTM over the streams' snippet features, fitted on training "
                                                   "videos", learned=True))


def _fixed_fusion(strategy: str, test: StreamScores, weights: dict[str, float] | None) -> np.ndarray:
    """Apply one of the training-free rules to validated scores; every output row sums to 1."""
    rule = FUSIONS.get(strategy).rule
    assert rule is not None, strategy
    streams = test.streams
    probs = np.stack([_normalised_rows(test.scores[s]) for s in streams])  # (S, N, C)
    return rule(probs, streams, weights)


def _log_prob_features(data: StreamScores, streams: list[str]) -> np.ndarray:
    """concat over streams (in `streams` order) of log(p + eps): the logistic regression's input (N, S*C)."""
    return np.concatenate([np.log(_normalised_rows(data.scores[s]) + LOG_EPS) for s in streams], axis=1)


def _snippet_inputs(data: StreamScores, streams: list[str]) -> np.ndarray:
    """Per-time-step concatenation of the streams' snippet features: (N, T, sum of D_s)."""
    assert data.snippet_features is not None
    return np.concatenate([np.asarray(data.snippet_features[s], dtype=np.float64) for s in streams], axis=2)


class Fuser:
    """One fusion strategy; build with :func:`make_fuser`, call :meth:`fit` on training videos, then :meth:`predict`."""

    def __init__(self, strategy: str, *, num_classes: int, weights: dict[str, float] | None = None,
                 seed: int = 0) -> None:
        self.strategy = strategy
        self.num_classes = num_classes
        self.weights = weights
        self.seed = seed
        self._streams: list[str] | None = None
        self._train_ids: frozenset[str] = frozenset()
        self._params: dict[str, Any] = {}
        self._net: Any = None  # the fitted sequence net (essp.evaluation.learned.SequenceNet)

    @property
    def needs_fit(self) -> bool:
        """True for the strategies that learn from training videos (learned, sequence)."""
        return FUSIONS.get(self.strategy).learned

    @property
    def fitted(self) -> bool:
        """Whether predict can run: always for the fixed rules, after fit (or from_state) for the learned ones."""
        return not self.needs_fit or self._streams is not None

    # ----------------------------------------------------------------------------------------- fit
    def fit(self, train: StreamScores) -> Fuser:
        """Learn the combiner from TRAINING videos only (a no-op for the fixed rules); returns self."""
        if not self.needs_fit:
            return self
        train.validate()
        self._check_classes(train, "train")
        from essp.evaluation import learned

        streams = train.streams
        labels = np.asarray(train.labels, dtype=np.int64)
        if self.strategy == "learned":
            self._params = learned.fit_logreg(_log_prob_features(train, streams), labels, self.num_classes)
        else:
            if train.snippet_features is None:
                raise FusionError("train.snippet_features: the 'sequence' strategy needs per-snippet features")
            self._net, params = learned.fit_sequence(_snippet_inputs(train, streams), labels, self.num_classes,
                                                     self.seed)
            dims = {s: int(np.asarray(train.snippet_features[s]).shape[2]) for s in streams}
            self._params = {"feature_dims": dims, **params}
        self._streams = streams
        self._train_ids = frozenset(train.video_ids)
        return self

    # ------------------------------------------------------------------------------------- predict
    def predict(self, test: StreamScores) -> np.ndarray:
        """Fused class probabilities (N, C) for `test`; labels in `test` are never read."""
        test.validate()
        self._check_classes(test, "test")
        if not self.needs_fit:
            return _fixed_fusion(self.strategy, test, self.weights)
        if self._streams is None:
            raise FusionError(f"strategy {self.strategy!r}: predict called before fit (fit it on training videos)")
        if test.streams != self._streams:
            raise FusionError(f"test.scores: streams {test.streams} differ from the streams {self._streams} "
                              f"the {self.strategy!r} fuser was fitted on")
        leaked = [v for v in test.video_ids if v in self._train_ids]
        if leaked:
            raise FusionError(f"test.video_ids: {len(leaked)} test video(s) were in the training set the "
                              f"{self.strategy!r} fuser was fitted on, e.g. {leaked[:3]}; refusing to score them")
        if self.strategy == "learned":
            return self._predict_logreg(_log_prob_features(test, self._streams))
        return self._predict_sequence(test)

    def _predict_logreg(self, x: np.ndarray) -> np.ndarray:
        from essp.evaluation import learned

        return learned.predict_logreg(self._params, x)

    def _predict_sequence(self, test: StreamScores) -> np.ndarray:
        assert self._streams is not None and self._net is not None
        if test.snippet_features is None:
            raise FusionError("test.snippet_features: the 'sequence' strategy needs per-snippet features")
        for s, d in self._params["feature_dims"].items():
            got = np.asarray(test.snippet_features[s]).shape[2]
            if got != d:
                raise FusionError(f"test.snippet_features[{s!r}]: has {got} dims but the fuser was fitted on {d}")
        from essp.evaluation import learned

        return learned.predict_sequence(self._net, self._params, _snippet_inputs(test, self._streams))

    def _check_classes(self, data: StreamScores, which: str) -> None:
        if data.num_classes != self.num_classes:
            raise FusionError(f"{which}.scores: have {data.num_classes} classes but the fuser was made for "
                              f"num_classes={self.num_classes}")

    # --------------------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """Plain-JSON description of this fuser, fitted parameters included; see :meth:`from_state`."""
        if not self.fitted:
            raise FusionError(f"strategy {self.strategy!r}: state() called before fit; there is nothing to save")
        out: dict[str, Any] = {"format": STATE_FORMAT, "strategy": self.strategy, "num_classes": self.num_classes,
                               "seed": self.seed, "weights": self.weights}
        if self.needs_fit:
            assert self._streams is not None
            params = dict(self._params)
            if self.strategy == "sequence":
                from essp.evaluation import learned

                assert self._net is not None
                params["state_dict"] = learned.net_state(self._net)
            out.update(streams=list(self._streams), train_video_ids=sorted(self._train_ids), params=params)
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Fuser:
        """Rebuild a fuser saved by :meth:`state` (possibly in another process); predictions are identical."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise FusionError(f"state: not a fusion state of format {STATE_FORMAT!r} (got {got!r})")
        try:
            fuser = make_fuser(state["strategy"], weights=state.get("weights"), seed=int(state["seed"]),
                               num_classes=int(state["num_classes"]))
            if fuser.needs_fit:
                params = dict(state["params"])
                fuser._streams = list(state["streams"])
                fuser._train_ids = frozenset(state["train_video_ids"])
                if fuser.strategy == "sequence":
                    from essp.evaluation import learned

                    tensors = params.pop("state_dict")
                    d_in = sum(int(d) for d in params["feature_dims"].values())
                    fuser._net = learned.net_from_state(tensors, d_in, int(params["hidden"]), fuser.num_classes)
                fuser._params = params
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            if isinstance(exc, FusionError):
                raise
            raise FusionError(f"state: incomplete or corrupt fusion state ({type(exc).__name__}: {exc})") from exc
        return fuser


def make_fuser(strategy: str, *, weights: dict[str, float] | None = None, seed: int = 0, num_classes: int) -> Fuser:
    """Build a fuser for one strategy; `weights` is required for 'weighted' and ignored by the others."""
    FUSIONS.get(strategy)  # an unknown strategy: FusionError listing the known ones
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise FusionError(f"num_classes: must be a positive integer, got {num_classes!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise FusionError(f"seed: must be an integer, got {seed!r}")
    checked = _check_weights(weights) if strategy == "weighted" else None
    return Fuser(strategy, num_classes=int(num_classes), weights=checked, seed=int(seed))


def fuse(strategy: str, test: StreamScores, *, train: StreamScores | None = None,
         weights: dict[str, float] | None = None, seed: int = 0) -> np.ndarray:
    """Fit (when the strategy learns, on `train` only) and predict in one call."""
    test.validate()
    fuser = make_fuser(strategy, weights=weights, seed=seed, num_classes=test.num_classes)
    if fuser.needs_fit:
        if train is None:
            raise FusionError(f"train: the {strategy!r} strategy learns from training videos; pass train=...")
        fuser.fit(train)
    return fuser.predict(test)


def compare_fusions(train: StreamScores | None, test: StreamScores, *, weights: dict[str, float] | None = None,
                    seed: int = 0, class_names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Score every strategy and every single stream on `test` side by side; what cannot run says why.

    Keys: each registered strategy (:data:`FUSIONS`), then ``stream:<name>``. Values are :func:`video_metrics` dicts, or
    ``{"skipped": reason}``. Without `weights`, 'weighted' uses equal weights and adds a ``note``.
    """
    test.validate()
    results: dict[str, dict[str, Any]] = {}
    for strategy in FUSIONS:
        note = None
        strat_weights = weights
        if strategy == "weighted" and weights is None:
            strat_weights = {s: 1.0 for s in test.streams}
            note = "no weights given: equal weights used"
        if FUSIONS.get(strategy).learned:
            if train is None:
                results[strategy] = {"skipped": "no training set given (learned fusions fit on training videos only)"}
                continue
            if strategy == "sequence" and (train.snippet_features is None or test.snippet_features is None):
                which = "train" if train.snippet_features is None else "test"
                results[strategy] = {"skipped": f"no snippet features in the {which} set"}
                continue
            try:
                scores = fuse(strategy, test, train=train, seed=seed)
            except FusionError as exc:
                results[strategy] = {"skipped": str(exc)}
                continue
        else:
            scores = fuse(strategy, test, weights=strat_weights, seed=seed)
        results[strategy] = video_metrics(scores, test.labels, class_names)
        if note:
            results[strategy]["note"] = note
    for stream in test.streams:
        results[f"stream:{stream}"] = video_metrics(np.asarray(test.scores[stream]), test.labels, class_names)
    return results
