"""Build script for rlvr_fast.

Two things are not plain setuptools here:

* The Triton kernels live in the top-level ``kernels/`` folder but are installed as the
  subpackage ``rlvr_fast.kernels`` (a top-level ``kernels`` module would clash with an
  unrelated PyPI project). ``package_dir`` does the mapping, for normal and editable installs.
* ``csrc/`` holds an optional C++ extension (``rlvr_fast._C``). It is built only when torch
  (with its headers) is importable *in the build environment* and csrc has sources; otherwise
  the install goes on without it and the pure PyTorch reference paths run. Install with
  ``--no-build-isolation`` so the build sees the torch you already have instead of pip
  downloading a second (multi-GB CUDA) torch into an isolated build environment.
  Set ``RLVR_FAST_NO_EXT=1`` to skip the extension on purpose.
"""

import glob
import os

from setuptools import setup

PACKAGES = [
    "rlvr_fast",
    "rlvr_fast.model",
    "rlvr_fast.checkpoint",
    "rlvr_fast.kernels",
]
PACKAGE_DIR = {"rlvr_fast": "rlvr_fast", "rlvr_fast.kernels": "kernels"}
# Subpackages added later under rlvr_fast/ are found automatically.
for init in sorted(glob.glob("rlvr_fast/**/__init__.py", recursive=True)):
    name = os.path.dirname(init).replace(os.sep, ".")
    if name not in PACKAGES:
        PACKAGES.append(name)


def extension_build():
    """Return (ext_modules, cmdclass) for csrc/, or empty ones with a printed reason."""
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if os.environ.get("RLVR_FAST_NO_EXT") == "1":
        print("rlvr_fast: RLVR_FAST_NO_EXT=1, skipping the csrc extension")
        return [], {}
    if not sources:
        print("rlvr_fast: csrc/ has no C++ sources yet, building without the extension")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # no torch in the build environment
        print(f"rlvr_fast: torch not importable at build time ({exc}); building without the "
              "csrc extension (use pip install --no-build-isolation to build it)")
        return [], {}
    ext = CppExtension("rlvr_fast._C", sources, extra_compile_args=["-O3"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = extension_build()

setup(
    name="rlvr_fast",
    version="0.1.0",
    description="Small, fast GRPO (RL from verifiable rewards) trainer for Llama models",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy",
        "jinja2>=3.1",
        "gguf>=0.10",
    ],
    extras_require={
        "dev": ["pytest", "transformers>=4.45"],
        "flash": ["flash-attn>=2.6"],
        "bench": ["transformers>=4.45", "liger-kernel", "trl"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
