"""Build script for the compiled core ``fastrlhf._C``.

The C++ CPU kernels are always built. The CUDA kernels are added when torch has CUDA and nvcc is
present (or ``FASTRLHF_FORCE_CUDA=1``), unless ``FASTRLHF_SKIP_CUDA=1``.

Environment switches:
    FASTRLHF_FORCE_CUDA=1      build the CUDA kernels even when no GPU is visible (needs a CUDA torch)
    FASTRLHF_SKIP_CUDA=1       never build the CUDA kernels
    FASTRLHF_CUDA_ARCHS="80;90"  SM architectures for nvcc (default 80;90)

The build imports torch, so install torch first and build without isolation:
    pip install torch && pip install --no-build-isolation .
"""

import glob
import os
import platform
import shutil

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - only hit by a misconfigured build
    raise RuntimeError(
        "fastrlhf's build needs torch installed first, and pip must not isolate the build:\n"
        "    pip install torch && pip install --no-build-isolation ."
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")

# Per-capability kernel objects: csrc/cpu/arch/<cap>.cpp includes every CPU kernel once more,
# compiled for that instruction set; csrc/cpu/dispatch picks one at run time. Flags mirror the
# ones torch uses for its own AVX2 / AVX512 kernels so at::vec::Vectorized takes the same paths.
ARCH_FLAGS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c", "-mbmi2"],
    "avx512": [
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mf16c",
    ],
}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    if _env_flag("FASTRLHF_SKIP_CUDA"):
        return False
    has_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    if _env_flag("FASTRLHF_FORCE_CUDA"):
        if torch.version.cuda is None:
            raise RuntimeError("FASTRLHF_FORCE_CUDA=1 but the installed torch has no CUDA support")
        return True
    return torch.version.cuda is not None and has_nvcc


def _cuda_arch_flags() -> list[str]:
    archs = os.environ.get("FASTRLHF_CUDA_ARCHS", "80;90")
    flags = []
    for arch in filter(None, archs.replace(",", ";").split(";")):
        arch = arch.strip().replace(".", "")
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _arch_of(source: str) -> str | None:
    name = os.path.splitext(os.path.basename(source))[0]
    if os.path.basename(os.path.dirname(source)) == "arch" and name in ARCH_FLAGS:
        return name
    return None


def _sources(with_cuda: bool) -> list[str]:
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/dispatch*.cpp"))
    archs = ["default", "avx2", "avx512"] if IS_X86 else ["default"]
    sources += [f"csrc/cpu/arch/{arch}.cpp" for arch in archs]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    return sources


class FastrlhfBuildExt(BuildExtension):
    """torch's BuildExtension plus per-source flags for the per-capability CPU kernel objects."""

    def build_extension(self, ext):
        if not getattr(self.compiler, "_fastrlhf_wrapped", False):
            compile_one = self.compiler._compile

            def compile_with_arch(obj, src, ext_name, cc_args, extra_postargs, pp_opts):
                arch = _arch_of(src)
                if arch is not None and isinstance(extra_postargs, dict):
                    extra_postargs = dict(extra_postargs)
                    extra_postargs["cxx"] = list(extra_postargs.get("cxx", [])) + ARCH_FLAGS[arch]
                elif arch is not None:
                    extra_postargs = list(extra_postargs) + ARCH_FLAGS[arch]
                return compile_one(obj, src, ext_name, cc_args, extra_postargs, pp_opts)

            self.compiler._compile = compile_with_arch
            _compile_in_parallel(self.compiler, _build_jobs())
            self.compiler._fastrlhf_wrapped = True
        super().build_extension(ext)


def _build_jobs() -> int:
    """Compiler processes at once: MAX_JOBS (torch's own variable for this), else one per CPU."""
    text = os.environ.get("MAX_JOBS", "").strip()
    if not text:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"MAX_JOBS must be a positive integer, got {text!r}")
    return int(text)


def _compile_in_parallel(compiler, jobs: int) -> None:
    """Run the compiler commands of one extension ``jobs`` at a time.

    distutils compiles an extension's sources one after another, and ninja (which would run them in
    parallel) is off here. So the serial pass only records each command (torch's wrapper picks nvcc or
    the C++ compiler per source, the wrapper above adds the per-capability flags, and objects that are
    up to date are skipped as before); the recorded commands then run in a thread pool.
    """
    from concurrent.futures import ThreadPoolExecutor

    from setuptools.errors import CompileError

    serial_compile = compiler.compile
    # setuptools >= 80 runs each command through Compiler.call, older ones through Compiler.spawn.
    runners = {name: getattr(compiler, name) for name in ("call", "spawn") if hasattr(compiler, name)}

    def compile_all(*args, **kwargs):
        commands = []  # (runner, argv, keyword arguments), in the serial order
        for name, run in runners.items():
            setattr(compiler, name, lambda cmd, _run=run, **kw: commands.append((_run, cmd, kw)))
        try:
            objects = serial_compile(*args, **kwargs)
        finally:
            for name, run in runners.items():
                setattr(compiler, name, run)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(run, cmd, **kw) for run, cmd, kw in commands]
        failures = [f.exception() for f in futures if f.exception() is not None]
        if failures:
            failed = f"{len(failures)} of {len(commands)} compiler commands failed"
            raise CompileError(failed) from failures[0]
        return objects

    compiler.compile = compile_all


def _depends() -> list[str]:
    # Headers and the kernel files included by csrc/cpu/arch/*.cpp: distutils only rebuilds an object
    # when its own source changed unless these are listed.
    return sorted(glob.glob("csrc/**/*.h", recursive=True)) + sorted(
        f for f in glob.glob("csrc/cpu/*.cpp") if not os.path.basename(f).startswith("dispatch")
    )


# nvcc flags of the shipped build (the SM arch flags come from FASTRLHF_CUDA_ARCHS). .ci/run reads this
# list, so CI compiles the .cu files exactly as a wheel build does. No --use_fast_math: its approximate
# intrinsics and flush-to-zero are not proven on NaN/-inf inputs, which the ops' tests feed on purpose.
NVCC_FLAGS = ["-O3", "-std=c++17", "-DFASTRLHF_WITH_CUDA"]


def _extension():
    with_cuda = _want_cuda()
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx = ["-O3", "-std=c++17", "-fopenmp", f"-DFASTRLHF_IS_X86={int(IS_X86)}"]
    if with_cuda:
        cxx.append("-DFASTRLHF_WITH_CUDA")
        nvcc = NVCC_FLAGS + _cuda_arch_flags()
        return CUDAExtension(
            "fastrlhf._C",
            _sources(True),
            include_dirs=include_dirs,
            depends=_depends(),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "fastrlhf._C",
        _sources(False),
        include_dirs=include_dirs,
        depends=_depends(),
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["fastrlhf", "fastrlhf.*"]),
    package_data={
        "fastrlhf.data": ["sample/*.jsonl"],
        "fastrlhf.models": ["tiny_tokenizer/*.json", "tiny_tokenizer/*.jinja"],
    },
    ext_modules=[_extension()],
    # Ninja compiles every source with one set of flags; the per-capability objects need their own.
    cmdclass={"build_ext": FastrlhfBuildExt.with_options(use_ninja=False)},
)
