"""The machine a run ran on, for its record: CPU, caches, GPUs, and the hardware class.

vLLM's outputs are bit-identical only on the same hardware class (shared/notes/determinism.md):
the CPU's instruction-set extensions pick different kernel libraries (AVX2, AVX-512, AVX-512 BF16,
AMX), the L2 size sets the CPU attention tiles, the usable cores set the thread count, and on a
GPU machine the GPU model and compute capability pick the kernels. The class is a short hash over
exactly those parts (`class_inputs` keeps them, so a difference can be explained); everything
else here is recorded for people and never compared.

`hardware_section` is pure (text in, section out); `read_hardware` reads this machine.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

# The CPU features that select different kernels in torch/oneDNN/vLLM's CPU backend.
KERNEL_FLAGS = (
    # x86
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
    # Arm
    "asimd", "asimdhp", "asimddp", "sve", "sve2", "bf16", "i8mm", "sme",
)
CLASS_DIGITS = 12
SMI_QUERY = "index,uuid,name,memory.total,compute_cap,driver_version"


def cpuinfo_blocks(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo as one mapping per processor (and, on Arm, a trailing machine block)."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current.setdefault(key.strip(), value.strip())
    if current:
        blocks.append(current)
    return blocks


def cpu_section(cpuinfo: str, caches: Mapping[str, Mapping[str, str]], usable_cpus: int | None) -> dict[str, Any]:
    """The CPU from /proc/cpuinfo and cpu0's cache folders (index* → level, type, size)."""
    blocks = cpuinfo_blocks(cpuinfo)
    processors = [b for b in blocks if "processor" in b]
    first = processors[0] if processors else (blocks[0] if blocks else {})
    model = next((first[k] for k in ("model name", "cpu model", "Model", "cpu", "Processor") if first.get(k)), None)
    if model is None and "CPU part" in first:
        model = f"implementer {first.get('CPU implementer', '?')} part {first['CPU part']}"
    features = set((first.get("flags") or first.get("Features") or "").split())
    cores = {(b.get("physical id"), b.get("core id")) for b in processors if "core id" in b}
    levels = {}
    for entry in caches.values():
        if entry.get("type") in ("Unified", "Data") and entry.get("level"):
            levels[f"l{entry['level']}"] = entry.get("size")
    return {
        "model": model,
        "vendor": first.get("vendor_id") or first.get("CPU implementer"),
        "flags": [f for f in KERNEL_FLAGS if f in features],
        "logical_cpus": len(processors) or None,
        "physical_cores": len(cores) or None,
        "usable_cpus": usable_cpus,
        "l1d": levels.get("l1"),
        "l2": levels.get("l2"),
        "l3": levels.get("l3"),
    }


def visible_gpu_rows(nvidia_smi_csv: str, cuda_visible_devices: str | None) -> list[list[str]]:
    """nvidia-smi's CSV rows (SMI_QUERY order), kept to the GPUs CUDA_VISIBLE_DEVICES shows, in its order."""
    rows = [
        [cell.strip() for cell in row]
        for row in csv.reader(nvidia_smi_csv.splitlines(), skipinitialspace=True)
        if len(row) >= len(SMI_QUERY.split(","))
    ]
    if cuda_visible_devices is None:
        return rows
    chosen = []
    for wanted in (w.strip() for w in cuda_visible_devices.split(",")):
        if not wanted or wanted.startswith("-"):
            break  # CUDA stops at the first invalid entry
        match = next((r for r in rows if r[0] == wanted or (not wanted.isdigit() and r[1].startswith(wanted))), None)
        if match is None:
            break
        chosen.append(match)
    return chosen


