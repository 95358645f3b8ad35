"""tongyi_local.hardware: topology reading, cgroup quota, thread planning, SIMD/build checks.

Topologies are synthesised as fake sysfs trees (``<root>/cpu/cpuN/topology/...``,
``<root>/node/nodeN/cpulist``) plus fake /proc/cpuinfo files under ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tongyi_local.hardware import (cgroup_cpu_quota, missing_build_features, parse_system_info,
                                   plan_threads, read_topology, Topology)

EPYC_FLAGS = " ".join((
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat clflush mmx fxsr sse sse2",
    "ht syscall nx mmxext lm constant_tsc pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt",
    "aes xsave avx f16c rdrand bmi1 avx2 bmi2 avx512f avx512dq avx512cd avx512bw avx512vl",
    "avx512_bf16 avx512vbmi avx512_vnni avx512_bitalg avx512_vpopcntdq"))
XEON_FLAGS = "fpu sse sse2 pni ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 ht"
VM_FLAGS = "fpu sse sse2 pni ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi2 hypervisor"


def write_sysfs(root: Path, cpus: list[tuple[int, int, int]], nodes: dict[int, str],
                offline: tuple[int, ...] = ()) -> Path:
    """cpus: (cpu_id, physical_package_id, core_id); nodes: node id -> cpulist text."""
    for cpu_id, package, core in cpus:
        (topo := root / "cpu" / f"cpu{cpu_id}" / "topology").mkdir(parents=True)
        (topo / "core_id").write_text(f"{core}\n")
        (topo / "physical_package_id").write_text(f"{package}\n")
    for cpu_id in offline:  # offline CPUs keep their sysfs dir but lose topology/
        (root / "cpu" / f"cpu{cpu_id}").mkdir(parents=True)
    (root / "cpu" / "cpufreq").mkdir(parents=True, exist_ok=True)  # must not be taken for a CPU
    for node, cpulist in nodes.items():
        (nd := root / "node" / f"node{node}").mkdir(parents=True)
        (nd / "cpulist").write_text(cpulist + "\n")
    return root


def write_cpuinfo(path: Path, model: str, flags: str, n: int) -> Path:
    path.write_text("\n".join(f"processor\t: {i}\nmodel name\t: {model}\nflags\t\t: {flags}\n"
                              for i in range(n)))
    return path


@pytest.fixture
def epyc(tmp_path):
    """1-socket AMD EPYC, 48 cores / 96 threads: CPU N and N+48 are SMT siblings."""
    root = write_sysfs(tmp_path / "epyc", [(i, 0, i % 48) for i in range(96)], {0: "0-95"})
    return read_topology(root, write_cpuinfo(tmp_path / "epyc" / "cpuinfo",
                                             "AMD EPYC 9454 48-Core Processor", EPYC_FLAGS, 96))


@pytest.fixture
def dual_xeon(tmp_path):
    """2 sockets x 16 cores x 2 threads; core_ids (with gaps) repeat per package; 2 NUMA nodes."""
    core_ids = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 17]
    # 0-15 pkg0, 16-31 pkg1, 32-47 pkg0 siblings, 48-63 pkg1 siblings
    cpus = [(i, (i // 16) % 2, core_ids[i % 16]) for i in range(64)]
    root = write_sysfs(tmp_path / "xeon", cpus, {0: "0-15,32-47", 1: "16-31,48-63"})
    return read_topology(root, write_cpuinfo(tmp_path / "xeon" / "cpuinfo",
                                             "Intel(R) Xeon(R) Gold 6130", XEON_FLAGS, 64))


@pytest.fixture
def small_vm(tmp_path):
    """2 vCPUs, no SMT, no NUMA dir, one offline hot-pluggable CPU slot."""
    root = write_sysfs(tmp_path / "vm", [(0, 0, 0), (1, 0, 1)], {}, offline=(2,))
    return read_topology(root, write_cpuinfo(tmp_path / "vm" / "cpuinfo", "QEMU Virtual CPU",
                                             VM_FLAGS, 2))


# ---------------------------------------------------------------- read_topology

def test_epyc_topology(epyc):
    assert (epyc.logical_cpus, epyc.physical_cores, epyc.numa_nodes) == (96, 48, (0,))
    assert epyc.smt and epyc.model_name == "AMD EPYC 9454 48-Core Processor"
    assert "avx512f" in epyc.simd and "avx512_vnni" in epyc.simd and "avx_vnni" not in epyc.simd
    assert epyc.cpus[48].core == epyc.cpus[0].core == 0


def test_dual_socket_topology(dual_xeon):
    t = dual_xeon
    assert (t.logical_cpus, t.physical_cores, t.numa_nodes) == (64, 32, (0, 1))
    assert t.numa_summary == "2 (nodes 0, 1)"
    assert {c.node for c in t.cpus if c.package == 1} == {1} and t.cpus[16].core == 0


def test_small_vm_topology_skips_offline_and_defaults_node(small_vm):
    assert [c.id for c in small_vm.cpus] == [0, 1]
    assert small_vm.numa_nodes == (0,) and not small_vm.smt
    assert small_vm.numa_summary == "1 (node 0)"  # a count and the list, never a bare "0"
    assert Topology(cpus=()).numa_summary == "unknown"
    assert "avx512f" not in small_vm.flags and "avx2" in small_vm.simd


def test_missing_cpuinfo_gives_no_flags(tmp_path):
    root = write_sysfs(tmp_path / "sys", [(0, 0, 0)], {0: "0"})
    topo = read_topology(root, tmp_path / "nope")
    assert topo.flags == frozenset() and topo.model_name == "unknown" and topo.logical_cpus == 1


def test_read_topology_real_machine():
    topo = read_topology()
    assert 1 <= topo.physical_cores <= topo.logical_cpus
    assert 1 <= plan_threads(topo).threads <= topo.physical_cores


# ---------------------------------------------------------------- plan_threads

def test_epyc_plan_one_thread_per_core_no_siblings(epyc):
    plan = plan_threads(epyc, set(range(96)))
    assert plan.threads == plan.batch_threads == 48
    assert (plan.usable_physical_cores, plan.usable_logical_cpus) == (48, 96)
    assert len(plan.pin_cpus) == 48
    by_id = {c.id: c for c in epyc.cpus}
    assert len({by_id[i].physical_core for i in plan.pin_cpus}) == 48  # no two siblings
    assert plan.pin_cpus == tuple(range(48))
    assert any("48 SMT sibling" in n and "idle" in n for n in plan.notes)


def test_dual_socket_plan_covers_both_packages(dual_xeon):
    plan = plan_threads(dual_xeon)
    assert plan.threads == 32 and plan.usable_physical_cores == 32
    by_id = {c.id: c for c in dual_xeon.cpus}
    pinned = [by_id[i] for i in plan.pin_cpus]
    assert len({c.physical_core for c in pinned}) == 32
    assert {c.package for c in pinned} == {0, 1} and {c.node for c in pinned} == {0, 1}
    assert plan.pin_cpus == tuple(range(32))  # the first thread of every core, no siblings


def test_small_vm_needs_no_pinning(small_vm):
    plan = plan_threads(small_vm, {0, 1}, None)
    assert (plan.threads, plan.batch_threads, plan.pin_cpus, plan.notes) == (2, 2, None, ())


def test_affinity_subset_of_epyc(epyc):
    plan = plan_threads(epyc, {0, 1, 48, 49})
    assert (plan.threads, plan.usable_physical_cores, plan.usable_logical_cpus) == (2, 2, 4)
    assert plan.pin_cpus == (0, 1)
    assert any("2 SMT sibling" in n for n in plan.notes)


def test_affinity_outside_topology_falls_back_to_all(small_vm):
    assert plan_threads(small_vm, {7, 8}).threads == 2


def test_cgroup_quota_limits_threads(epyc):
    plan = plan_threads(epyc, None, 2.5)
    assert plan.threads == 2 and plan.usable_physical_cores == 48
    assert any("quota 2.5 limits threads to 2" in n for n in plan.notes)
    assert plan.pin_cpus == (0, 1)  # two distinct cores
    assert plan_threads(epyc, None, 0.5).threads == 1  # never zero
    assert not any("quota" in n for n in plan_threads(epyc, None, 64.0).notes)


def test_explicit_threads_override(epyc):
    plan = plan_threads(epyc, None, 2.5, threads=8, batch_threads=16)
    assert (plan.threads, plan.batch_threads) == (8, 16)
    assert plan.pin_cpus == tuple(range(8))
    assert any("oversubscribed" in n for n in plan.notes)
    fewer = plan_threads(epyc, threads=4)
    assert fewer.threads == 4 and not any("oversubscribed" in n for n in fewer.notes)


def test_oversubscription_note_and_no_pinning(small_vm):
    plan = plan_threads(small_vm, threads=4)
    assert plan.threads == 4
    assert any("4 threads requested on 2" in n and "oversubscribed" in n for n in plan.notes)
    assert plan.pin_cpus is None  # more threads than cores: pinning would only hurt


def test_pin_false_gives_none(epyc):
    plan = plan_threads(epyc, pin=False)
    assert plan.pin_cpus is None and plan.threads == 48
    assert plan_threads(epyc, threads=60).pin_cpus is None  # oversubscribed: never pin


def test_partial_plan_stays_on_one_numa_node(tmp_path):
    """Sockets enumerated alternately (cpu0 pkg0, cpu1 pkg1, ...): a 16-thread plan on a
    2x16-core box must pin the 16 cores of node 0, not 8 from each node."""
    cpus = [(i, i % 2, (i % 32) // 2) for i in range(64)]
    nodes = {n: ",".join(str(i) for i in range(n, 64, 2)) for n in (0, 1)}
    topo = read_topology(write_sysfs(tmp_path / "sys", cpus, nodes), tmp_path / "none")
    assert topo.numa_nodes == (0, 1) and topo.physical_cores == 32
    plan = plan_threads(topo, threads=16)
    assert plan.pin_cpus == tuple(range(0, 32, 2))
    assert {topo.cpus[i].node for i in plan.pin_cpus} == {0}


# ---------------------------------------------------------------- cgroup_cpu_quota

@pytest.mark.parametrize("text, expected", [
    ("max 100000\n", None), ("250000 100000\n", 2.5), ("200000 100000", 2.0), ("", None),
])
def test_cgroup_v2_cpu_max(tmp_path, text, expected):
    (tmp_path / "cpu.max").write_text(text)
    assert cgroup_cpu_quota(tmp_path) == expected


@pytest.mark.parametrize("quota, period, expected", [
    ("150000", "100000", 1.5), ("-1", "100000", None), ("50000", "0", None),
])
def test_cgroup_v1_cfs(tmp_path, quota, period, expected):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(period + "\n")
    assert cgroup_cpu_quota(tmp_path) == expected


def test_cgroup_missing_files(tmp_path):
    assert cgroup_cpu_quota(tmp_path) is None
    assert cgroup_cpu_quota(tmp_path / "does-not-exist") is None


# ---------------------------------------------------------------- system info / build features

SYSTEM_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 0 | AVX2 = 1 | F16C = 1 | "
               "FMA = 1 | BMI2 = 1 | AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | "
               "AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")


def test_parse_system_info():
    info = parse_system_info(SYSTEM_INFO)
    assert info["SSE3"] is True and info["AVX512"] is True and info["REPACK"] is True
    assert info["AVX_VNNI"] is False
    assert len(info) == 15 and "CPU" not in info and "CPU : SSE3" not in info


def test_parse_system_info_with_prefix_and_non_numeric_values():
    text = ("system_info: n_threads = 8 (n_threads_batch = 8) / 16 | CUDA : ARCHS = 500,610 | "
            "USE_GRAPHS = 1 |\nCPU : AVX2 = 1 | AVX512 = 0 |")
    info = parse_system_info(text)
    assert info == {"USE_GRAPHS": True, "AVX2": True, "AVX512": False}


def test_missing_build_features_avx512_cpu_on_avx2_build(epyc):
    avx512 = ["AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"]
    build = {**parse_system_info(SYSTEM_INFO), **dict.fromkeys(avx512, False)}
    assert missing_build_features(epyc.flags, build) == avx512
    assert missing_build_features(epyc.flags, parse_system_info(SYSTEM_INFO)) == []


def test_avx_vnni_covered_by_avx512_vnni():
    cpu = frozenset({"avx2", "avx_vnni", "avx512f", "avx512_vnni"})
    build = {"AVX2": True, "AVX_VNNI": False, "AVX512": True, "AVX512_VNNI": True}
    assert missing_build_features(cpu, build) == []
    assert missing_build_features(cpu, {**build, "AVX512_VNNI": False}) == [
        "AVX_VNNI", "AVX512_VNNI"]
    assert missing_build_features(frozenset({"amx_int8"}), {}) == ["AMX_INT8"]


def test_cgroup_quota_of_a_nested_v2_cgroup_takes_the_tightest_level(tmp_path):
    root = tmp_path / "cgroup"
    (root / "user.slice" / "app.scope").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "user.slice" / "cpu.max").write_text("300000 100000\n")
    (root / "user.slice" / "app.scope" / "cpu.max").write_text("max 100000\n")
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text("0::/user.slice/app.scope\n")
    assert cgroup_cpu_quota(root, self_cgroup) == 3.0
    self_cgroup.write_text("0::/\n")
    assert cgroup_cpu_quota(root, self_cgroup) is None
