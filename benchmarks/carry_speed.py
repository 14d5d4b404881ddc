"""Benchmark: the `vdeploy push` and `vdeploy pull` commands, whole, against `skopeo copy`, over loopback.

Target (issue 15): push and pull of a 1 GiB bundle within 2x of `skopeo copy` between the same
layout and registry. registry_speed.py times the registry client alone (layout to registry and
back); this times what a user runs: `push` from the store (the bundle written as hard links and
hashed, then sent) against skopeo copying the bundle's layout, and `pull` into an empty store
(streamed and checked, then restored and hashed again into the store) against skopeo copying the
artifact into an empty layout. Each run uses fresh registries, alternating who goes first.

    python benchmarks/carry_speed.py [--shards 4] [--shard-mb 256] [--runs 3]

Always exits 0: benchmarks report, tests assert.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "tests")]

from bench_cli import build_store, cli_env, timed_vdeploy  # noqa: E402
from registry_server import RegistryServer  # noqa: E402
from registry_speed import report, size_arguments, skopeo, timed, tools_missing  # noqa: E402


def main() -> None:
    args = size_arguments(__doc__).parse_args()
    if tools_missing():
        return
    with tempfile.TemporaryDirectory(prefix="vdeploy-carry-bench-") as tmp:
        root = Path(tmp)
        source = root / "source"
        env = cli_env(root / "home")
        build_store(source, args.shards, args.shard_mb * 2**20, env)
        layout = root / "bundle"
        timed_vdeploy(["bundle", str(source), "-o", str(layout)], env)
        [entry] = json.loads((layout / "index.json").read_text())["manifests"]
        ref_name = entry["annotations"]["org.opencontainers.image.ref.name"]
        size = sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())
        print(f"bundle: {size / 2**30:.2f} GiB, {len(list((layout / 'blobs' / 'sha256').iterdir()))} blobs")
        times: dict[str, list[float]] = {"push vdeploy": [], "push skopeo": [], "pull vdeploy": [], "pull skopeo": []}
        for run in range(args.runs):
            ours = RegistryServer(root / f"ours-{run}").__enter__()
            theirs = RegistryServer(root / f"theirs-{run}").__enter__()
            target = root / "target"
            target.mkdir()
            shutil.copy(source / "vdeploy.toml", target / "vdeploy.toml")
            try:
                order = [
                    ("push vdeploy", lambda: timed_vdeploy(["push", str(source), f"{ours.host}/bench/model:v1"], env)),
                    ("push skopeo", lambda: timed(lambda: skopeo(
                        "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
                        f"oci:{layout}:{ref_name}", f"docker://{theirs.host}/bench/model:v1"))),
                    ("pull vdeploy", lambda: timed_vdeploy(["pull", f"{ours.host}/bench/model:v1", str(target)], env)),
                    ("pull skopeo", lambda: timed(lambda: skopeo(
                        "copy", "--quiet", "--src-tls-verify=false", "--preserve-digests",
                        f"docker://{ours.host}/bench/model:v1", f"oci:{root / 'pulled-skopeo'}:v1"))),
                ]
                if run % 2:
                    order = [order[1], order[0], order[3], order[2]]
                for name, action in order:
                    times[name].append(action())
                    print(f"  run {run + 1} {name}: {times[name][-1]:.2f} s", flush=True)
            finally:
                ours.stop()
                theirs.stop()
                for path in (root / f"ours-{run}", root / f"theirs-{run}", target, root / "pulled-skopeo"):
                    shutil.rmtree(path, ignore_errors=True)
        # vdeploy's side is the command (store to registry, registry to store); skopeo's the bundle's layout.
        report(times, size, args.runs, lambda seconds: f"{seconds:.2f} s")

if __name__ == "__main__":
    main()
