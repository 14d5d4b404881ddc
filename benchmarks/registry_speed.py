"""Benchmark: `vdeploy push`/`pull`'s registry client against `skopeo copy`, over loopback.

Target (issue 15): push and pull of a 1 GiB bundle, each within 2x of `skopeo copy` between the
same OCI layout and the same registry (Debian's docker-registry on 127.0.0.1), side by side.

Each round starts fresh registries (new storage, new port, so neither client finds its blobs
already there) and times, in alternating order: vdeploy.registry.push_layout and
`skopeo copy oci:LAYOUT docker://...` (each into its own empty registry); then
vdeploy.registry.pull_to_layout and `skopeo copy docker://... oci:DIR` (into empty folders).
The layout is a model of a few large random shards plus small files, as `vdeploy bundle` makes.

    python benchmarks/registry_speed.py [--shards 4] [--shard-mb 256] [--runs 3] [--jobs 4]

Always exits 0: benchmarks report, tests assert.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

from registry_server import RegistryServer, registry_binary, write_layout  # noqa: E402

from vdeploy.registry import pull_to_layout, push_layout  # noqa: E402

TARGET_FACTOR = 2.0


def make_layout(folder: Path, shards: int, shard_mb: int) -> str:
    """A layout of `shards` random files of shard_mb MiB, plus a config and a tokenizer."""
    raw = folder / "raw"
    raw.mkdir(parents=True)
    files: dict[str, bytes | Path] = {"config.json": b'{"architectures": ["Bench"]}', "tokenizer.json": os.urandom(2_000_000)}
    chunk = 64 * 1024 * 1024
    for i in range(shards):
        path = raw / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        with open(path, "wb") as out:
            for _ in range(shard_mb * 1024 * 1024 // chunk):
                out.write(os.urandom(chunk))
            out.write(os.urandom(shard_mb * 1024 * 1024 % chunk))
        files[path.name] = path
    return write_layout(folder / "layout", files, tag="bench")


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def skopeo(*args: str) -> None:
    done = subprocess.run(["skopeo", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"skopeo {' '.join(args)} failed:\n{done.stderr}")


def size_arguments(doc: str) -> argparse.ArgumentParser:
    """--shards, --shard-mb and --runs, the options of the registry benchmarks."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-mb", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    return parser


def tools_missing() -> bool:
    if registry_binary() is None or shutil.which("skopeo") is None:
        print("needs docker-registry and skopeo (apt-get install docker-registry skopeo); nothing measured")
        return True
    return False


def report(times: dict[str, list[float]], size: int, runs: int, describe) -> None:
    """Medians of "push vdeploy", "push skopeo", "pull vdeploy", "pull skopeo", each ratio beside the target."""
    print(f"\nmedians over {runs} runs, {size / 2**30:.2f} GiB over loopback (target: vdeploy <= {TARGET_FACTOR}x skopeo)")
    for step in ("push", "pull"):
        ours_s, theirs_s = statistics.median(times[f"{step} vdeploy"]), statistics.median(times[f"{step} skopeo"])
        ratio = ours_s / theirs_s
        verdict = "ok" if ratio <= TARGET_FACTOR else "MISSED"
        print(f"{step}: vdeploy {describe(ours_s)}, skopeo {describe(theirs_s)}: {ratio:.2f}x, target <= {TARGET_FACTOR}x {verdict}")


def main() -> None:
    parser = size_arguments(__doc__)
    parser.add_argument("--jobs", type=int, default=4, help="vdeploy's parallel transfers")
    args = parser.parse_args()
    if tools_missing():
        return

    with tempfile.TemporaryDirectory(prefix="vdeploy-registry-bench-") as tmp:
        root = Path(tmp)
        digest = make_layout(root, args.shards, args.shard_mb)
        layout = root / "layout"
        size = sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())
        print(f"layout: {size / 2**30:.2f} GiB in {len(list((layout / 'blobs' / 'sha256').iterdir()))} blobs, {digest}")
        times: dict[str, list[float]] = {"push vdeploy": [], "push skopeo": [], "pull vdeploy": [], "pull skopeo": []}
        for run in range(args.runs):
            ours = RegistryServer(root / f"ours-{run}").__enter__()
            theirs = RegistryServer(root / f"theirs-{run}").__enter__()
            try:
                push_ours = lambda: push_layout(layout, f"{ours.host}/bench/model:bench", jobs=args.jobs)  # noqa: E731
                push_theirs = lambda: skopeo(  # noqa: E731
                    "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
                    f"oci:{layout}:bench", f"docker://{theirs.host}/bench/model:bench",
                )
                pull_ours = lambda: pull_to_layout(f"{ours.host}/bench/model:bench", root / "pulled-ours", jobs=args.jobs)  # noqa: E731
                pull_theirs = lambda: skopeo(  # noqa: E731
                    "copy", "--quiet", "--src-tls-verify=false", "--preserve-digests",
                    f"docker://{ours.host}/bench/model:bench", f"oci:{root / 'pulled-theirs'}:bench",
                )
                order = [("push vdeploy", push_ours), ("push skopeo", push_theirs)]
                order += [("pull vdeploy", pull_ours), ("pull skopeo", pull_theirs)]
                if run % 2:  # alternate who goes first, so neither always meets a warmer machine
                    order = [order[1], order[0], order[3], order[2]]
                for name, action in order:
                    times[name].append(timed(action))
                    print(f"  run {run + 1} {name}: {times[name][-1]:.2f} s", flush=True)
            finally:
                ours.stop()
                theirs.stop()
                for path in (root / f"ours-{run}", root / f"theirs-{run}", root / "pulled-ours", root / "pulled-theirs"):
                    shutil.rmtree(path, ignore_errors=True)
        report(times, size, args.runs, lambda seconds: f"{seconds:.2f} s ({size / seconds / 2**20:.0f} MiB/s)")

if __name__ == "__main__":
    main()
