"""The model registry on the real S3: numbered immutable versions, promotion only on a strictly better
metric (unless forced), rollback, the promotion history, and registries that do not see each other."""

from __future__ import annotations

import pytest

from essp.clients.s3 import ObjectNotFound, ObjectStore
from essp.errors import EsspError
from essp.lifecycle.model_registry import ModelNotFound, ModelRegistry, ModelVersion


def register(registry, top1, run="run-1", params=None):
    bucket = registry.settings.bucket_models
    return registry.register(
        run=run,
        streams={"rgb": f"s3://{bucket}/runs/{run}/rgb.pt", "flow": f"s3://{bucket}/runs/{run}/flow.pt"},
        fusion={"strategy": "weighted", "weights": {"rgb": 0.4, "flow": 0.6}},
        metrics={"top1": top1, "top5": 0.9, "mAP": float("nan"), "streams": {"rgb": {"top1": top1 - 0.05}}},
        params=params or {"epochs": 3},
        manifest="s3://videos/manifests/ucf/v0001.json",
        class_names=["A", "B", "C"],
    )


def test_register_promote_refuse_force_and_history(settings):
    registry = ModelRegistry(settings, "ucf101")
    assert registry.versions() == [] and registry.production() is None and registry.history() == []
    first, second = register(registry, 0.7), register(registry, 0.6, run="run-2")
    assert (first.version, second.version) == (1, 2)
    assert registry.uri(2) == f"s3://{settings.bucket_models}/registry/ucf101/versions/000002.json"
    assert ObjectStore(settings).exists(settings.bucket_models, "registry/ucf101/versions/000002.json")
    assert second.metrics["mAP"] is None  # NaN is stored as null

    result = registry.promote(1)
    assert result.promoted and result.incumbent is None and result.candidate_value == 0.7
    assert "first promotion" in result.reason
    assert registry.production().version == 1

    result = registry.promote(2)
    assert not result.promoted and result.candidate_value == 0.6 and result.incumbent_value == 0.7
    assert result.incumbent == 1 and "not greater than" in result.reason
    assert registry.production().version == 1

    # Equal is not better: promotion needs a strictly greater value.
    equal = register(registry, 0.7, run="run-3")
    assert not registry.promote(equal.version).promoted

    third = register(registry, 0.8, run="run-4")
    assert third.version == 4
    result = registry.promote(4)
    assert result.promoted and result.candidate_value == 0.8 and result.incumbent_value == 0.7
    assert isinstance(result.candidate_value, float)
    pointer = registry.production_pointer()
    assert pointer.version == 4 and pointer.previous == 1 and pointer.value == 0.8 and pointer.promoted_at

    forced = registry.promote(2, force=True, reason="canary")
    assert forced.promoted and forced.forced and "canary" in forced.reason
    assert registry.production().version == 2

    back = registry.rollback(4, reason="canary regressed")
    assert back.promoted and "rollback from version 2" in back.reason and "canary regressed" in back.reason
    assert registry.production().version == 4
    assert not registry.promote(4).promoted  # already in production

    # Another registry object over the same S3 sees the same state.
    again = ModelRegistry(settings, "ucf101")
    assert [v.version for v in again.versions()] == [1, 2, 3, 4]
    assert again.get(4) == third and again.production().version == 4
    assert again.production_pointer().reason == back.reason
    history = again.history()
    assert [(e.version, e.promoted) for e in history] == [(1, True), (2, False), (3, False), (4, True), (2, True),
                                                          (4, True), (4, False)]
    assert [e.version for e in again.history(promoted_only=True)] == [1, 4, 2, 4]


def test_missing_version_and_metric_raise_naming_them(settings):
    registry = ModelRegistry(settings, "m1")
    with pytest.raises(ModelNotFound, match="model registry 'm1' has no version 3.*nothing registered"):
        registry.get(3)
    register(registry, 0.5)
    with pytest.raises(ModelNotFound, match="no version 7.*versions: 1") as info:
        registry.get(7)
    assert isinstance(info.value, ObjectNotFound)
    with pytest.raises(EsspError, match="no version 9"):
        registry.promote(9)
    with pytest.raises(EsspError, match=r"model m1@1 has no metric 'top1_val' \(numeric metrics: top1, top5\)"):
        registry.promote(1, metric="top1_val")
    with pytest.raises(EsspError, match="metric 'mAP' of model m1@1 is None, not a number"):
        registry.promote(1, metric="mAP")
    assert registry.production() is None
    # The incumbent lacking the metric is an error too, and a forced promotion does not need it.
    registry.promote(1)
    register(registry, 0.6, run="run-2", params={"extra": True})
    registry.store.put_json(registry.bucket, "registry/m1/versions/000003.json",
                            {**registry.get(2).model_dump(mode="json"), "version": 3, "metrics": {"acc": 0.9}})
    with pytest.raises(EsspError, match="model m1@3 has no metric 'top1'"):
        registry.promote(3)
    forced = registry.promote(3, force=True)
    assert forced.promoted and forced.candidate_value is None and forced.incumbent_value == 0.5


