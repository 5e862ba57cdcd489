"""Build script for rlvr_fast.

Two things are not plain setuptools here:

* The Triton kernels live in the top-level ``kernels/`` folder but are installed as the
  subpackage ``rlvr_fast.kernels`` (a top-level ``kernels`` module would clash with an
  unrelated PyPI project). ``package_dir`` does the mapping, for normal and editable installs.
* ``csrc/`` holds an optional C++ extension (``rlvr_fast._C``). It is built only when torch
  (with its headers) is importable *in the build environment* and csrc has sources; otherwise
  the install goes on without it and the pure PyTorch reference paths run; a compile that fails
  (no compiler, a compiler that rejects a flag) falls back to portable flags, then to no extension,
  never to a failed install. Install with
  ``--no-build-isolation`` so the build sees the torch you already have instead of pip
  downloading a second (multi-GB CUDA) torch into an isolated build environment.
  Set ``RLVR_FAST_NO_EXT=1`` to skip the extension on purpose.
"""

import glob
import os
import time

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


# Compiler flags, tried in order; the first set that builds wins (see csrc/README.md).
#   * -fopenmp: at::parallel_for is an OpenMP loop compiled into the extension; at run time it
#     uses the libgomp that torch already loaded (same SONAME), so the same thread pool.
#   * -ffp-contract=fast: fused multiply-adds in the kernels (ISO C++ mode turns them off).
#   * -g0: no debug info (Python's own CFLAGS add -g): a third less compile time, a 5x smaller .so.
#   * no -march: csrc/cpu/simd.h clones the hot functions for AVX-512 / AVX2 / baseline x86-64
#     and picks one at load time, so the .so runs on any x86-64 and is fast on the one it is on.
# The fallback drops OpenMP (kernels run single-threaded) and the SIMD clones / vector extensions.
EXT_FLAG_SETS = [
    ("OpenMP, per-CPU SIMD clones", ["-O3", "-g0", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi"], ["-fopenmp"]),
    ("portable fallback: no OpenMP, no SIMD clones",
     ["-O3", "-g0", "-DRLVR_FAST_NO_MULTIVERSION", "-DRLVR_FAST_NO_VECTOR_EXT"], []),
]


def remove_stale_extension():
    """Delete a previously built in-place rlvr_fast/_C*.so (editable installs load the source tree), so an
    install without the extension really runs without it."""
    for path in glob.glob(os.path.join("rlvr_fast", "_C*.so")) + glob.glob(os.path.join("rlvr_fast", "_C*.pyd")):
        os.remove(path)
        print(f"rlvr_fast: removed the stale {path}")


def optional_build_ext(base):
    """`base` (torch's BuildExtension) made optional: a failed compile never fails the install."""

    class OptionalBuildExt(base):
        failed: set = set()

        def run(self):
            try:
                super().run()
            except Exception as exc:  # e.g. torch's compiler/ABI checks before any compile
                for ext in self.extensions:
                    self.failed.add(ext.name)
                remove_stale_extension()
                self._warn(exc)

        def build_extension(self, ext):
            start = time.perf_counter()
            ours = {flag for _, cflags, lflags in EXT_FLAG_SETS for flag in cflags + lflags}
            # torch's BuildExtension has added its own flags (ABI, extension name): keep those.
            other_c = [f for f in ext.extra_compile_args if f not in ours]
            other_l = [f for f in ext.extra_link_args if f not in ours]
            for attempt, (what, cflags, lflags) in enumerate(EXT_FLAG_SETS):
                ext.extra_compile_args = cflags + other_c
                ext.extra_link_args = lflags + other_l
                self.force = self.force or attempt > 0  # nothing from a failed attempt is reused
                try:
                    super().build_extension(ext)
                except Exception as exc:  # CompileError, LinkError, missing compiler (OSError), ...
                    print(f"rlvr_fast: building {ext.name} with flags for '{what}' failed: {exc}")
                    continue
                print(f"rlvr_fast: built the csrc extension {ext.name} ({what}) in "
                      f"{time.perf_counter() - start:.1f} s")
                return
            self.failed.add(ext.name)
            remove_stale_extension()
            self._warn("every compiler flag set failed (see above)")

        def _warn(self, why):
            print(f"WARNING rlvr_fast: could not build the csrc extension ({why}); installing without it, "
                  "the PyTorch reference ops will run. A C++ compiler and torch's headers are needed: "
                  "pip install --no-build-isolation -e .")

        # Leave a failed extension out of what setuptools expects to find and install.
        def get_outputs(self):
            keep = [e for e in self.extensions if e.name not in self.failed]
            saved, self.extensions = self.extensions, keep
            try:
                return super().get_outputs()
            finally:
                self.extensions = saved

        def get_output_mapping(self):
            keep = [e for e in self.extensions if e.name not in self.failed]
            saved, self.extensions = self.extensions, keep
            try:
                return super().get_output_mapping()
            finally:
                self.extensions = saved

    return OptionalBuildExt


def extension_build():
    """Return (ext_modules, cmdclass) for csrc/, or empty ones with a printed reason."""
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if os.environ.get("RLVR_FAST_NO_EXT") == "1":
        print("rlvr_fast: RLVR_FAST_NO_EXT=1, skipping the csrc extension")
        remove_stale_extension()
        return [], {}
    if not sources:
        print("rlvr_fast: csrc/ has no C++ sources yet, building without the extension")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, include_paths
    except Exception as exc:  # no torch in the build environment
        print(f"rlvr_fast: torch not importable at build time ({exc}); building without the "
              "csrc extension (use pip install --no-build-isolation to build it)")
        remove_stale_extension()
        return [], {}
    if not os.path.exists(os.path.join(include_paths()[0], "torch", "library.h")):
        print("rlvr_fast: this torch install has no C++ headers; building without the csrc extension")
        remove_stale_extension()
        return [], {}
    ext = CppExtension("rlvr_fast._C", sources, extra_compile_args=list(EXT_FLAG_SETS[0][1]),
                       extra_link_args=list(EXT_FLAG_SETS[0][2]))
    try:
        from torch.utils.cpp_extension import is_ninja_available
        ninja = is_ninja_available()
    except ImportError:
        ninja = False
    build = BuildExtension.with_options(no_python_abi_suffix=True, use_ninja=ninja)
    return [ext], {"build_ext": optional_build_ext(build)}


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
        "torch>=2.11",  # oldest pair tested: kernel and model tests (bench/compat_check.py)
        "triton>=3.6; platform_system == 'Linux'",  # and compiled for sm_80/sm_90/sm_100 with it
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy",
        "jinja2>=3.1",
        "gguf>=0.10",
        "matplotlib>=3.5",  # plot.png of every run
    ],
    extras_require={
        "dev": ["pytest", "transformers>=4.45", "peft>=0.10", "tensorboard", "trl>=1.16"],  # trl: test oracle
        "flash": ["flash-attn>=2.6"],
        "tensorboard": ["tensorboard"],  # --report-to tensorboard
        "wandb": ["wandb"],  # --report-to wandb
        "bench": ["transformers>=4.45", "liger-kernel", "trl>=1.16"],  # also rlvr_fast.integrations.trl
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
