"""Fusion rules on hand-made two-stream scores, and the learned fusions on synthetic data with a known structure."""

from __future__ import annotations

import json

import numpy as np
import pytest

from essp.errors import EsspError
from essp.evaluation.fusion import (
    FUSIONS,
    Fuser,
    FusionError,
    StreamScores,
    compare_fusions,
    fuse,
    make_fuser,
)
from essp.evaluation.metrics import video_metrics

# Video 0: rgb says class 0 strongly, flow says class 1 weakly.
# Video 1: rgb undecided, flow sure of class 1 (and gives class 0 exactly zero).
RGB = np.array([[0.8, 0.2], [0.5, 0.5]])
FLOW = np.array([[0.4, 0.6], [0.0, 1.0]])


def hand_made(rgb=RGB, flow=FLOW) -> StreamScores:
    return StreamScores(video_ids=["v0", "v1"], labels=np.array([0, 1]), scores={"rgb": rgb, "flow": flow})


# ------------------------------------------------------------------------------------------ fixed rules
def test_average():
    fused = fuse("average", hand_made())
    assert np.allclose(fused, [[0.6, 0.4], [0.25, 0.75]])
    assert fused[0].argmax() == 0


def test_weighted_follows_the_weights():
    fused = fuse("weighted", hand_made(), weights={"rgb": 0.1, "flow": 0.9})
    # 0.1*[.8,.2] + 0.9*[.4,.6] = [.44,.56]
    assert np.allclose(fused, [[0.44, 0.56], [0.05, 0.95]])
    assert fused[0].argmax() == 1
    # Weights need not sum to 1: they are divided by their sum.
    assert np.allclose(fuse("weighted", hand_made(), weights={"rgb": 1.0, "flow": 9.0}), fused)
    # Equal weights are the average; all weight on one stream is that stream.
    assert np.allclose(fuse("weighted", hand_made(), weights={"rgb": 2, "flow": 2}), fuse("average", hand_made()))
    assert np.allclose(fuse("weighted", hand_made(), weights={"rgb": 1, "flow": 0}), RGB)


def test_max():
    fused = fuse("max", hand_made())
    # max is [.8,.6] and [.5,1], then renormalised
    assert np.allclose(fused, [[0.8 / 1.4, 0.6 / 1.4], [0.5 / 1.5, 1.0 / 1.5]])


def test_product():
    fused = fuse("product", hand_made())
    a, b = np.sqrt(0.8 * 0.4), np.sqrt(0.2 * 0.6)
    # A zero from one stream vetoes the class: sqrt(0.5 * 1e-8) / sqrt(0.5 * 1) = 1e-4.
    assert np.allclose(fused, [[a / (a + b), b / (a + b)], [1e-4 / (1 + 1e-4), 1 / (1 + 1e-4)]], atol=1e-7)
    assert np.allclose(fused[0], [0.620204, 0.379796], atol=1e-6)


@pytest.mark.parametrize("strategy", ["average", "max", "product"])
def test_rows_that_do_not_sum_to_one_are_renormalised(strategy):
    scaled = hand_made(rgb=RGB * 0.9, flow=FLOW * 1.05)
    fused = fuse(strategy, scaled)
    assert np.allclose(fused, fuse(strategy, hand_made()))
    assert np.allclose(fused.sum(axis=1), 1.0)


def test_fixed_fit_is_a_no_op():
    fuser = make_fuser("average", num_classes=2)
    assert fuser.fit(hand_made()) is fuser
    # The same videos can be fused after "fitting": nothing was learned from them.
    assert np.allclose(fuser.predict(hand_made()), [[0.6, 0.4], [0.25, 0.75]])


