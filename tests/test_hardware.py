"""The hardware section of run records, from the texts Linux and nvidia-smi print (issue 10).

The samples are what those machines print (trimmed to two processors); the class must change
exactly when something that changes vLLM's outputs changes.
"""

from __future__ import annotations

import os
import re

from vdeploy.hardware import hardware_class, hardware_section, read_hardware

SAPPHIRE_RAPIDS = """\
processor	: 0
vendor_id	: GenuineIntel
cpu family	: 6
model		: 143
model name	: Intel(R) Xeon(R) Platinum 8480+
stepping	: 8
cpu MHz		: 2000.000
cache size	: 107520 KB
physical id	: 0
siblings	: 4
core id		: 0
cpu cores	: 2
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch cpuid_fault invpcid_single ssbd ibrs ibpb stibp ibrs_enhanced fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 wbnoinvd arat avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg tme avx512_vpopcntdq rdpid cldemote movdiri movdir64b md_clear serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8 flush_l1d arch_capabilities
bogomips	: 4000.00

processor	: 1
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8480+
physical id	: 0
core id		: 0
flags		: fpu avx avx2 avx512f amx_bf16

processor	: 2
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8480+
physical id	: 0
core id		: 1
flags		: fpu avx avx2 avx512f amx_bf16

processor	: 3
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8480+
physical id	: 0
core id		: 1
flags		: fpu avx avx2 avx512f amx_bf16
"""

EPYC = """\
processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 1
model name	: AMD EPYC
stepping	: 1
cpu MHz		: 2445.406
cache size	: 512 KB
physical id	: 0
siblings	: 2
core id		: 0
cpu cores	: 2
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext ssbd ibrs ibpb stibp vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves clzero xsaveerptr wbnoinvd arat umip pku ospke vaes vpclmulqdq rdpid fsrm

processor	: 1
vendor_id	: AuthenticAMD
model name	: AMD EPYC
physical id	: 0
core id		: 1
flags		: fpu avx avx2
"""

GRAVITON3 = """\
processor	: 0
BogoMIPS	: 2100.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x1
CPU part	: 0xd40
CPU revision	: 1

processor	: 1
BogoMIPS	: 2100.00
Features	: fp asimd sve bf16 i8mm
CPU implementer	: 0x41
CPU part	: 0xd40
"""

CACHES_2M = {
    "index0": {"level": "1", "type": "Data", "size": "48K"},
    "index1": {"level": "1", "type": "Instruction", "size": "32K"},
    "index2": {"level": "2", "type": "Unified", "size": "2048K"},
    "index3": {"level": "3", "type": "Unified", "size": "107520K"},
}
CACHES_512K = {
    "index0": {"level": "1", "type": "Data", "size": "32K"},
    "index1": {"level": "1", "type": "Instruction", "size": "32K"},
    "index2": {"level": "2", "type": "Unified", "size": "512K"},
    "index3": {"level": "3", "type": "Unified", "size": "32768K"},
}

# nvidia-smi --query-gpu=index,uuid,name,memory.total,compute_cap,driver_version --format=csv,noheader,nounits
H100_X2 = """\
0, GPU-4f1c2a7e-9b1d-3c55-8e2f-0a1b2c3d4e5f, NVIDIA H100 80GB HBM3, 81559, 9.0, 550.54.15
1, GPU-9d8e7f60-1a2b-4c3d-9e8f-7a6b5c4d3e2f, NVIDIA H100 80GB HBM3, 81559, 9.0, 550.54.15
"""
A100 = "0, GPU-11111111-2222-3333-4444-555555555555, NVIDIA A100-SXM4-80GB, 81920, 8.0, 535.161.08\n"


def cpu_machine(cpuinfo=SAPPHIRE_RAPIDS, caches=CACHES_2M, usable=4, **more):
    return hardware_section(machine="x86_64", cpuinfo=cpuinfo, caches=caches, usable_cpus=usable, **more)


