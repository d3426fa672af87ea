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
