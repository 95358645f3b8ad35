"""CPU topology, SIMD flags, memory, and the thread plan derived from them.

Why: llama.cpp decode scales with *physical* cores and falls off a cliff when oversubscribed,
so the thread count must come from the cores this process may really use (affinity, cgroup
quota), one thread per physical core, never from ``os.cpu_count()``.

Reading the machine (``read_topology``, ``allowed_cpus``, ``cgroup_cpu_quota``) is kept apart
from deciding (``plan_threads``), which is a pure function so tests can feed it any topology.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

# CPU flag (as /proc/cpuinfo spells it) -> feature name as llama.cpp's system info prints it.
SIMD_FLAG_TO_GGML = {
    "pni": "SSE3",
    "ssse3": "SSSE3",
    "avx": "AVX",
    "avx2": "AVX2",
    "f16c": "F16C",
    "fma": "FMA",
    "bmi2": "BMI2",
    "avx_vnni": "AVX_VNNI",
    "avx512f": "AVX512",
    "avx512vbmi": "AVX512_VBMI",
    "avx512_vnni": "AVX512_VNNI",
    "avx512_bf16": "AVX512_BF16",
    "amx_int8": "AMX_INT8",
}

# Features whose kernels ggml also serves from a wider one: a build with the wider one lacks nothing.
SUBSUMED_BY = {"AVX_VNNI": "AVX512_VNNI"}

SIMD_FLAGS_OF_INTEREST = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512bw",
    "avx512vl", "avx512dq", "avx512cd", "avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_int8",
)


@dataclass(frozen=True)
class LogicalCPU:
    """One logical CPU (hardware thread) and the physical core and NUMA node it belongs to."""

    id: int
    package: int
    core: int
    node: int = 0

    @property
    def physical_core(self) -> tuple[int, int]:
        return (self.package, self.core)


@dataclass(frozen=True)
class Topology:
    cpus: tuple[LogicalCPU, ...]
    flags: frozenset[str] = frozenset()
    model_name: str = "unknown"

    @property
    def physical_cores(self) -> int:
        return len({c.physical_core for c in self.cpus})

    @property
    def logical_cpus(self) -> int:
        return len(self.cpus)

    @property
    def numa_nodes(self) -> tuple[int, ...]:
        return tuple(sorted({c.node for c in self.cpus}))

    @property
    def numa_summary(self) -> str:
        """How many NUMA nodes and which, for people: "1 (node 0)", "2 (nodes 0, 1)"."""
        nodes = self.numa_nodes
        if not nodes:
            return "unknown"
        return f"{len(nodes)} (node{'s' if len(nodes) > 1 else ''} {', '.join(map(str, nodes))})"

    @property
    def smt(self) -> bool:
        return self.logical_cpus > self.physical_cores

    @property
    def simd(self) -> tuple[str, ...]:
        return tuple(f for f in SIMD_FLAGS_OF_INTEREST if f in self.flags)


@dataclass(frozen=True)
class ThreadPlan:
    """How many threads llama.cpp gets and which logical CPUs the process is pinned to."""

    threads: int
    batch_threads: int
    pin_cpus: tuple[int, ...] | None
    usable_physical_cores: int
    usable_logical_cpus: int
    notes: tuple[str, ...] = field(default=())


def _read_int(path: Path, default: int = 0) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default


def _parse_cpulist(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _read_cpuinfo(path: Path) -> tuple[frozenset[str], str]:
    flags: frozenset[str] = frozenset()
    model = "unknown"
    try:
        text = path.read_text()
    except OSError:
        return flags, model
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = frozenset(value.split())
        elif key == "model name" and model == "unknown":
            model = value.strip()
    return flags, model


def read_topology(sys_root: str | Path = "/sys/devices/system",
                  cpuinfo: str | Path = "/proc/cpuinfo") -> Topology:
    """Read the kernel's CPU topology (sysfs) and flags (/proc/cpuinfo)."""
    sys_root = Path(sys_root)
    node_of: dict[int, int] = {}
    for node_dir in sorted((sys_root / "node").glob("node[0-9]*")):
        try:
            node_cpus = _parse_cpulist((node_dir / "cpulist").read_text())
        except OSError:
            continue
        for cpu in node_cpus:
            node_of[cpu] = int(node_dir.name[4:])
    cpus = []
    for cpu_dir in sorted((sys_root / "cpu").glob("cpu[0-9]*"), key=lambda p: int(p.name[3:])):
        cpu_id = int(cpu_dir.name[3:])
        topo = cpu_dir / "topology"
        if not topo.exists():
            continue  # offline CPU
        cpus.append(LogicalCPU(
            id=cpu_id,
            package=_read_int(topo / "physical_package_id"),
            core=_read_int(topo / "core_id", cpu_id),
            node=node_of.get(cpu_id, 0),
        ))
    if not cpus:  # no sysfs (exotic container): one core per CPU the OS reports
        cpus = [LogicalCPU(id=i, package=0, core=i) for i in range(os.cpu_count() or 1)]
    flags, model = _read_cpuinfo(Path(cpuinfo))
    return Topology(cpus=tuple(cpus), flags=flags, model_name=model)


