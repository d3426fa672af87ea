"""kernels/ is importable as actalker_jax.kernels from the editable install and from a built wheel, and does not
shadow another top-level `kernels` package for a process started in the repository root."""

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


def _import_kernels_in_repo_root(code, pythonpath):
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": pythonpath})


def test_top_level_kernels_name_hands_over_to_the_installed_package(tmp_path):
    """Hugging Face's `kernels` (a transformers dependency) imported from the repository root, where kernels/ is
    first on sys.path: the import gets that package and its submodules (transformers and setuptools' egg_info
    writers import `kernels._internals` this way)."""
    other = tmp_path / "kernels"
    (other / "_internals").mkdir(parents=True)
    (other / "__init__.py").write_text("WHO = 'installed'\n")
    (other / "_internals" / "__init__.py").write_text("")
    done = _import_kernels_in_repo_root(
        "import kernels, kernels._internals; print(kernels.WHO, kernels.__file__, kernels._internals.__file__)",
        str(tmp_path))
    assert done.returncode == 0, done.stderr
    who, *files = done.stdout.split()
    assert who == "installed" and all(f.startswith(str(other)) for f in files), done.stdout


def test_top_level_kernels_name_without_an_installed_package_is_not_found(tmp_path):
    done = _import_kernels_in_repo_root("import kernels", str(tmp_path))
    assert done.returncode == 1
    assert "ModuleNotFoundError: No module named 'kernels'" in done.stderr, done.stderr


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