def test_intel_cpu_section_keeps_the_kernel_selecting_flags_cores_and_caches():
    section = cpu_machine(memory_kib=527988736)
    cpu = section["cpu"]
    assert cpu["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu["vendor"] == "GenuineIntel"
    for flag in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni"):
        assert flag in cpu["flags"]
    assert "sse2" not in cpu["flags"] and "hypervisor" not in cpu["flags"]
    assert (cpu["logical_cpus"], cpu["physical_cores"], cpu["usable_cpus"]) == (4, 2, 4)
    assert (cpu["l1d"], cpu["l2"], cpu["l3"]) == ("48K", "2048K", "107520K")
    assert section["gpus"] == [] and section["memory_kib"] == 527988736
    assert re.fullmatch(r"hw-[0-9a-f]{12}", section["class"])
    assert section["class_inputs"]["device"] == "cpu"


def test_amd_and_arm_cpus_are_read_too():
    epyc = cpu_machine(EPYC, CACHES_512K, 2)["cpu"]
    assert (epyc["model"], epyc["vendor"], epyc["l2"]) == ("AMD EPYC", "AuthenticAMD", "512K")
    assert epyc["flags"] == ["avx", "avx2", "fma", "f16c"]
    arm = hardware_section(machine="aarch64", cpuinfo=GRAVITON3, caches={}, usable_cpus=2)
    assert arm["cpu"]["model"] == "implementer 0x41 part 0xd40"
    assert {"asimd", "sve", "bf16", "i8mm"} <= set(arm["cpu"]["flags"])
    assert arm["class"] != cpu_machine(EPYC, CACHES_512K, 2)["class"]


def test_cpu_class_changes_with_flags_l2_cores_and_vendor_only():
    base = cpu_machine()["class"]
    # the same hardware, read at another moment or from a differently named SKU of it
    renamed = SAPPHIRE_RAPIDS.replace("8480+", "8480C").replace("2000.000", "3800.000")
    assert cpu_machine(renamed)["class"] == base
    assert cpu_machine(memory_kib=1)["class"] == base
    # what selects other kernels, tiles or thread counts
    no_amx = SAPPHIRE_RAPIDS.replace(" amx_bf16", "").replace(" amx_tile", "").replace(" amx_int8", "")
    assert cpu_machine(no_amx)["class"] != base
    assert cpu_machine(caches={**CACHES_2M, "index2": {"level": "2", "type": "Unified", "size": "1024K"}})["class"] != base
    assert cpu_machine(usable=2)["class"] != base
    assert cpu_machine(SAPPHIRE_RAPIDS.replace("GenuineIntel", "AuthenticAMD"))["class"] != base


def test_gpus_come_from_nvidia_smi_and_set_the_class():
    section = cpu_machine(nvidia_smi_csv=H100_X2, cuda="12.8", nccl="2.26.2")
    assert [g["name"] for g in section["gpus"]] == ["NVIDIA H100 80GB HBM3"] * 2
    first = section["gpus"][0]
    assert (first["memory_mib"], first["compute_capability"], first["driver"]) == (81559, "9.0", "550.54.15")
    assert (section["cuda"], section["nccl"]) == ("12.8", "2.26.2")
    assert section["class_inputs"] == {
        "device": "cuda", "machine": "x86_64",
        "gpus": [{"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}] * 2,
    }
    # the engine computes on the GPUs: another host CPU or driver leaves the class alone
    other_host = cpu_machine(EPYC, CACHES_512K, 2, nvidia_smi_csv=H100_X2.replace("550.54.15", "570.86.10"))
    assert other_host["class"] == section["class"]
    assert cpu_machine(nvidia_smi_csv=A100)["class"] != section["class"]
    assert cpu_machine(nvidia_smi_csv=H100_X2.splitlines()[0])["class"] != section["class"]  # one GPU, not two


def test_cuda_visible_devices_chooses_the_gpus_in_its_order():
    uuids = [line.split(", ")[1] for line in H100_X2.splitlines()]
    assert [g["index"] for g in cpu_machine(nvidia_smi_csv=H100_X2, cuda_visible_devices="1")["gpus"]] == [1]
    assert [g["uuid"] for g in cpu_machine(nvidia_smi_csv=H100_X2, cuda_visible_devices="1,0")["gpus"]] == uuids[::-1]
    assert [g["index"] for g in cpu_machine(nvidia_smi_csv=H100_X2, cuda_visible_devices=uuids[1][:12])["gpus"]] == [1]
    for none in ("", "-1", "7"):
        hidden = cpu_machine(nvidia_smi_csv=H100_X2, cuda_visible_devices=none)
        assert hidden["gpus"] == [] and hidden["class"] == cpu_machine()["class"]
        assert hidden["cuda_visible_devices"] == none


def test_class_is_a_hash_of_its_inputs():
    section = cpu_machine()
    assert section["class"] == hardware_class(section["class_inputs"])
    assert hardware_class({"a": 1, "b": 2}) == hardware_class({"b": 2, "a": 1})


def test_this_machine_is_read_without_error():
    section = read_hardware(os.environ)
    assert section["class"] == hardware_class(section["class_inputs"])
    if os.path.exists("/proc/cpuinfo"):
        assert section["cpu"]["logical_cpus"] == os.cpu_count()
        assert section["cpu"]["usable_cpus"] == len(os.sched_getaffinity(0))
