"""training.compile: whether the blocks are compiled, and whether this machine can compile them.

torch.compile's GPU kernels come from Triton, which builds a small C launcher on first use: it needs
a C compiler (gcc or clang, or $CC) and Python's headers (Python.h; Debian/Ubuntu's python3-dev).
On the CPU inductor needs a C++ compiler. An image without them fails at the first compiled step,
after the model has loaded; unset compile then runs eagerly with a warning, and compile: true
stops at once with the fix."""
from __future__ import annotations

import os
import shutil
import sysconfig
from typing import Callable, Optional


def compiler_problem(device_type: str, which: Callable[[str], Optional[str]] = shutil.which,
                     include_dir: Optional[str] = None, env: Optional[dict] = None) -> Optional[str]:
    """What this machine lacks to compile for device_type, or None. Pure given its arguments
    (which, include_dir and env default to this machine's)."""
    env = os.environ if env is None else env
    if device_type == "cuda":
        if env.get("CC") and not which(env["CC"]):
            return f"Triton's C compiler $CC ({env['CC']}) is not found"
        if not (env.get("CC") or which("gcc") or which("clang")):
            return "Triton finds no C compiler (gcc or clang, or $CC)"
        include_dir = include_dir if include_dir is not None else sysconfig.get_paths()["include"]
        if not os.path.isfile(os.path.join(include_dir, "Python.h")):
            return f"Triton needs Python's headers and {include_dir}/Python.h is missing (python3-dev)"
        return None
    if not ((env.get("CXX") and which(env["CXX"])) or which("g++") or which("clang++")):
        return "inductor finds no C++ compiler (g++ or clang++, or $CXX)"
    return None


def choose_compile(requested: Optional[bool], device_type: str, capability: Optional[tuple[int, int]],
                   offload: bool = False, problem: Optional[str] = None) -> tuple[bool, str]:
    """(compile, why): training.compile, or unset: on for CUDA GPUs of compute capability 8.0+
    (bf16 Triton kernels; measured 0.39 vs 0.70 s a Flux step on an H100, and eager fp8 GEMMs
    quantize slowly), off on CPU (compiling costs more than it gains), with cpuOffload (the step
    waits on copies; never measured compiled on a GPU) and where the machine cannot compile
    (problem, from compiler_problem). Pure."""
    if requested is not None:
        return requested, "training.compile"
    if offload:
        return False, "training.cpuOffload"
    if device_type == "cuda" and capability is not None and capability >= (8, 0):
        if problem:
            return False, f"cannot compile here: {problem}"
        return True, f"a CUDA GPU of compute capability {capability[0]}.{capability[1]}"
    return False, ("a CUDA GPU older than compute capability 8.0" if device_type == "cuda" else f"device {device_type}")