def test_versions_are_immutable_and_inputs_validated(settings):
    registry = ModelRegistry(settings, "m2")
    register(registry, 0.5)
    # A version document written behind the registry's back is never overwritten: the next number is taken.
    registry.store.put_json(registry.bucket, "registry/m2/versions/000002.json",
                            {**registry.get(1).model_dump(mode="json"), "version": 2})
    assert register(registry, 0.6).version == 3
    with pytest.raises(EsspError, match="model m2@4 of run 'run-1' is not valid.*checkpoint of stream 'rgb'"):
        registry.register(run="run-1", streams={"rgb": "/tmp/rgb.pt"}, fusion={"strategy": "avg"},
                          metrics={"top1": 0.5}, class_names=["A"])
    with pytest.raises(EsspError, match="must name its \"strategy\""):
        registry.register(run="run-1", streams={"rgb": "s3://b/rgb.pt"}, fusion={}, metrics={"top1": 0.5},
                          class_names=["A"])
    with pytest.raises(EsspError, match="version must be an integer >= 1"):
        registry.get(0)
    for bad in ("", "a/b", "has space", "-lead", "x" * 65):
        with pytest.raises(EsspError, match="model registry name"):
            ModelRegistry(settings, bad)


def test_registries_with_different_names_are_separate(settings):
    a, b = ModelRegistry(settings, "alpha"), ModelRegistry(settings, "alpha-2")
    register(a, 0.5)
    register(a, 0.6)
    a.promote(1)
    assert b.versions() == [] and b.production() is None and b.history() == []
    assert register(b, 0.4).version == 1
    assert [v.version for v in a.versions()] == [1, 2] and a.production().version == 1
    assert b.production() is None
    assert ModelRegistry(settings).name == "default" and ModelRegistry(settings).versions() == []
    assert isinstance(a.get(2), ModelVersion) and a.get(2).ref == "alpha@2"


def _race(count: int, work) -> list:
    """Run ``work(i)`` in ``count`` threads released together; their results (or exceptions) in order."""
    import threading

    barrier = threading.Barrier(count)
    results: list = [None] * count

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_concurrent_registrations_take_distinct_numbers_and_lose_none(settings):
    # issue 11, fault 14: two runs registering at once both wrote version N before (exists, then put)
    registry = ModelRegistry(settings, "racing")
    runs = [f"run-{i}" for i in range(6)]
    models = _race(6, lambda i: register(ModelRegistry(settings, "racing"), 0.5, run=runs[i]))
    assert not [m for m in models if isinstance(m, Exception)], models
    assert sorted(m.version for m in models) == [1, 2, 3, 4, 5, 6]
    assert {registry.get(m.version).run for m in models} == set(runs)  # each version is its own run's


def test_two_concurrent_promotions_lose_no_update(settings):
    # issue 11, fault 14: two runs promote at once on the same production (0.5): the better (0.8) must end
    # in production whichever writes first; before, the second write replaced the first blindly (a
    # decision made on a production that had changed meanwhile), so 0.6 could end over 0.8
    registry = ModelRegistry(settings, "promoting")
    for round_ in range(8):
        base = register(registry, 0.5, run=f"base-{round_}")
        registry.promote(base.version, force=True)
        better, worse = register(registry, 0.8, run=f"better-{round_}"), register(registry, 0.6, run=f"worse-{round_}")
        order = [better.version, worse.version] if round_ % 2 else [worse.version, better.version]
        results = _race(2, lambda i, order=order: ModelRegistry(settings, "promoting").promote(order[i]))
        assert not [r for r in results if isinstance(r, Exception)], results
        pointer = registry.production_pointer()
        assert pointer.version == better.version, (round_, results)
        by_version = {r.version: r for r in results}
        assert by_version[better.version].promoted
        # the worse one was either refused on the better production, or promoted first and then replaced
        if by_version[worse.version].promoted:
            assert by_version[better.version].incumbent == worse.version
        else:
            assert by_version[worse.version].incumbent == better.version
        assert pointer.previous in (base.version, worse.version)
    # every decision is in the history, none written over another
    history = registry.history()
    assert len(history) == 8 * 3 and len({(h.version, h.at) for h in history}) == 8 * 3
