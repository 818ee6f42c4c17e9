"""The package's structure rules, read from the code's own imports (nothing is imported or run):

1. the layer core (config, router, dispatch, experts, ops, layer, specs, initialization, parallel)
   never imports the tools built on it (training, checkpoint, planning, data, megatron_lm), not even
   inside a function;
2. no import circle among the package's modules (imports anywhere in a module, functions included);
3. importing the package installs no warning or logging filter and patches nothing.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_switch"
CORE = ("config", "router", "dispatch", "experts", "ops", "layer", "specs", "initialization", "parallel")
TOOLS = ("training", "checkpoint", "planning", "data", "megatron_lm")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """megatron_switch modules `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {name for name in found if name == "megatron_switch" or name.startswith("megatron_switch.")}


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_layer_core_never_imports_the_tools():
    known = modules()
    broken = []
    for name, path in known.items():
        if name.split(".")[1:2] and name.split(".")[1] in CORE:
            for target in imports(path, top_level_only=False):
                if target.split(".")[1:2] and target.split(".")[1] in TOOLS:
                    broken.append(f"{name} imports {target}")
    assert not broken, "the layer core imports the tools built on it:\n" + "\n".join(broken)
    assert {n.split(".")[1] for n in known if n.count(".")} >= set(CORE) | set(TOOLS)  # the rule sees them all


def test_no_import_circles():
    known = modules()
    graph = {name: {t for t in imports(path, top_level_only=False) if t in known and t != name}
             for name, path in known.items()}
    # a package's __init__ re-exporting its own submodules is not a circle through them
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    circles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_importing_the_package_installs_no_filter():
    code = ("import logging, warnings; before = (list(warnings.filters), "
            "[list(logging.getLogger(n).filters) for n in logging.root.manager.loggerDict]); "
            "import megatron_switch, megatron_switch.layer, megatron_switch.specs, megatron_switch.spec; "
            "after = (list(warnings.filters), "
            "[list(logging.getLogger(n).filters) for n in logging.root.manager.loggerDict]); "
            "new = [f for f in after[0] if f not in before[0]]; "
            "assert not [f for f in new if any(w in str(f) for w in ('Switch', 'Apex', 'Transformer Engine'))], new; "
            "assert not any(after[1]), after[1]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_megatron_core_imports_without_compiling_and_compiles_on_first_call():
    """The entry points import megatron-core with its `jit_fuser` deferring torch.compile to the first call
    (TorchDynamo and Inductor are not imported for functions a run never calls); torch.compile itself is
    left as it was, and a deferred function compiles and computes when called."""
    code = """
import sys
import torch
real = torch.compile
from megatron_switch.compat.startup import compile_on_first_call, import_megatron_core
import_megatron_core()
import megatron.core.jit
from megatron.core.fusions.fused_bias_geglu import bias_geglu
import megatron_switch.training.trainer
assert torch.compile is real
assert megatron.core.jit.jit_fuser is compile_on_first_call
imported = [m for m in ("torch._dynamo", "torch._inductor.compile_fx") if m in sys.modules]
assert not imported, imported
double = compile_on_first_call(lambda x: 2 * x + 1, backend="eager")
assert "torch._dynamo" not in sys.modules
x = torch.arange(4.0)
assert torch.equal(double(x), 2 * x + 1) and torch.equal(double(x), 2 * x + 1)
assert "torch._dynamo" in sys.modules  # compiled when first called
"""
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_checkpoint_results_queue_is_forked_once_and_carries_results():
    """dist_checkpointing's write-results queue starts as a fork of the rank (a spawned one would import
    torch again at the first save), once, and is the queue dist_checkpointing's writer then uses."""
    code = """
import multiprocessing
from megatron_switch.compat.startup import import_megatron_core
import_megatron_core()
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron_switch.compat.megatron_core import start_checkpoint_write_results_queue
start_checkpoint_write_results_queue()
start_checkpoint_write_results_queue()
children = multiprocessing.active_children()
assert len(children) == 1 and type(children[0]._popen).__module__ == "multiprocessing.popen_fork", children
writers_queue = (getattr(filesystem_async, "get_write_results_queue", None)
                 or filesystem_async._get_write_results_queue)()
writers_queue.put({"rank": 0, "items": [1, 2]})
assert writers_queue.get() == {"rank": 0, "items": [1, 2]}
assert multiprocessing.active_children() == children
"""
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
