#!/usr/bin/env python3
"""MSRV check without a second toolchain (none can be fetched here).

Every package in the resolved graph (all features, dev-dependencies included)
must declare a `rust-version` no newer than ours. Clippy's `incompatible_msrv`
lint, which reads the same field, covers our own use of std APIs in the
clippy step. Exits non-zero, naming the packages, when one is newer.
"""
import json
import subprocess
import sys

meta = json.loads(
    subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--all-features", "--locked"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
)


def version(v):
    return tuple(int(x) for x in v.split(".")[:2])


ours = next(
    p for p in meta["packages"] if p["id"] in meta["workspace_members"] and p["name"] == "tower-firebreak"
)
msrv = version(ours["rust_version"])
resolved = {n["id"] for n in meta["resolve"]["nodes"]}
newer = [
    f'{p["name"]} {p["version"]} needs {p["rust_version"]}'
    for p in meta["packages"]
    if p["id"] in resolved and p.get("rust_version") and version(p["rust_version"]) > msrv
]
if newer:
    print(f'error: dependencies need a newer Rust than our rust-version {ours["rust_version"]}:')
    print("\n".join("  " + n for n in newer))
    sys.exit(1)
print(f'{len(resolved)} resolved packages, none needs more than Rust {ours["rust_version"]}')