def test_weight_errors_name_the_stream():
    with pytest.raises(FusionError, match="'flow'"):
        fuse("weighted", hand_made(), weights={"rgb": 1.0})
    with pytest.raises(FusionError, match="'depth'"):
        fuse("weighted", hand_made(), weights={"rgb": 1.0, "flow": 1.0, "depth": 1.0})
    with pytest.raises(FusionError, match=r"weights\['rgb'\]"):
        make_fuser("weighted", weights={"rgb": -0.5, "flow": 1.0}, num_classes=2)
    with pytest.raises(FusionError, match="all be zero"):
        make_fuser("weighted", weights={"rgb": 0.0, "flow": 0.0}, num_classes=2)
    with pytest.raises(FusionError, match="needs weights"):
        make_fuser("weighted", num_classes=2)
    # Weights are ignored (not validated) by the other strategies.
    assert make_fuser("average", weights={"bogus": -1.0}, num_classes=2).weights is None


def test_unknown_strategy_lists_known_ones():
    with pytest.raises(FusionError) as info:
        make_fuser("median", num_classes=2)
    assert "median" in str(info.value)
    assert all(s in str(info.value) for s in FUSIONS)
    assert isinstance(info.value, EsspError) and isinstance(info.value, ValueError)


def test_num_classes_must_match():
    with pytest.raises(FusionError, match="num_classes=3"):
        make_fuser("average", num_classes=3).predict(hand_made())


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (StreamScores(["a", "b"], np.array([0, 1]), {"rgb": RGB, "flow": FLOW[:1]}), "scores['flow']: has 1 rows"),
        (StreamScores(["a", "b"], np.array([0, 1]), {"rgb": RGB, "flow": np.ones((2, 3)) / 3}),
         "has 2 classes but scores['flow'] has 3"),
        (StreamScores(["a", "a"], np.array([0, 1]), {"rgb": RGB}), "'a' appears more than once"),
        (StreamScores(["a", "b"], np.array([0, 2]), {"rgb": RGB}), "labels: must lie in [0, 2)"),
        (StreamScores(["a", "b"], np.array([0]), {"rgb": RGB}), "labels: must have shape (2,)"),
        (StreamScores(["a", "b"], np.array([0, 1]), {"rgb": -RGB}), "negative"),
        (StreamScores(["a", "b"], np.array([0, 1]), {}), "at least one stream"),
        (StreamScores(["a", "b"], np.array([0, 1]), {"rgb": RGB, "flow": FLOW}, {"rgb": np.zeros((2, 3, 4))}),
         "snippet_features: streams ['rgb'] differ"),
        (StreamScores(["a", "b"], np.array([0, 1]), {"rgb": RGB, "flow": FLOW},
                      {"rgb": np.zeros((2, 3, 4)), "flow": np.zeros((2, 5, 4))}),
         "has 3 snippets but snippet_features['flow'] has 5"),
    ],
)
def test_validate_names_the_problem(data, needle):
    with pytest.raises(FusionError) as info:
        data.validate()
    assert needle in str(info.value)


