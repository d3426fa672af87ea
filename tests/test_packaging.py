"""kernels/ is importable as actalker_jax.kernels from the editable install and from a built wheel."""

import os
import subprocess
import sys
import zipfile

import actalker_jax.kernels
import actalker_jax.kernels.selective_scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_editable_install_maps_kernels():
    assert os.path.samefile(os.path.dirname(actalker_jax.kernels.__file__), os.path.join(ROOT, "kernels"))
    assert actalker_jax.kernels.selective_scan.__name__ == "actalker_jax.kernels.selective_scan"


def test_wheel_contains_and_imports_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), ROOT], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("actalker_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "actalker_jax/kernels/__init__.py" in names
    assert "actalker_jax/kernels/selective_scan/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    code = ("import actalker_jax, actalker_jax.kernels.selective_scan as s; "
            "print(actalker_jax.__file__); print(s.__file__)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}).stdout.split()
    assert all(path.startswith(str(site)) for path in out), out


def test_only_entry_points_import_the_trainer():
    """train.py defines absl flags; a module that imports it (even inside a function) and runs under
    `python -m actalker_jax.train` defines them a second time (DuplicateFlagError: it once broke the demo's sample
    previews). Only the benchmark entry points, which reuse its --config flag, may import it."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "actalker_jax"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative == "train.py" or relative.startswith("bench/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module == "actalker_jax.train" or (
                    node.module == "actalker_jax" and any(a.name == "train" for a in node.names))):
                offenders.append(f"{relative}:{node.lineno}")
            if isinstance(node, ast.Import) and any(a.name == "actalker_jax.train" for a in node.names):
                offenders.append(f"{relative}:{node.lineno}")
    assert not offenders, offenders
