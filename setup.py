"""Builds vae_ext._C against the torch already installed in this environment.

CPU kernels always; CUDA kernels too when that torch has CUDA and a toolkit is found (CUDA_HOME).
Works under pip's build isolation (which hides the environment's torch: we add the environment's
site-packages back, and the base interpreter's in a venv made with --system-site-packages) and with
``pip install --no-build-isolation .`` (which needs setuptools >= 70.1 or the ``wheel`` package).
"""
import concurrent.futures
import glob
import os
import platform
import sys
import sysconfig

NO_TORCH = (
    "vae_ext: PyTorch is not installed in this environment, and the kernels are built against it. "
    "Install it first, pinned to a CPU build unless you want CUDA (left unpinned, pip may pull "
    "gigabytes of CUDA wheels): for example `pip install torch==2.13.0` where that is a CPU "
    "wheel, or the CPU wheel from PyTorch's own package index (pytorch.org/get-started). Then "
    "`pip install .` again. In a venv made with --system-site-packages whose torch lives in the parent "
    "environment: `pip install --no-build-isolation .`."
)


def _site_dirs():
    """Where this environment's packages live: its own site-packages, then (a venv made with
    --system-site-packages) the base interpreter's, which the venv also sees."""
    dirs = [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
    cfg = os.path.join(sys.prefix, "pyvenv.cfg")
    lines = open(cfg).read().splitlines() if sys.prefix != sys.base_prefix and os.path.isfile(cfg) else []
    if any(line.replace(" ", "").lower() == "include-system-site-packages=true" for line in lines):
        base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
        dirs += [sysconfig.get_paths(vars=base)[key] for key in ("purelib", "platlib")]
    return list(dict.fromkeys(dirs))


def _import_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        # pip's isolated build environment hides the environment's packages: add them back.
        for path in _site_dirs():
            if path not in sys.path:
                sys.path.append(path)
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.exit(NO_TORCH)
    import torch

    return torch


def _check_bdist_wheel():
    """pip builds a wheel with setuptools' bdist_wheel command: part of setuptools from 70.1, of
    the `wheel` package before. Without build isolation, an older setuptools without `wheel` (a
    venv's bundled setuptools 65.5 is one) fails with "invalid command 'bdist_wheel'"."""
    if not {"bdist_wheel", "dist_info", "editable_wheel"} & set(sys.argv[1:]):
        return
    for module in ("setuptools.command.bdist_wheel", "wheel.bdist_wheel"):
        try:
            __import__(module)
            return
        except ImportError:
            pass
    import setuptools

    sys.exit(
        f"vae_ext: this environment's setuptools ({setuptools.__version__}) has no bdist_wheel command, which "
        "pip needs to build without build isolation: `pip install wheel` (or setuptools >= 70.1), then build again."
    )


_check_bdist_wheel()
torch = _import_torch()
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
rel = lambda p: os.path.relpath(p, here)  # noqa: E731

cpp_sources = [rel(p) for p in sorted(glob.glob(os.path.join(here, "csrc", "*.cpp")))]
# The CPU ops, and the kernels built for every CPU (the other capabilities: CAPABILITY_SOURCES).
cpp_sources += [os.path.join("csrc", "cpu", "ops_cpu.cpp"), os.path.join("csrc", "cpu", "ops_dmol.cpp"),
                os.path.join("csrc", "cpu", "kernels_default.cpp")]
cpp_sources += [os.path.join("csrc", "cpu", "latent_ops_cpu.cpp")]
# Every header under csrc/: setuptools builds the extension only when a file of its sources or
# `depends` is newer than the built library, so without them a change to a header alone
# (csrc/cpu/elbo_kernel.h) left the library as it was, neither recompiled nor relinked. Which
# objects then recompile is ninja's choice, from the compiler's dependency files.
headers = [rel(p) for pattern in ("*.h", "*.cuh")
           for p in sorted(glob.glob(os.path.join(here, "csrc", "**", pattern), recursive=True))]

# The CPU kernels are compiled once more per x86 capability, each file with its own ISA flags, and
# chosen at run time from the CPU's features (cpu::kernels() in csrc/cpu/ops_cpu.cpp). Never
# -march=native: that builds a library that crashes on an older CPU.
CAPABILITY_SOURCES = {}
if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386"):
    CAPABILITY_SOURCES = {
        os.path.join("csrc", "cpu", "kernels_avx2.cpp"): ["-mavx2", "-mfma", "-mf16c"],
        os.path.join("csrc", "cpu", "kernels_avx512.cpp"): [
            "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    }


class BuildExt(BuildExtension):
    """BuildExtension, plus the per-capability CPU objects, each compiled with its own flags.

    They are linked after the default-target objects, so where several objects emit the same
    inline function the linker keeps the copy that runs on every CPU.
    """

    def build_extension(self, ext):
        cxx = list(ext.extra_compile_args["cxx"]) if isinstance(ext.extra_compile_args, dict) else []

        def compile_one(item):
            src, flags = item
            out = os.path.join(self.build_temp, "cap_" + os.path.basename(src)[:-4])
            os.makedirs(os.path.join(out, os.path.dirname(src)), exist_ok=True)  # ninja won't
            return self.compiler.compile(
                [src], output_dir=out, macros=ext.define_macros, include_dirs=ext.include_dirs,
                debug=self.debug, extra_postargs={"cxx": cxx + flags, "nvcc": []}, depends=ext.depends)

        with concurrent.futures.ThreadPoolExecutor(max_workers=len(CAPABILITY_SOURCES) or 1) as pool:
            for objs in pool.map(compile_one, CAPABILITY_SOURCES.items()):
                ext.extra_objects = list(ext.extra_objects or []) + list(objs)
        super().build_extension(ext)


cxx_flags = ["-O3", "-std=c++17", "-fno-math-errno"]
link_flags = []
# at::parallel_for is inline: with an OpenMP build of torch it only runs in parallel when this
# extension is compiled with OpenMP too. The runtime (libgomp.so.1) is the one torch already loaded.
if torch._C.has_openmp:
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
# VAE_EXT_SANITIZE=1: an AddressSanitizer + UndefinedBehaviorSanitizer build of the C++ for
# .ci/sanitize (never for an install: it only loads with the ASan runtime preloaded). -O1 -g keeps
# the reports' stacks readable; -fno-sanitize-recover makes a UB report abort the process, as an
# ASan report does, so no report can pass unnoticed. -fno-wrapv undoes the -fwrapv of Python's
# own CFLAGS (sysconfig), under which a signed overflow is defined and UBSan does not report it.
if os.environ.get("VAE_EXT_SANITIZE") == "1":
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    cxx_flags += san + ["-O1", "-g", "-fno-wrapv"]
    link_flags += san
    print("vae_ext: building with -fsanitize=address,undefined (VAE_EXT_SANITIZE=1)")
use_cuda = bool(torch.version.cuda) and CUDA_HOME is not None and os.environ.get("VAE_EXT_NO_CUDA") != "1"

if use_cuda:
    cuda_sources = [rel(p) for p in sorted(glob.glob(os.path.join(here, "csrc", "cuda", "*.cu")))]
    cuda_sources += [rel(p) for p in sorted(glob.glob(os.path.join(here, "csrc", "cuda", "*.cpp")))]
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    ext = CUDAExtension(
        "vae_ext._C",
        cpp_sources + cuda_sources,
        define_macros=[("VAE_EXT_WITH_CUDA", None)],
        depends=headers,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-std=c++17", "-lineinfo"],
        },
        extra_link_args=link_flags,
    )
    print(f"vae_ext: building CPU and CUDA kernels (CUDA {torch.version.cuda}, "
          f"TORCH_CUDA_ARCH_LIST={arch or 'auto'})")
else:
    ext = CppExtension("vae_ext._C", cpp_sources, depends=headers, extra_compile_args={"cxx": cxx_flags},
                       extra_link_args=link_flags)
    why = "this torch has no CUDA" if not torch.version.cuda else "no CUDA toolkit found (CUDA_HOME)"
    print(f"vae_ext: building CPU kernels only ({why})")

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
