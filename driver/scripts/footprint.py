#!/usr/bin/env python3
"""The driver's share of the firmware's `.text`, two ways (see BENCHMARKS.md).

1. Symbols (`nm -S -C`): sizes of the function symbols whose demangled path starts with
   `virtio_iommu_driver::` (or `<virtio_iommu_driver::...` for trait impls). A lower bound: with
   LTO, driver code inlined into its callers is counted under the caller.
2. DWARF line table (`llvm-dwarfdump --debug-line`): every byte of code attributed to the source
   file its line-table row names, so inlined driver code counts as driver code (including
   virtio-drivers' generic `VirtQueue` code under virtio-drivers, wherever it was instantiated).

Usage: driver/scripts/footprint.py [firmware.elf]
"""

import re
import subprocess
import sys
from collections import defaultdict

ELF = sys.argv[1] if len(sys.argv) > 1 else "target/aarch64-unknown-none/release/virtio-iommu-firmware"

CRATES = [
    ("virtio-iommu-driver", ("virtio_iommu_driver::",), ("driver/src",)),
    ("virtio-drivers", ("virtio_drivers::",), ("virtio-drivers-",)),
    ("firmware", ("virtio_iommu_firmware::",), ("firmware/src",)),
    ("conformance suite", ("virtio_iommu_conformance::",), ("tests/src",)),
    ("core/alloc/compiler_builtins", ("core::", "alloc::", "compiler_builtins::"), ("/rustc/",)),
]


def crate_of_symbol(name):
    name = name.lstrip("<&*")
    for crate, prefixes, _ in CRATES:
        if name.startswith(prefixes):
            return crate
    return "other crates"


def crate_of_dir(directory):
    for crate, _, dirs in CRATES:
        if any(d in directory for d in dirs):
            return crate
    return "other crates"


def text_range():
    out = subprocess.run(["readelf", "-SW", ELF], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        m = re.search(r"\]\s+\.text\s+\S+\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", line)
        if m:
            start, size = int(m.group(1), 16), int(m.group(2), 16)
            return start, start + size
    raise SystemExit("no .text section")


def by_symbols():
    out = subprocess.run(["nm", "-S", "-C", "--defined-only", ELF], capture_output=True, text=True, check=True).stdout
    sizes = defaultdict(int)
    for line in out.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[2] in "tTwW":
            sizes[crate_of_symbol(parts[3])] += int(parts[1], 16)
    return sizes


def by_line_table(lo, hi):
    out = subprocess.run(["llvm-dwarfdump", "--debug-line", ELF], capture_output=True, text=True, check=True).stdout
    sizes = defaultdict(int)
    dirs, files = {}, {}
    pending = None  # (address, crate) of the previous row of the sequence
    current_file = None
    for line in out.splitlines():
        if line.startswith("debug_line["):
            dirs, files, pending = {}, {}, None
            continue
        m = re.match(r'include_directories\[\s*(\d+)\] = "(.*)"', line)
        if m:
            dirs[int(m.group(1))] = m.group(2)
            continue
        m = re.match(r"file_names\[\s*(\d+)\]:", line)
        if m:
            current_file = int(m.group(1))
            continue
        m = re.match(r"\s+dir_index: (\d+)", line)
        if m and current_file is not None:
            files[current_file] = dirs.get(int(m.group(1)), "")
            continue
        m = re.match(r"0x([0-9a-f]{16})\s+\d+\s+\d+\s+(\d+)\s+\d+\s+\d+\s*(.*)", line)
        if m:
            address, file_index, flags = int(m.group(1), 16), int(m.group(2)), m.group(3)
            if pending is not None:
                start, crate = pending
                a, b = max(start, lo), min(address, hi)
                if b > a:
                    sizes[crate] += b - a
            pending = None if "end_sequence" in flags else (address, crate_of_dir(files.get(file_index, "")))
    return sizes


def main():
    lo, hi = text_range()
    total = hi - lo
    print(f"{ELF}: .text {total} bytes ({total / 1024:.1f} KiB)\n")
    for title, sizes in (("function symbols (nm -S -C)", by_symbols()),
                         ("DWARF line table (inlining-aware)", by_line_table(lo, hi))):
        print(f"| {title} | bytes | KiB | share of .text |")
        print("|---|---:|---:|---:|")
        for crate, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
            print(f"| {crate} | {size} | {size / 1024:.1f} | {100 * size / total:.1f} % |")
        print()


if __name__ == "__main__":
    main()