def allowed_cpus() -> set[int]:
    """Logical CPUs this process may run on (its affinity mask)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _v2_quota(directory: Path) -> float | None:
    try:
        fields = (directory / "cpu.max").read_text().split()
        return None if fields[0] == "max" else int(fields[0]) / int(fields[1])
    except (OSError, ValueError, IndexError, ZeroDivisionError):
        return None


def _own_cgroup_dirs(root: Path, self_cgroup: Path) -> list[Path]:
    """This process's cgroup v2 directory and its ancestors up to ``root`` (a host's slices)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    rel = next((line[3:].strip("/") for line in lines if line.startswith("0::")), "")
    here = root / rel
    dirs = [here]
    while here != root and root in here.parents:
        here = here.parent
        dirs.append(here)
    return dirs


def cgroup_cpu_quota(root: str | Path = "/sys/fs/cgroup",
                     self_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """CPUs' worth of time the cgroup allows (e.g. 2.5), or None when unlimited.

    cgroup v2: the tightest ``cpu.max`` on the path from this process's cgroup up to the root;
    cgroup v1: ``cpu.cfs_quota_us / cpu.cfs_period_us``.
    """
    root = Path(root)
    quotas = [q for q in (_v2_quota(d) for d in _own_cgroup_dirs(root, Path(self_cgroup)))
              if q is not None]
    if quotas:
        return min(quotas)
    quota_us = _read_int(root / "cpu" / "cpu.cfs_quota_us", -1)
    period_us = _read_int(root / "cpu" / "cpu.cfs_period_us", 0)
    if quota_us > 0 and period_us > 0:
        return quota_us / period_us
    return None


def plan_threads(topology: Topology, allowed: set[int] | None = None,
                 cpu_quota: float | None = None, *, threads: int | None = None,
                 batch_threads: int | None = None, pin: bool = True) -> ThreadPlan:
    """One generation thread per usable physical core; pin one logical CPU per core.

    ``threads``/``batch_threads`` override the count (``None`` = auto). Pinning is proposed only
    where it changes something: when SMT siblings or CPUs beyond the thread count would otherwise
    share the work.
    """
    usable = [c for c in topology.cpus if allowed is None or c.id in allowed]
    if not usable:
        usable = list(topology.cpus)
    notes: list[str] = []
    first_cpu_of_core: dict[tuple[int, int], int] = {}
    for cpu in sorted(usable, key=lambda c: (c.node, c.package, c.core, c.id)):
        first_cpu_of_core.setdefault(cpu.physical_core, cpu.id)
    cores = len(first_cpu_of_core)
    auto = cores
    if cpu_quota is not None and cpu_quota < cores:
        auto = max(1, math.floor(cpu_quota))
        notes.append(f"cgroup CPU quota {cpu_quota:g} limits threads to {auto}")
    if len(usable) > cores:
        notes.append(f"{len(usable) - cores} SMT sibling(s) left idle: decode is bound by cores")
    n_threads = threads if threads is not None else auto
    if threads is not None and threads > auto:
        notes.append(f"{threads} threads requested on {auto} usable core(s): oversubscribed")
    n_batch = batch_threads if batch_threads is not None else n_threads
    pin_cpus: tuple[int, ...] | None = None
    if pin and n_threads <= cores:
        # Take cores in (node, package, core) order so a partial plan fills one NUMA node
        # before spilling onto the next, whatever the kernel's CPU numbering.
        chosen = tuple(sorted(list(first_cpu_of_core.values())[:n_threads]))
        if set(chosen) != {c.id for c in usable}:
            pin_cpus = chosen
    return ThreadPlan(threads=n_threads, batch_threads=n_batch, pin_cpus=pin_cpus,
                      usable_physical_cores=cores, usable_logical_cpus=len(usable),
                      notes=tuple(notes))


def this_machine_plan(*, threads: int | None = None, batch_threads: int | None = None,
                      pin: bool = True) -> ThreadPlan:
    return plan_threads(read_topology(), allowed_cpus(), cgroup_cpu_quota(),
                        threads=threads, batch_threads=batch_threads, pin=pin)


def apply_pinning(plan: ThreadPlan) -> bool:
    """Pin this process to the plan's CPUs; returns whether the affinity changed."""
    if not plan.pin_cpus:
        return False
    try:
        if set(os.sched_getaffinity(0)) == set(plan.pin_cpus):
            return False
        os.sched_setaffinity(0, plan.pin_cpus)
        return True
    except (AttributeError, OSError):
        return False


@dataclass(frozen=True)
class Memory:
    total_bytes: int
    available_bytes: int


def memory() -> Memory:
    import psutil

    vm = psutil.virtual_memory()
    return Memory(total_bytes=vm.total, available_bytes=vm.available)


def parse_system_info(text: str) -> dict[str, bool]:
    """Parse llama.cpp's ``llama_print_system_info()`` into {feature: enabled}."""
    features: dict[str, bool] = {}
    for part in text.replace("\n", "|").split("|"):
        if "=" not in part:
            continue
        name, _, value = part.rpartition("=")
        name = name.split(":")[-1].strip()
        value = value.strip()
        if name and value.isdigit():
            features[name] = value != "0"
    return features


def missing_build_features(cpu_flags: frozenset[str], build: dict[str, bool]) -> list[str]:
    """SIMD features the CPU has but the llama.cpp build does not use."""
    missing = []
    for flag, feature in SIMD_FLAG_TO_GGML.items():
        if flag not in cpu_flags or build.get(feature):
            continue
        wider = SUBSUMED_BY.get(feature)
        if wider and build.get(wider):
            continue
        missing.append(feature)
    return missing
