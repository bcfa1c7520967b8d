"""The kernels as a GPU compiles them, built on a machine without one.

Triton compiles ahead of time for any target it has a backend for: its wheel carries
LLVM and NVIDIA's ptxas, so the cubin an H100 runs can be built on a CPU. This module
does that for the launches tera's wrappers make, so that what the interpreter cannot
show is checked without a GPU: register spills, shared memory over the per-block limit,
whether tl.dot became Hopper's wgmma, whether the K loop was software-pipelined with
asynchronous copies, how wide the global loads and stores are.

    with recording() as launches:           # launches are recorded, not run
        MoE(spec, device="meta")(x)          # or any tera.kernels op on meta tensors
    for launch in launches:
        for config, kwargs in launch.variants():   # one per autotuning config
            resources = compile_launch(launch.kernel, launch.args, kwargs)

Each launch compiles through Triton's own JIT binder, so every argument is specialised
as a launch on the GPU specialises it (pointers and ints divisible by 16, ints equal to 1
as constants). `meta` tensors have address 0, which passes as aligned, as the CUDA
caching allocator's blocks are. Needs Triton compiling (TRITON_INTERPRET unset). The
binder and `_pack_args` are Triton internals (checked against Triton 3.9):
`UnsupportedTriton` says when they are missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tera.kernels import _triton, dispatch
from tera.kernels._triton import triton

# Largest shared memory one thread block may use on compute capability 9.0 (H100, H200):
# 227 KB, "Technical Specifications per Compute Capability", CUDA C++ Programming Guide.
SM90_SHARED_BYTES_PER_BLOCK = 227 * 1024


class UnsupportedTriton(RuntimeError):
    """This Triton lacks the internals that compiling a launch ahead of time relies on."""


@dataclasses.dataclass
class Launch:
    """One recorded launch: the kernel, its arguments, and the autotuner's configs when it
    went through one (each config is then a variant to compile)."""

    kernel: object  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict
    configs: list | None = None

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def variants(self) -> Iterator[tuple[str, dict]]:
        """(label, kwargs) per compiled variant: the launch itself, or one per config."""
        if self.configs is None:
            yield "", self.kwargs
            return
        for config in self.configs:
            kw = config.all_kwargs()
            label = " ".join(f"{k}={v}" for k, v in kw.items() if k not in ("num_ctas",))
            yield label, {**self.kwargs, **kw}


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Inside the block, ops on `meta` tensors go to the Triton wrappers and every launch
    (plain or autotuned) is appended to the yielded list instead of running. The wrappers'
    outputs are then unwritten `meta` tensors, which is all that shapes need."""
    with dispatch.triton_for("meta"):  # refuses without Triton compiling
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        launches: list[Launch] = []

        def record_jit(self, *args, grid, warmup, **kwargs):
            launches.append(Launch(self, args, kwargs))

        def record_tuned(self, *args, grid, warmup, **kwargs):
            launches.append(Launch(self.fn, args, kwargs, list(self.configs)))

        run_jit, run_tuned = JITFunction.run, Autotuner.run
        JITFunction.run, Autotuner.run = record_jit, record_tuned
        try:
            yield launches
        finally:
            JITFunction.run, Autotuner.run = run_jit, run_tuned


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one compiled variant uses, read from its cubin and PTX."""

    registers: int  # per thread
    spill_bytes: int  # stack frame per thread: registers spilled to local memory
    shared_bytes: int  # per block
    wgmma: int  # Hopper warpgroup MMA instructions (tl.dot on the tensor cores)
    async_copies: int  # cp.async instructions: the loop's loads are software-pipelined
    widest_load: int  # bytes of the widest global load instruction (16 = vectorised)
    widest_store: int

    @property
    def fits_sm90(self) -> bool:
        """Whether the block's shared memory fits; a config that does not is refused at
        launch, and the autotuner skips it."""
        return self.shared_bytes <= SM90_SHARED_BYTES_PER_BLOCK


def compile_launch(kernel, args: tuple, kwargs: dict, arch: int = 90) -> Resources:
    """Compile one launch for CUDA compute capability `arch` and read its resources."""
    if not _triton.AVAILABLE:
        raise RuntimeError("compiling a launch needs Triton, which is not installed")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(
            backend, kwargs, bound, specialization, options
        )
    except (ImportError, AttributeError, TypeError) as error:
        raise UnsupportedTriton(
            f"Triton {triton.__version__}: its JIT internals differ from those this "
            f"ahead-of-time compile uses (written against 3.9): {error}"
        ) from error
    source = ASTSource(kernel, signature, constexprs, attrs)
    compiled = triton.compile(source, target=target, options=options.__dict__)
    usage = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return Resources(
        registers=usage["REG"],
        spill_bytes=usage["STACK"] + usage["LOCAL"],
        shared_bytes=compiled.metadata.shared,
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        async_copies=len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx)),
        widest_load=_widest(ptx, "ld"),
        widest_store=_widest(ptx, "st"),
    )


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's one kernel, by cuobjdump (in Triton's wheel)."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "kernel.cubin"
        path.write_bytes(cubin)
        tool = triton.knobs.nvidia.cuobjdump.path
        report = subprocess.run(
            [tool, "-res-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", report))
    if len(fields) != 4:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{report}")
    return {k: int(v) for k, v in fields.items()}


def _widest(ptx: str, op: str) -> int:
    """Bytes moved by the widest `op` (ld or st) from or to global memory: lanes times
    lane width, as in ld.global.v4.b32 (16 bytes). Loads include the asynchronous copies
    to shared memory of a pipelined loop, whose size is their third operand. 0 if none."""
    widest = 0
    for modifiers in re.findall(rf"\b{op}\.global((?:\.\w+)+)", ptx):
        parts = modifiers.split(".")
        lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p)), 0)
        widest = max(widest, lanes * bits // 8)
    if op == "ld":
        copies = re.findall(r"\bcp\.async\.c[ag]\.shared\.global[^,]*,[^,]*,\s*(\w+)", ptx)
        widest = max([widest, *(int(size, 0) for size in copies)])
    return widest