def gpu_section(nvidia_smi_csv: str | None, cuda_visible_devices: str | None) -> list[dict[str, Any]]:
    if not nvidia_smi_csv:
        return []
    gpus = []
    for index, uuid, name, memory, capability, driver in (r[:6] for r in visible_gpu_rows(nvidia_smi_csv, cuda_visible_devices)):
        gpus.append({
            "index": int(index) if index.isdigit() else index,
            "uuid": uuid,
            "name": name,
            "memory_mib": int(memory) if memory.isdigit() else memory,
            "compute_capability": capability,
            "driver": driver,
        })
    return gpus


def class_inputs(section: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a hardware section that change vLLM's outputs (see the module's docstring).

    With GPUs the engine computes on them, so the CPU's parts are left out; without, the CPU's.
    """
    gpus = section.get("gpus") or []
    if gpus:
        return {
            "device": "cuda",
            "machine": section.get("machine"),
            "gpus": [{"name": g["name"], "compute_capability": g["compute_capability"]} for g in gpus],
        }
    cpu = section.get("cpu") or {}
    inputs = {
        "device": "cpu",
        "machine": section.get("machine"),
        "vendor": cpu.get("vendor"),
        "flags": sorted(cpu.get("flags") or []),
        "l2": cpu.get("l2"),
        "usable_cpus": cpu.get("usable_cpus"),
    }
    if not inputs["flags"]:
        inputs["model"] = cpu.get("model")  # features unknown for this architecture: the model stands in
    return inputs


def hardware_class(inputs: Mapping[str, Any]) -> str:
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return "hw-" + hashlib.sha256(canonical.encode()).hexdigest()[:CLASS_DIGITS]


def hardware_section(
    *,
    machine: str,
    cpuinfo: str,
    caches: Mapping[str, Mapping[str, str]],
    usable_cpus: int | None,
    memory_kib: int | None = None,
    nvidia_smi_csv: str | None = None,
    cuda_visible_devices: str | None = None,
    cuda: str | None = None,
    nccl: str | None = None,
) -> dict[str, Any]:
    """A run record's `hardware`: what the machine is, and its class under the key "class"."""
    section: dict[str, Any] = {
        "machine": machine,
        "cpu": cpu_section(cpuinfo, caches, usable_cpus),
        "memory_kib": memory_kib,
        "gpus": gpu_section(nvidia_smi_csv, cuda_visible_devices),
        "cuda": cuda,
        "nccl": nccl,
    }
    if cuda_visible_devices is not None:
        section["cuda_visible_devices"] = cuda_visible_devices
    inputs = class_inputs(section)
    section["class_inputs"] = inputs
    section["class"] = hardware_class(inputs)
    return section


# ---- this machine ---------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def read_caches(cpu: str = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, dict[str, str]]:
    import os

    caches = {}
    try:
        names = sorted(n for n in os.listdir(cpu) if n.startswith("index"))
    except OSError:
        return {}
    for name in names:
        caches[name] = {key: _read(f"{cpu}/{name}/{key}").strip() for key in ("level", "type", "size")}
    return caches


def _nvidia_smi() -> str | None:
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run([smi, f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _torch_cuda() -> str | None:
    """The CUDA runtime the installed torch was built with, read from torch/version.py (no import)."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    text = _read(f"{list(spec.submodule_search_locations)[0]}/version.py")
    found = re.search(r"^cuda\b[^=]*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return found.group(1) if found else None


def _nccl() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("nvidia-nccl-cu13", "nvidia-nccl-cu12", "nvidia-nccl-cu11"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def read_hardware(env: Mapping[str, str]) -> dict[str, Any]:
    """This machine's hardware section, with the GPUs `env`'s CUDA_VISIBLE_DEVICES leaves visible."""
    import os
    import platform

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    meminfo = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    smi = _nvidia_smi()
    return hardware_section(
        machine=platform.machine(),
        cpuinfo=_read("/proc/cpuinfo"),
        caches=read_caches(),
        usable_cpus=usable,
        memory_kib=int(meminfo.group(1)) if meminfo else None,
        nvidia_smi_csv=smi,
        cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"),
        cuda=_torch_cuda(),
        nccl=_nccl() if smi else None,
    )
