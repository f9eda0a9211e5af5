"""The tree's rules: imports run one way (no cycles between modules or subpackages), the repository
stands on its own, and the reference documents every registered attention kind."""

from __future__ import annotations

import ast
import graphlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> longcpt modules it imports, anywhere in its body (function-level imports too).

    A package importing its own submodules (to register them) is not counted: the submodules
    import the package's names, so that edge is by design.
    """
    files = {module_name(f): f for f in (SRC / "longcpt").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, file in files.items():
        package = module if file.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                while name and name not in files:  # `from pkg import name`: the module or pkg itself
                    name = name.rpartition(".")[0]
                inside = name.startswith(module + ".") or module.startswith(name + ".")
                if name and name != module and not inside:
                    graph[module].add(name)
    return graph


def subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert len(graph) > 40 and "longcpt.model.attention" in graph["longcpt.model.llama"]  # the walk sees imports
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_no_import_cycle_between_subpackages():
    packages: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        packages.setdefault(subpackage(module), set()).update(
            subpackage(t) for t in targets if subpackage(t) != subpackage(module)
        )
    assert "longcpt.model" in packages["longcpt.export"]  # export -> model, the allowed direction
    try:
        graphlib.TopologicalSorter(packages).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle between subpackages: {' -> '.join(e.args[1])}")


def test_cycle_detection_can_fail():
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter({"a": {"b"}, "b": {"a"}}).prepare()


def test_repository_stands_on_its_own():
    """Code and docs never point to design notes that live outside the repository."""
    outside = re.compile(r"SPEC(\.md| section| \d)|DESIGN\.md|research/\w+\.md|\.\./shared")
    files = [p for d in ("src", "tests", "benchmarks", "data_prep", "recipes", "slurm", "docs", "experiments")
             for p in (REPO / d).rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".sh", ".sbatch")]
    files += [REPO / "README.md", REPO / "Makefile"]
    hits = [f"{p.relative_to(REPO)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if outside.search(line)]
    assert not hits, f"references to files outside the repository: {hits[:10]}"


def test_reference_documents_every_attention_kind_and_option():
    from longcpt.model.attention import KINDS

    table = (REPO / "docs" / "reference.md").read_text().split("## 7.")[1].split("\n## ")[0]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", table, re.M)}
    public = {name: spec for name, spec in KINDS.items() if not name.startswith("_")}
    assert set(rows) == set(public)
    for name, spec in public.items():
        assert ("yes" if spec.trainable else "no") in rows[name], name
        assert spec.positions in rows[name], name
        for option, declared in spec.options.items():
            assert f"`{option}` ({declared.default}" in rows[name], (name, option)


def test_links_between_documents_resolve():
    """Every relative link in README.md, CHANGELOG.md and docs/*.md names a file that exists."""
    link = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")
    pages = [REPO / "README.md", REPO / "CHANGELOG.md", *(REPO / "docs").glob("*.md")]
    broken = [f"{page.relative_to(REPO)} -> {target}" for page in pages for target, _ in link.findall(page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert len(pages) > 5 and not broken, broken


# torch keywords longcpt passes, and the torch release that added them (torch's release notes).
TORCH_KEYWORDS_SINCE = {
    ("scaled_dot_product_attention", "enable_gqa"): "2.5",
}


def test_declared_torch_floor_has_every_torch_keyword_we_pass():
    """A CUDA user may install any torch the floor allows; a keyword that torch lacks is a
    TypeError on every attention call (SDPA's `enable_gqa` arrived in 2.5)."""
    from packaging.version import Version

    floor = Version(re.search(r'^\s*"torch>=([0-9.]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1))
    used = set()
    for file in (SRC / "longcpt").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Call):
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                used |= {(func, kw.arg) for kw in node.keywords if (func, kw.arg) in TORCH_KEYWORDS_SINCE}
    assert ("scaled_dot_product_attention", "enable_gqa") in used  # the scan finds what it looks for
    for key in used:
        assert floor >= Version(TORCH_KEYWORDS_SINCE[key]), f"pyproject says torch>={floor}, {key} needs {TORCH_KEYWORDS_SINCE[key]}"


# A kind's name outside its own files, where it means something else or is a product default.
NOT_THE_KIND = {
    ("longcpt/batch.py", "anchor"): "the position rule of the same name (a kind declares which it uses)",
    ("longcpt/config.py", "anchor"): "the recipes' default attention.kind",
    ("longcpt/cli.py", "namm"): "the `longcpt namm` command",
    ("longcpt/namm/config.py", "full"): "CMA-ES's full covariance",
    ("longcpt/demo/pipeline.py", "full"): "the demo's full plan (`make demo`) and its quick one",
}
# Packages outside model/attention/ that belong to a kind: `longcpt namm train` evolves NAMM's policy.
ALSO_HOME = {"namm": ("longcpt/namm/",)}


def _kind_homes() -> dict[str, tuple[str, ...]]:
    """kind -> the source paths that own it: its module, or its folder when it is a package."""
    from longcpt.model.attention import KINDS

    homes = {}
    for name, spec in KINDS.items():
        top = SRC.joinpath(*spec.cls.__module__.split(".")[:4])  # longcpt/model/attention/<module or folder>
        home = f"{top.relative_to(SRC)}/" if top.is_dir() else f"{top.relative_to(SRC)}.py"
        homes[name] = (home, *ALSO_HOME.get(name, ()))
    return homes


def _named_kinds(file: Path, kinds: set[str]) -> list[tuple[int, str]]:
    """(line, kind) for every string literal equal to a kind's name (docstrings aside) and every import
    of a kind's module in `file`."""
    tree = ast.parse(file.read_text(), str(file))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in kinds and id(node) not in docstrings:
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom):
                names += [f"{node.module}.{a.name}" for a in node.names]
            modules = {name.split(".")[3] for name in names if name.split(".")[:3] == ["longcpt", "model", "attention"]
                       and len(name.split(".")) > 3}
            found += [(node.lineno, kind) for module in sorted(modules) for kind in _MODULE_KINDS.get(module, ())]
    return found


_MODULE_KINDS: dict[str, list[str]] = {}


def test_no_module_outside_a_kinds_folder_names_that_kind():
    """Plan, doctor, export, the optimizer, the callbacks, config, eval... ask the registry; only a
    kind's own files (and the other kinds under model/attention/, which may build on it) name it."""
    from longcpt.model.attention import KINDS

    homes = _kind_homes()
    _MODULE_KINDS.clear()
    for name, (home, *_) in homes.items():
        _MODULE_KINDS.setdefault(Path(home).with_suffix("").name, []).append(name)
    assert homes["infini"] == ("longcpt/model/attention/infini/",) and "longcpt/model/attention/full.py" in homes["full"]
    offenders = []
    for file in sorted((SRC / "longcpt").rglob("*.py")):
        rel = str(file.relative_to(SRC))
        if rel.startswith("longcpt/model/attention/"):
            continue
        for line, kind in _named_kinds(file, set(KINDS)):
            if (rel, kind) not in NOT_THE_KIND and not any(rel.startswith(h) for h in homes[kind]):
                offenders.append(f"{rel}:{line} names {kind!r}")
    assert not offenders, "kind-specific code outside the kind's folder (give the kind a hook): " + "; ".join(offenders)


def test_the_kind_name_scan_can_fail(tmp_path):
    _MODULE_KINDS.update({"infini": ["infini"]})
    file = tmp_path / "leak.py"
    file.write_text('"""infini in a docstring is prose."""\nfrom longcpt.model.attention.infini import core\n'
                    'def f(kind):\n    return kind == "infini"\n')
    assert _named_kinds(file, {"infini"}) == [(2, "infini"), (4, "infini")]


def test_docs_hold_prose_and_the_figures_they_show():
    """Scripts and result files of the studies live in experiments/; every figure in docs/ is shown."""
    docs = REPO / "docs"
    others = sorted(p.name for p in docs.iterdir() if p.suffix not in (".md", ".png"))
    assert not others, f"move these to experiments/: {others}"
    text = "".join(p.read_text() for p in [*docs.glob("*.md"), REPO / "README.md"])
    unshown = sorted(p.name for p in docs.glob("*.png") if p.name not in text)
    assert not unshown, f"figures no page shows: {unshown}"