# ---------------------------------------------------------------------------------------------- learned
def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def learned_split(n: int, seed: int, prefix: str, classes: int = 4) -> StreamScores:
    """rgb is informative but biased towards class 0 (a learned combiner can undo that); flow is pure noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    bias = np.zeros(classes)
    bias[0] = 1.5
    rgb = _softmax(2.0 * np.eye(classes)[labels] + rng.normal(0, 1, (n, classes)) + bias)
    flow = rng.dirichlet(np.ones(classes), n)
    return StreamScores([f"{prefix}{i:03d}" for i in range(n)], labels, {"rgb": rgb, "flow": flow})


@pytest.fixture(scope="module")
def learned_data():
    train, test = learned_split(200, 1, "train"), learned_split(200, 2, "test")
    fuser = make_fuser("learned", num_classes=4, seed=0).fit(train)
    return train, test, fuser


def test_learned_beats_every_single_stream(learned_data):
    _, test, fuser = learned_data
    fused = fuser.predict(test)
    assert fused.shape == (200, 4)
    assert np.allclose(fused.sum(axis=1), 1.0)
    acc = video_metrics(fused, test.labels)["top1"]
    rgb = video_metrics(test.scores["rgb"], test.labels)["top1"]
    flow = video_metrics(test.scores["flow"], test.labels)["top1"]
    assert flow < 0.4  # noise, about chance (0.25)
    assert rgb > 0.5
    assert acc >= max(rgb, flow) + 0.03  # the bias is undone
    assert acc > video_metrics(fuse("average", test), test.labels)["top1"]


def test_learned_does_not_read_test_labels(learned_data):
    _, test, fuser = learned_data
    relabelled = StreamScores(test.video_ids, np.roll(test.labels, 1), test.scores)
    assert not np.array_equal(relabelled.labels, test.labels)
    assert np.array_equal(fuser.predict(relabelled), fuser.predict(test))


def test_learned_refuses_training_videos(learned_data):
    train, test, fuser = learned_data
    ids = list(test.video_ids)
    ids[7] = train.video_ids[3]
    leaky = StreamScores(ids, test.labels, test.scores)
    with pytest.raises(FusionError, match=train.video_ids[3]):
        fuser.predict(leaky)
    with pytest.raises(FusionError, match="training set"):
        fuser.predict(train)


def test_learned_refuses_other_streams_and_unfitted_use(learned_data):
    _, test, fuser = learned_data
    only_rgb = StreamScores(test.video_ids, test.labels, {"rgb": test.scores["rgb"]})
    with pytest.raises(FusionError, match="differ from the streams"):
        fuser.predict(only_rgb)
    fresh = make_fuser("learned", num_classes=4)
    with pytest.raises(FusionError, match="before fit"):
        fresh.predict(test)
    with pytest.raises(FusionError, match="before fit"):
        fresh.state()
    with pytest.raises(FusionError, match="pass train="):
        fuse("learned", test)


def test_learned_is_deterministic(learned_data):
    train, test, fuser = learned_data
    again = make_fuser("learned", num_classes=4, seed=0).fit(train)
    assert np.array_equal(again.predict(test), fuser.predict(test))
    assert np.array_equal(fuse("learned", test, train=train, seed=0), fuser.predict(test))


def test_learned_state_round_trip(learned_data):
    _, test, fuser = learned_data
    state = json.loads(json.dumps(fuser.state()))
    restored = Fuser.from_state(state)
    assert np.array_equal(restored.predict(test), fuser.predict(test))
    # The training ids travel with the state: the restored fuser still refuses them.
    leaky = StreamScores([state["train_video_ids"][0], *test.video_ids[1:]], test.labels, test.scores)
    with pytest.raises(FusionError, match="training set"):
        restored.predict(leaky)


def test_state_errors():
    with pytest.raises(FusionError, match="format"):
        Fuser.from_state({"strategy": "learned"})
    with pytest.raises(FusionError, match="corrupt"):
        Fuser.from_state({"format": "essp.fusion/1", "strategy": "learned", "seed": 0, "num_classes": 4})
    fixed = make_fuser("weighted", weights={"rgb": 1, "flow": 3}, num_classes=2)
    restored = Fuser.from_state(json.loads(json.dumps(fixed.state())))
    assert np.array_equal(restored.predict(hand_made()), fixed.predict(hand_made()))


# --------------------------------------------------------------------------------------------- sequence
SEQ_T, SEQ_D = 10, 6


def ramp_split(n: int, seed: int, prefix: str, with_features: bool = True) -> StreamScores:
    """Class 0: rgb feature 0 ramps up over the snippets; class 1: it ramps down. Its time average is the
    same (zero) for both, and the scores are made from time averages, so no rule on them can separate the classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    ramp = np.linspace(-1.0, 1.0, SEQ_T)
    direction = np.where(labels == 0, 1.0, -1.0)
    rgb = rng.normal(0, 0.5, (n, SEQ_T, SEQ_D))
    rgb[:, :, 0] += 2.0 * direction[:, None] * ramp[None, :]
    flow = rng.normal(0, 0.5, (n, SEQ_T, SEQ_D + 2))
    mix = np.random.default_rng(123).normal(0, 1, (SEQ_D, 2))
    scores = {"rgb": _softmax(rgb.mean(axis=1) @ mix),
              "flow": _softmax(flow.mean(axis=1)[:, :2])}
    feats = {"rgb": rgb.astype(np.float32), "flow": flow.astype(np.float32)} if with_features else None
    return StreamScores([f"{prefix}{i:03d}" for i in range(n)], labels, scores, feats)


