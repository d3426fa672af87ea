"""actalker_jax: ACTalker (audio-visual controlled talking-head video diffusion) in JAX/Flax NNX.

`kernels/` sits at the top level of the repository and is installed as `actalker_jax.kernels`
(package_dir mapping), both by `pip install -e .` and in a built wheel. Imported as a top-level `kernels` (a
process started in the repository root), it hands over to Hugging Face's package of that name (kernels/__init__.py).
"""
import os

from setuptools import find_packages, setup


def _kernel_packages():
  """Packages under kernels/, named as they are imported: actalker_jax.kernels[.sub]."""
  names = []
  for root, _, files in os.walk("kernels"):
    if "__init__.py" in files:
      names.append("actalker_jax." + root.replace(os.sep, "."))
  return sorted(names)


kernel_packages = _kernel_packages()

# Preprocessing, synthetic data, the TFDS source and evaluation figures (tests exercise them, so the test extra
# includes them).
DATA_EXTRAS = ["array-record", "tensorflow-datasets", "importlib_resources", "dlib-bin",
               "face-recognition-models", "opencv-python-headless", "scikit-image", "tqdm", "transformers",
               "matplotlib"]

setup(
    name="actalker_jax",
    version="0.1.0",
    description="ACTalker talking-head video diffusion (SVD UNet + Parallel-Control Mamba) in JAX/Flax NNX",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["actalker_jax", "actalker_jax.*"]) + kernel_packages,
    package_dir={
        "actalker_jax": "actalker_jax",
        **{name: name.replace("actalker_jax.", "", 1).replace(".", "/") for name in kernel_packages},
    },
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "optax>=0.2.5",  # optax.tree.norm
        "orbax-checkpoint",
        "grain",
        "ml-collections",
        "numpy",
        "safetensors",
        "scipy",  # synthetic speech (the demo's data)
        "av",  # video I/O (PyAV; there is no ffmpeg binary on the target machines)
        "tqdm",
        "tensorboardX",  # TensorBoard summaries (summaries.py)
        "pillow",  # GIF sample videos in TensorBoard
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "pyyaml", "torch==2.13.0", "diffusers", "transformers"] + DATA_EXTRAS,
        "gpu": ["jax[cuda12]"],
        "data": DATA_EXTRAS,
    },
)
