"""The workflow shape a host advertises, and how the run page picks one and lays it out (no server)."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from actors.apps.run_graph import Dag, DagTask, _lay_out, pick_shape
from actors.engine.dag import MAX_SHAPE_BYTES, workflow_shape


@dataclass(eq=False)
class Step:
    workflow_key: str
    parents: list[Step] = field(default_factory=list)
    runs_durably: bool = False

    @property
    def name(self) -> str:
        return f"Big:{self.workflow_key}"


def chain(n: int, key_len: int = 12) -> list[Step]:
    """``n`` tasks, each after the two before it."""
    steps: list[Step] = []
    for i in range(n):
        steps.append(Step(f"t{i:0{key_len - 1}d}", steps[-2:]))
    return steps


def test_a_workflow_of_200_tasks_is_advertised_whole_and_small() -> None:
    shape = workflow_shape("Big", chain(200))
    assert len(shape["keys"]) == 200 and shape["parents"][5] == [3, 4]
    assert len(orjson.dumps(shape)) < 8 * 1024  # a few KiB, sent every 20 s


def test_a_workflow_too_large_is_advertised_by_its_size_alone() -> None:
    shape = workflow_shape("Big", chain(400, key_len=190))
    assert shape == {"workflow": "Big", "tasks": 400, "too_big": True}
    assert len(orjson.dumps(workflow_shape("Big", chain(200, key_len=190)))) <= MAX_SHAPE_BYTES


def test_the_page_takes_the_advertisement_that_agrees_with_what_the_run_started() -> None:
    old = {"workflow": "W", "host": "h1", "keys": ["a", "b"], "parents": [[], [0]]}
    new = {"workflow": "W", "host": "h2", "keys": ["a", "x", "b"], "parents": [[], [0], [0]]}
    assert pick_shape("W", {0: "W:a", 2: "W:b"}, [old, new]) == ("advertised", "h2", (new["keys"], new["parents"]))
    assert pick_shape("W", {1: "W:b"}, [old, new])[:2] == ("advertised", "h1")
    assert pick_shape("W", {}, [old])[:2] == ("advertised", "h1")  # nothing started yet: any agrees
    assert pick_shape("W", {1: "W:zz"}, [old, new]) == ("mismatch", None, None)
    assert pick_shape("W", {0: "W:a"}, []) == ("unknown", None, None)
    assert pick_shape("W", {0: "W:a"}, [{"workflow": "W", "host": "h", "tasks": 900, "too_big": True}])[0] == "too_big"
    for bad in ({"keys": ["a"], "parents": [[0]]},  # a parent after (or at) its child: not a DAG
                {"keys": ["a", "b"], "parents": [[]]}, {"keys": "ab", "parents": []},
                {"keys": ["a"], "parents": [["x"]]}):
        assert pick_shape("W", {}, [{"workflow": "W", "host": "h", **bad}])[0] == "mismatch", bad


def test_the_drawing_puts_each_task_one_column_right_of_its_deepest_parent() -> None:
    tasks = [DagTask(k, f"W:{k}", ps, "pending") for k, ps in
             [("a", []), ("b", ["a"]), ("c", ["a"]), ("d", ["b", "c"]), ("e", ["a", "d"]), ("f", [])]]
    _lay_out(tasks)
    assert [(t.key, t.depth, t.row) for t in tasks] == [
        ("a", 0, 0), ("b", 1, 0), ("c", 1, 1), ("d", 2, 0), ("e", 3, 0), ("f", 0, 1)]
    dag = Dag("W", "advertised", tasks)
    assert len(dag.edges) == 6 and dag.width > dag.height > 0
    x1, y1, x2, y2 = dag.edges[0]  # a -> b: from a's right side to b's left side
    assert (x1, x2) == (tasks[0].x + Dag.node_w, tasks[1].x) and y1 == y2


def test_a_dag_of_200_tasks_renders_every_task_once() -> None:
    from types import SimpleNamespace

    from actors.apps.web_ui import _env

    shape = workflow_shape("Big", chain(200))
    tasks = [DagTask(k, f"Big:{k}", [shape["keys"][p] for p in ps], "pending")
             for k, ps in zip(shape["keys"], shape["parents"], strict=True)]
    _lay_out(tasks)
    html = _env.get_template("_dag.html").render(run=SimpleNamespace(dag=Dag("Big", "advertised", tasks)))
    assert html.count('<tr class="dag-task"') == 200 and html.count('<g class="node pending"') == 200
    assert html.count('<path class="edge"') == 199 + 198
    assert len(html) < 200 * 1024
