"""The graph the Airflow UI draws of the training DAGs (issue 13): one edge per dependency, readable at
fit-to-screen.

The structure is made as the UI's route makes it (airflow/api_fastapi/core_api/routes/ui/structure.py):
the DAG serialized and read back, its nodes from ``task_group_to_dict``, its edges from
``airflow.utils.dag_edges.dag_edges`` (task groups joined through their join nodes). The UI opens the graph
with its groups closed and draws, for a closed group, every edge of a task inside it as an edge of the group
(the ``hwt`` function of the UI's bundle, ui/dist/assets/index-*.js), so two edges into one group are two
parallel lines there: validate_params used to send ten, one per task reading ``plan[...]``.
"""

from __future__ import annotations

import collections

import pytest
from test_stage_operator import _dags

TRAIN_CHAIN = ["validate_params", "prepare", "training", "evaluation", "registry", "release_workers"]
NIGHTLY_CHAIN = ["detect_changes", "changed", "refresh_manifest", "plan_finetune", "prepare", "training",
                 "evaluation", "registry", "record_retrain", "release_workers"]
# Inside the groups, what each task waits for (its direct upstream tasks).
INSIDE = {"ensure_workers": {"verify_manifest"}, "train": {"streams"}, "release_trainers": {"train"},
          "fuse_and_report": {"score_test", "score_val"}, "report_summary": {"register_model"}}


@pytest.fixture(scope="module")
def dags():
    return _dags()


def structure(dag) -> tuple[list[dict], list[dict]]:
    """The nodes and edges the UI gets from /ui/structure/structure_data for ``dag``."""
    from airflow.api_fastapi.core_api.services.ui.task_group import task_group_to_dict
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.dag_edges import dag_edges

    serialized = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    group_dict = serialized.task_group.get_task_group_dict()
    nodes = [task_group_to_dict(child, group_dict=group_dict)
             for child in serialized.task_group.topological_sort(group_dict=group_dict)]
    return nodes, dag_edges(serialized)


def closed(nodes: list[dict], edges: list[dict]) -> collections.Counter:
    """The edges drawn with every group closed, as (source, target) -> how many structure edges fold onto it."""
    top: dict[str, str] = {}

    def walk(node: dict, root: str) -> None:
        top[node["id"]] = root
        for child in node.get("children") or []:
            walk(child, root)

    for node in nodes:
        walk(node, node["id"])
    folded = ((top[e["source_id"]], top[e["target_id"]]) for e in edges)
    return collections.Counter(pair for pair in folded if pair[0] != pair[1])


def redundant(edges: list[dict]) -> list[tuple[str, str]]:
    """Edges whose target is reachable from their source another way (a dependency drawn twice); the
    setup/teardown edge (dashed, ensure_workers to release_workers) is a relation of its own."""
    graph = collections.defaultdict(set)
    plain = [(e["source_id"], e["target_id"]) for e in edges if not e.get("is_setup_teardown")]
    for source, target in plain:
        graph[source].add(target)

    def reachable(start: str, skip: tuple[str, str]) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for nxt in graph[node]:
                if (node, nxt) != skip and nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    return [(s, t) for s, t in plain if t in reachable(s, (s, t))]


@pytest.mark.parametrize(("dag_id", "chain"), [("essp_train", TRAIN_CHAIN),
                                               ("essp_nightly_retrain", NIGHTLY_CHAIN)])
def test_the_graph_has_one_edge_per_dependency(dags, dag_id, chain):
    nodes, edges = structure(dags[dag_id])
    pairs = [(e["source_id"], e["target_id"]) for e in edges]
    assert len(pairs) == len(set(pairs)), "duplicate edges"
    assert not redundant(edges), redundant(edges)
    # with the groups closed (how the UI opens the graph): the chain, each link drawn once, and the dashed
    # setup/teardown edge of the workers
    drawn = closed(nodes, edges)
    assert {pair: n for pair, n in drawn.items() if n > 1} == {}, "parallel edges between closed groups"
    assert set(drawn) == {*zip(chain, chain[1:], strict=False), ("prepare", "release_workers")}
    teardown = [(e["source_id"], e["target_id"]) for e in edges if e.get("is_setup_teardown")]
    assert teardown == [("ensure_workers", "release_workers")]
    # the plan task has one edge out: to the first group
    plan_task = chain[chain.index("prepare") - 1]
    assert [p for p in pairs if p[0] == plan_task] == [(plan_task, "prepare.upstream_join_id")]


@pytest.mark.parametrize("dag_id", ["essp_train", "essp_nightly_retrain"])
def test_the_dependencies_and_the_data_flow_are_still_there(dags, dag_id):
    from essp.operators.stage import EsspStageOperator

    dag = dags[dag_id]
    for task_id, upstream in INSIDE.items():
        assert dag.get_task(task_id).upstream_task_ids == upstream, task_id
    plan_task = "validate_params" if dag_id == "essp_train" else "plan_finetune"
    assert dag.get_task("verify_manifest").upstream_task_ids == {plan_task}
    # the groups follow each other
    order = ["verify_manifest", "ensure_workers", "streams", "train", "release_trainers", "score_test",
             "fuse_and_report", "register_model", "report_summary", "release_workers"]
    for before, after in zip(order, order[1:], strict=False):
        assert before in dag.get_task(after).get_flat_relative_ids(upstream=True), (before, after)
    # what a task reads from further up when it runs comes from a task upstream of it, the plan's run id above all
    readers = {t.task_id: t.xcom_params for t in dag.tasks if isinstance(t, EsspStageOperator) and t.xcom_params}
    assert {"ensure_workers", "release_trainers", "score_test", "score_val", "fuse_and_report", "register_model",
            "release_workers"} <= set(readers)
    for task_id, sources in readers.items():
        upstream = dag.get_task(task_id).get_flat_relative_ids(upstream=True)
        for name, (source, key) in sources.items():
            assert source in upstream, (task_id, name, source)
            if source == plan_task:
                assert key in ("run", "dag_run", "spec", "streams"), (task_id, key)
    assert readers["release_workers"] == {"run": (plan_task, "run"), "dag_run": (plan_task, "dag_run")}
    if dag_id == "essp_nightly_retrain":
        assert readers["record_retrain"] == {"run": (plan_task, "run"), "registered": ("register_model", None)}
