"""The repo's shape: no import circle among its modules (imports inside functions count: a lazy import hides a
circle, it does not break one), the leaf modules import nothing of the repo, and no file points a reader outside
the repo. Read with ast and plain text; nothing is imported or run."""

import ast
import glob
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEAVES = ("files", "sm3", "quantize")  # below everything that uses them
OUTSIDE = ("../" + "shared", "shared" + "/notes")  # the team's notes beside the repo, which a clone does not have


def modules() -> dict:
    """module name -> its file: the top level and tools/ (tests apart; tools/ imports as its own names)."""
    found = {}
    for pattern in ("*.py", "tools/*.py", "tools/measure/*.py"):
        for path in glob.glob(os.path.join(ROOT, pattern)):
            found.setdefault(os.path.basename(path)[:-3], path)
    return found


def import_graph() -> dict:
    """module -> the repo's modules it imports, anywhere in the file."""
    mods, graph = modules(), {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                deps.add(node.module.split(".")[0])
        graph[name] = sorted(d for d in deps if d in mods and d != name)
    return graph


def cycles(graph: dict) -> list:
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(m, path):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                found.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"llama", "spiel", "sm3", "train", "finetune"} <= graph.keys()
    assert cycles(graph) == [], " ; ".join(" -> ".join(c) for c in cycles(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]
    assert cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


def test_the_leaves_and_the_model_sit_low():
    graph = import_graph()
    for leaf in LEAVES:
        assert graph[leaf] == [], f"{leaf}.py imports {graph[leaf]}"
    assert graph["llama"] in (["files"], ["files", "quantize"]), graph["llama"]  # the model knows no method
    assert graph["tokenizer"] == ["files"], graph["tokenizer"]  # nor its tokenizer
    for method in ("spiel", "lora"):
        assert set(graph[method]) <= {"llama", "files", "system"}, graph[method]


def test_no_file_points_outside_the_repo():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:  # (not a git checkout: every text file)
        tracked = [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "**", "*"), recursive=True)]
    offenders = []
    for rel in tracked:
        path = os.path.join(ROOT, rel)
        if not os.path.isfile(path) or rel.endswith((".png", ".safetensors", ".model", ".json", ".jsonl")):
            continue
        try:
            text = open(path, encoding="utf-8").read()
        except UnicodeDecodeError:
            continue
        if any(s in text for s in OUTSIDE):
            offenders.append(rel)
    assert offenders == [], offenders