@pytest.fixture(scope="module")
def sequence_data():
    train, test = ramp_split(96, 11, "train"), ramp_split(80, 12, "test")
    fuser = make_fuser("sequence", num_classes=2, seed=0).fit(train)
    return train, test, fuser


def test_ramp_data_has_equal_time_averages():
    ramp = np.linspace(-1.0, 1.0, SEQ_T)
    assert abs(ramp.mean()) < 1e-12  # ramping up or down averages to the same value


def test_sequence_uses_temporal_order(sequence_data):
    _, test, fuser = sequence_data
    fused = fuser.predict(test)
    assert fused.shape == (80, 2)
    assert np.allclose(fused.sum(axis=1), 1.0, atol=1e-6)
    seq_acc = video_metrics(fused, test.labels)["top1"]
    avg_acc = video_metrics(fuse("average", test), test.labels)["top1"]
    assert avg_acc < 0.7
    assert seq_acc >= 0.9
    assert seq_acc >= avg_acc + 0.25


def test_sequence_state_round_trip_and_determinism(sequence_data):
    train, test, fuser = sequence_data
    state = json.loads(json.dumps(fuser.state()))
    assert set(state["params"]) >= {"state_dict", "mean", "std", "feature_dims"}
    restored = Fuser.from_state(state)
    assert np.array_equal(restored.predict(test), fuser.predict(test))
    again = make_fuser("sequence", num_classes=2, seed=0).fit(train)
    assert np.array_equal(again.predict(test), fuser.predict(test))


def test_sequence_refuses_training_videos(sequence_data):
    train, _, fuser = sequence_data
    with pytest.raises(FusionError, match="training set"):
        fuser.predict(train)


def test_sequence_requires_features(sequence_data):
    _, test, fuser = sequence_data
    with pytest.raises(FusionError, match="train.snippet_features"):
        make_fuser("sequence", num_classes=2).fit(ramp_split(10, 3, "x", with_features=False))
    no_feats = StreamScores(test.video_ids, test.labels, test.scores)
    with pytest.raises(FusionError, match="test.snippet_features"):
        fuser.predict(no_feats)


# -------------------------------------------------------------------------------------------- comparison
def test_compare_fusions_with_train():
    train, test = ramp_split(48, 21, "train"), ramp_split(24, 22, "test")
    result = compare_fusions(train, test, class_names=["up", "down"])
    assert list(result) == [*FUSIONS, "stream:flow", "stream:rgb"]
    for key, metrics in result.items():
        assert "skipped" not in metrics, key
        assert metrics["videos"] == 24
        assert metrics["class_names"] == ["up", "down"]
    assert result["weighted"]["note"] == "no weights given: equal weights used"
    assert result["weighted"]["top1"] == result["average"]["top1"]
    assert result["stream:rgb"] == video_metrics(test.scores["rgb"], test.labels, ["up", "down"])
    assert json.loads(json.dumps(result)) == result


def test_compare_fusions_skips_what_cannot_run():
    test = learned_split(30, 5, "test")  # no snippet features
    result = compare_fusions(None, test, weights={"rgb": 0.7, "flow": 0.3})
    assert set(result) == {*FUSIONS, "stream:rgb", "stream:flow"}
    assert "training set" in result["learned"]["skipped"]
    assert "training set" in result["sequence"]["skipped"]
    assert "note" not in result["weighted"]
    assert np.isclose(result["weighted"]["top1"], video_metrics(
        fuse("weighted", test, weights={"rgb": 0.7, "flow": 0.3}), test.labels)["top1"])

    train = learned_split(40, 6, "train")
    result = compare_fusions(train, test)
    assert "top1" in result["learned"]
    assert "snippet features" in result["sequence"]["skipped"]
