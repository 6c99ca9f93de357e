"""The package's floors, held: what each may import, the worker's fence, no import cycles; and no
struct.pack_into on memory that other processes read.

Floors, from the bottom (see the README's Development section):

* base: ``errors``, ``sizes``, ``_sys`` (ctypes: the kernel), ``_cudart`` (ctypes: the CUDA runtime,
  loaded only to pin for a GPU), ``_fork``;
* ``shm`` (and the package's ``__init__``, the public API): the worker's
  floor, which ``import hugeshmd`` loads: the standard
  library and the base, nothing else (no ZeroMQ, msgpack or posix_ipc);
* ``wire``: the protocol and the ZeroMQ clients;
* ``daemon``: the primary;
* ``host``: the host tools;
* ``cli``, ``__main__``: the command line, on top.

A module may import its own floor and those below, at module level. The one
upward import is ``shm.secondary``'s lazy import of ``wire.client``, inside the
function that waits for a primary (a worker's slow path).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hugeshmd"
FLOORS = ["base", "shm", "wire", "daemon", "host", "top"]
BASE = {"errors", "sizes", "_sys", "_cudart", "_fork"}
NOT_AT_IMPORT = {"hugeshmd._cudart", "hugeshmd.shm.cuda", "hugeshmd.shm.interop"}  # loaded when asked for
THIRD_PARTY = {"zmq": "wire", "msgpack": "wire", "posix_ipc": "daemon"}  # the lowest floor that may use each
LAZY_UPWARD = {("shm.secondary", "wire.client")}


def floor_of(module: str) -> str:
    head = module.split(".")[0]
    if head in ("shm", "wire", "daemon", "host"):
        return head
    if head == "__init__":  # the public API: what a worker imports, so on the worker's floor
        return "shm"
    if head in ("cli", "__main__"):
        return "top"
    assert head in BASE, f"hugeshmd.{module} belongs to no floor: add it to one"
    return "base"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name below ``hugeshmd`` (``shm.table``)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module below hugeshmd, or a top-level third-party name, at module level?)."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    if module == "__init__":
        package = []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [".".join(base + [a.name]) for a in node.names]
                found += [(n, id(node) in top_level) for n in names]
            elif node.module:
                found.append((node.module, id(node) in top_level))
        elif isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
    return found


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """A package module for ``name`` (``shm.layout.Owner`` -> ``shm.layout``), else None."""
    name = name.removeprefix("hugeshmd.") if name.startswith("hugeshmd.") else name
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def test_every_module_is_on_a_floor() -> None:
    for module in modules():
        floor_of(module)


def test_no_module_imports_a_floor_above_its_own() -> None:
    known = modules()
    wrong = []
    for module, path in known.items():
        mine = FLOORS.index(floor_of(module))
        for name, at_top in imports(module, path):
            target = resolve(name, known) if name.split(".")[0] not in THIRD_PARTY else None
            if target is not None and target != module:
                above = FLOORS.index(floor_of(target)) > mine
                if above and (at_top or (module, target) not in LAZY_UPWARD):
                    wrong.append(f"hugeshmd.{module} imports hugeshmd.{target}")
            lowest = THIRD_PARTY.get(name.split(".")[0])
            if lowest is not None and FLOORS.index(lowest) > mine:
                wrong.append(f"hugeshmd.{module} imports {name}, which only {lowest} and above may")
    assert wrong == []


def test_module_level_imports_make_no_cycle() -> None:
    known = modules()
    graph = {m: {t for n, top in imports(m, p) if top and (t := resolve(n, known)) and t != m}
             for m, p in known.items()}
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(node):] + [node]))
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, trail + [node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


PACK_INTO_ALLOWED = {"initialize", "_initialize", "write_iovas"}  # memory no other process can read yet


def test_no_shared_memory_is_written_with_pack_into_outside_initialisers() -> None:
    """``struct.pack_into`` zeroes its target before it writes the fields: another process
    reading meanwhile sees zeros that were never the value, and a writer killed in between leaves
    them (a heap directory entry lost so; see hugeshmd.shm.table). Only code that fills memory no
    one can read yet (a zone before its commit) may use it."""
    found = []
    for module, path in modules().items():
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) and function.name not in PACK_INTO_ALLOWED:
                for node in ast.walk(function):
                    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                            and node.func.attr == "pack_into"):
                        found.append(f"hugeshmd.{module}.{function.name}, line {node.lineno}")
    assert found == []


@pytest.mark.process
def test_import_hugeshmd_loads_no_zmq_msgpack_posix_ipc_numpy_torch_arrow_cuda_or_logging() -> None:
    """The fence: a worker that only attaches and looks up pays for nothing else (logging alone
    costs a fresh worker 12 ms; torch, seconds). No CUDA binding, and no libcudart mapped."""
    code = ("import sys, hugeshmd\n"
            "print(' '.join(m for m in ('zmq', 'msgpack', 'posix_ipc', 'numpy', 'torch', 'pyarrow', 'logging', "
            "'typing') if m in sys.modules))\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('hugeshmd.'))))\n"
            "print(sum('libcudart' in line for line in open('/proc/self/maps')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.splitlines()
    assert out[0] == ""
    loaded = set(out[1].split())
    assert all(name.split(".")[1] in {"shm", *BASE} for name in loaded), out[1]
    assert loaded.isdisjoint(NOT_AT_IMPORT), out[1]
    assert out[2] == "0"
