"""The structure, drawn from the code's own imports: layers only import downwards, and every fact about a family
is said once, in the registry."""

import ast
from pathlib import Path

from vlm_patterns.families import FAMILIES, SOURCE_LAYOUTS

ROOT = Path(__file__).resolve().parents[1]
# Bottom up; a folder may import from those before it (modeling and processing: only from their own folder).
LIBRARY = ("processing", "modeling", "conversion", "training")
APPLICATION = ("vlm_patterns",)
ON_TOP = ("spaces", "benchmarks")
APPLICATION_MODULES = {"cli", "families", "inference", "publishing", "spaces"}  # vlm_patterns.<these>


def sources(folder: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        if "checkpoints" not in path.parts:
            yield path, ast.parse(path.read_text(encoding="utf-8"))


def project_imports(path: Path, tree: ast.AST) -> set[str]:
    """The project folders and application modules a file imports: "modeling", "vlm_patterns.cli", ..."""
    found = set()
    package = path.parent.relative_to(ROOT).parts
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the file's folder (which is under vlm_patterns when installed)
                base = list(package[: len(package) - node.level + 1])
                names = [".".join(["vlm_patterns", *base, *([node.module] if node.module else [])])]
                names = [n.replace("vlm_patterns.vlm_patterns", "vlm_patterns") for n in names]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] in LIBRARY + ON_TOP:
                found.add(parts[0] + " (bare: not installed under that name)")
            elif parts[0] == "vlm_patterns" and len(parts) > 1:
                found.add(parts[1] if parts[1] in LIBRARY else f"vlm_patterns.{parts[1]}")
    return found


def test_layers_import_only_downwards():
    allowed = {
        "processing": {"processing"},
        "modeling": {"modeling"},
        "conversion": {"processing", "modeling", "conversion"},
        "training": {"processing", "modeling", "training"},
    }
    for folder, may_import in allowed.items():
        for path, tree in sources(folder):
            if path.name == "__init__.py" and folder in ("modeling", "processing"):
                continue
            imported = project_imports(path, tree)
            assert imported <= may_import, f"{path.relative_to(ROOT)} imports {sorted(imported - may_import)}"


def test_nothing_below_the_application_layer_imports_it():
    for folder in LIBRARY:
        for path, tree in sources(folder):
            imported = {name for name in project_imports(path, tree) if name.startswith("vlm_patterns.")}
            assert not imported, f"{path.relative_to(ROOT)} imports the application layer: {sorted(imported)}"


def test_the_application_layer_does_not_import_what_sits_on_it():
    for path, tree in sources("vlm_patterns"):
        imported = project_imports(path, tree)
        assert "vlm_patterns.spaces" not in imported or path.name == "publishing.py", path
        assert not any(name.startswith(ON_TOP) for name in imported), path


def family_name_tables(tree: ast.AST) -> list[int]:
    """Line numbers of dict literals, tuples, lists or sets holding three or more family names as strings."""
    names = set(FAMILIES) | set(SOURCE_LAYOUTS)
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            items = node.keys
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = node.elts
        else:
            continue
        strings = {item.value for item in items if isinstance(item, ast.Constant) and isinstance(item.value, str)}
        if len(strings & names) >= 3:
            lines.append(node.lineno)
    return lines


def test_no_table_keyed_by_family_names_outside_the_registry():
    for folder in LIBRARY + APPLICATION + ON_TOP:
        for path, tree in sources(folder):
            if path == ROOT / "vlm_patterns" / "families.py":
                continue
            assert not family_name_tables(tree), f"{path.relative_to(ROOT)}:{family_name_tables(tree)} keeps a table"


def test_the_registry_finds_every_family_and_layout():
    for family in FAMILIES.values():
        assert family.config_class.model_type == family.model_type
        assert family.generation_class.config_class is family.config_class
        assert family.processor_class.__name__ == f"{family.class_prefix}PatternProcessor"
        assert all(prefix.startswith("model.") for prefix in family.connector)
        for layout in family.layouts:
            for path in filter(None, (layout.converter, layout.exporter, layout.tiny, layout.verifier)):
                from vlm_patterns.families import resolve

                assert callable(resolve(path)), path
    assert FAMILIES["fuyu"].images_per_prompt == 1 and FAMILIES["fuyu"].vision_encoder == ()
    assert FAMILIES["flamingo"].layout("openflamingo").exporter is None


def test_import_registers_the_auto_classes_and_no_bare_package_exists():
    import subprocess
    import sys

    code = (
        "import vlm_patterns\n"
        "from transformers import AutoConfig, AutoModelForImageTextToText\n"
        "config = AutoConfig.for_model('fuyu_pattern')\n"
        "print(AutoModelForImageTextToText._model_mapping[type(config)].__module__)\n"
        "import importlib.util\n"
        "print([n for n in ('modeling', 'processing', 'conversion', 'training') if importlib.util.find_spec(n)])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    module, bare = result.stdout.strip().splitlines()
    assert module == "vlm_patterns.modeling.modeling_fuyu" and bare == "[]"
