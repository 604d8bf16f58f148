"""Build the guest images: ``python -m regsync.guests.build [--check] [--out DIR] [NAME...]``.

For each ``src/<name>.S``: ``as --64 -I src``, ``ld -T guest.ld -nostdlib``,
``objcopy -O binary`` -> ``<name>.bin``, and ``nm`` -> ``<name>.sym`` (sorted
``<address> <name>`` lines for the labels in the image's sections).

The build is deterministic: it runs in a scratch directory with relative file
names, no build id and no debug info, so the same binutils give the same bytes.
``--check`` builds into a temporary directory and compares with the shipped
files byte for byte; it exits 1 naming the files that differ.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PKG_DIR = Path(__file__).resolve().parent
SRC_DIR = PKG_DIR / "src"
TOOLS = ("as", "ld", "objcopy", "nm")
# nm types that are addresses in the image: text, data, read-only data, bss.
_ADDRESS_TYPES = set("TtDdRrBb")


class BuildError(RuntimeError):
    pass


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def guest_sources(names: list[str] | None = None) -> dict[str, Path]:
    found = {p.stem: p for p in sorted(SRC_DIR.glob("*.S"))}
    if not names:
        return found
    unknown = [n for n in names if n not in found]
    if unknown:
        raise BuildError(f"no source for {', '.join(unknown)} in {SRC_DIR}")
    return {n: found[n] for n in names}


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"})
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                         f"{proc.stdout}{proc.stderr}")
    return proc.stdout


def _ld_flags(work: Path) -> list[str]:
    flags = ["-nostdlib", "-static", "-z", "noexecstack", "--build-id=none", "-z", "norelro"]
    help_text = _run(["ld", "--help"], work)
    if "--no-warn-rwx-segments" in help_text:    # binutils >= 2.39
        flags.append("--no-warn-rwx-segments")
    return flags


def symbol_text(nm_output: str) -> str:
    """``nm`` output -> sorted ``<16 hex digits> <name>`` lines (image labels only)."""
    rows = set()
    for line in nm_output.splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[1] not in _ADDRESS_TYPES:
            continue
        rows.add((int(parts[0], 16), parts[2]))
    return "".join(f"{addr:016x} {name}\n" for addr, name in sorted(rows))


def build(out_dir: Path, names: list[str] | None = None) -> dict[str, list[Path]]:
    """Build the images into out_dir; returns name -> [bin, sym]."""
    missing = missing_tools()
    if missing:
        raise BuildError(f"missing binutils tools: {', '.join(missing)}")
    sources = guest_sources(names)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[Path]] = {}
    with tempfile.TemporaryDirectory(prefix="regsync-guests-") as tmp:
        work = Path(tmp)
        for f in [*SRC_DIR.glob("*.S"), *SRC_DIR.glob("*.inc"), SRC_DIR / "guest.ld"]:
            shutil.copyfile(f, work / f.name)
        ld_flags = _ld_flags(work)
        for name in sources:
            _run(["as", "--64", "-I", ".", "-o", f"{name}.o", f"{name}.S"], work)
            _run(["ld", "-T", "guest.ld", *ld_flags, "-o", f"{name}.elf", f"{name}.o"], work)
            _run(["objcopy", "-O", "binary", f"{name}.elf", f"{name}.bin"], work)
            syms = symbol_text(_run(["nm", "-n", f"{name}.elf"], work))
            (work / f"{name}.sym").write_text(syms)
            bin_out, sym_out = out_dir / f"{name}.bin", out_dir / f"{name}.sym"
            shutil.copyfile(work / f"{name}.bin", bin_out)
            shutil.copyfile(work / f"{name}.sym", sym_out)
            results[name] = [bin_out, sym_out]
    return results


def check(names: list[str] | None = None) -> list[str]:
    """Rebuild in a temporary directory; return the shipped file names that differ."""
    differ = []
    with tempfile.TemporaryDirectory(prefix="regsync-guests-check-") as tmp:
        built = build(Path(tmp), names)
        for files in built.values():
            for f in files:
                shipped = PKG_DIR / f.name
                if not shipped.exists() or shipped.read_bytes() != f.read_bytes():
                    differ.append(f.name)
    return differ


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m regsync.guests.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="rebuild into a temporary directory and compare with the shipped files")
    ap.add_argument("--out", type=Path, default=PKG_DIR,
                    help="output directory (default: the package directory)")
    ap.add_argument("names", nargs="*", help="guests to build (default: all)")
    args = ap.parse_args(argv)
    try:
        if args.check:
            differ = check(args.names or None)
            if differ:
                print("guest images differ from a fresh build: " + " ".join(differ))
                return 1
            print("guest images match a fresh build")
            return 0
        built = build(args.out, args.names or None)
    except BuildError as e:
        print(f"build failed: {e}", file=sys.stderr)
        return 2
    for name, files in built.items():
        print(f"{name}: {files[0].stat().st_size} bytes -> {files[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
