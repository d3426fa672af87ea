"""Custom kernels of actalker_jax, importable as `actalker_jax.kernels`.

This directory sits at the repository's top level (ARCHITECTURE.md), so a Python process started in the
repository root (`python -m ...`, a setuptools build) also finds it as a top-level package `kernels`, the name of
Hugging Face's kernel hub package (a transformers >= 5.25 dependency, imported by transformers and by setuptools'
egg_info writers). Imported under that name, this module hands the import over to the installed package of that
name, or fails as if there were none.
"""
import importlib.machinery
import importlib.util
import os
import sys

if __name__ == "kernels":
    _repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _repo_root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ is actalker_jax.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
