"""Build the conformance kernels (multiboot v1, ELF32) from their C sources.

    python -m regsync.board.kernels.build [OUTDIR]

Each ``<name>.c`` here is one kernel, linked with ``boot.S`` and ``lib.c`` by
``gcc -m32 -ffreestanding`` and ``ld -m elf_i386``; ``<name>-aout`` is the same
kernel as a flat binary whose multiboot header carries the load addresses (the
a.out kludge). Outputs go to a build directory, never into the package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parent
KERNELS = tuple(sorted(p.stem for p in SRC.glob("*.c") if p.stem != "lib"))
CFLAGS = ["-m32", "-march=i686", "-ffreestanding", "-fno-pic", "-fno-pie", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-mno-sse", "-mno-mmx", "-mgeneral-regs-only",
          "-O2", "-Wall", "-Wextra", "-Werror", "-nostdlib", "-nostdinc",
          "-isystem", "", "-I", str(SRC)]


class BuildError(RuntimeError):
    """A compiler or linker failure, with its output."""


def toolchain_missing() -> str | None:
    """Why the kernels cannot be built here (None when gcc -m32 and ld are usable)."""
    for tool in ("gcc", "ld", "objcopy"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian packages gcc, binutils)"
    return None


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[:2000]}")
    return proc.stdout


def _gcc_include() -> str:
    # -nostdinc drops libc's headers; gcc's own (stdarg.h) stay reachable.
    return _run(["gcc", "-m32", "-print-file-name=include"]).strip()


def build(name: str, outdir: Path) -> Path:
    """Compile one kernel into outdir and return the image's path."""
    aout = name.endswith("-aout")
    base = name.removesuffix("-aout")
    if base not in KERNELS:
        raise KeyError(f"unknown kernel {name!r}; known: {', '.join(KERNELS)}")
    outdir.mkdir(parents=True, exist_ok=True)
    flags = list(CFLAGS)
    flags[flags.index("")] = _gcc_include()
    if aout:
        flags.append("-DAOUT_KLUDGE")
    objs = []
    with tempfile.TemporaryDirectory(dir=outdir) as tmp:
        sources = [SRC / "boot.S", SRC / "lib.c", SRC / f"{base}.c"]
        if (SRC / f"{base}-ap.S").exists():          # a kernel's own assembly (AP trampoline)
            sources.append(SRC / f"{base}-ap.S")
        for src in sources:
            obj = Path(tmp) / f"{src.stem}.o"
            _run(["gcc", *flags, "-c", str(src), "-o", str(obj)])
            objs.append(str(obj))
        elf = outdir / f"{base}{'-aout' if aout else ''}.elf"
        _run(["ld", "-m", "elf_i386", "-nostdlib", "-T", str(SRC / "kernel.ld"), "-o", str(elf), *objs])
        if not aout:
            return elf
        flat = outdir / f"{base}-aout.bin"
        _run(["objcopy", "-O", "binary", str(elf), str(flat)])
        return flat


def build_all(outdir: Path) -> dict[str, Path]:
    return {name: build(name, outdir) for name in KERNELS}


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("build/kernels")
    for name, path in build_all(out).items():
        print(f"{name:<10} {path}")
