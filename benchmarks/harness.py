"""Timing, memory and reporting shared by every family's benchmark: ours vs the transformers reference on the
same weights, in one process, medians of repeated runs, ratios computed from numbers measured in this run."""

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: str = "cpu", repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_median_seconds(
    first: Callable[[], object],
    second: Callable[[], object],
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    block: int = 1,
) -> tuple[float, float]:
    """Median wall times of two functions timed in alternating blocks of `block` runs, so load changes on a
    shared machine hit both alike. Blocks longer than one keep each function in its steady state (caches,
    allocator), as a loop over many inputs would; the first run of each block is not timed."""
    for _ in range(warmup):
        first()
        second()
    times = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((first, times[0]), (second, times[1])):
            fn() if block > 1 else None
            for _ in range(block):
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _proc_status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def peak_memory_increase(fn: Callable[[], object], device: str = "cpu") -> int:
    """Bytes by which `fn` raises the peak above the memory in use before it: RSS on CPU (Linux), allocated
    CUDA memory on GPU. Weights already loaded are not counted; activations, caches and buffers are.
    On CPU, run it in a fresh process: memory an earlier run touched stays resident and hides the peak."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    before = _proc_status("VmRSS")
    fn()
    return _proc_status("VmHWM") - before


@dataclass
class Row:
    metric: str
    unit: str
    ours: float
    reference: float
    higher_is_better: bool
    target: float | None = None  # the ratio this metric must reach, if the project sets one

    @property
    def ratio(self) -> float:
        """How many times better ours is (> 1: ours is better)."""
        if min(self.ours, self.reference) <= 0:
            return float("nan")
        if self.higher_is_better:
            return self.ours / self.reference
        return self.reference / self.ours

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        return "meets" if self.ratio >= self.target else "MISSES"


@dataclass
class Report:
    family: str
    preset: str
    device: str
    dtype: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    environment: dict = field(default_factory=dict)

    def __post_init__(self):
        import transformers

        self.environment = {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if self.device.startswith("cuda") else None,
        }

    def add(self, *args, **kwargs) -> None:
        self.rows.append(Row(*args, **kwargs))

    def markdown(self) -> str:
        env = self.environment
        where = env["gpu"] or f"CPU, {env['threads']} threads"
        lines = [
            f"{self.family}, preset `{self.preset}`, {self.dtype}, {where}; torch {env['torch']}, transformers {env['transformers']}",
            "",
            "| metric | ours | transformers | ratio (x better) | target |",
            "|---|---|---|---|---|",
        ]
        for row in self.rows:
            target = f"{row.target:g}x ({row.verdict})" if row.target is not None else ""
            lines.append(
                f"| {row.metric} ({row.unit}) | {row.ours:.4g} | {row.reference:.4g} | {row.ratio:.2f} | {target} |"
            )
        lines += [f"\n{note}" for note in self.notes]
        return "\n".join(lines)

    def to_json(self) -> str:
        data = asdict(self)
        for row, out in zip(self.rows, data["rows"], strict=True):
            out.update(ratio=row.ratio, verdict=row.verdict)
        return json.dumps(data, indent=2)


def ours_sharing_weights(reference: torch.nn.Module, model_class, config, rules, device: str) -> torch.nn.Module:
    """Our model holding the reference's very tensors (no copy), mapped by the converter's key rules (or KeyMap:
    tensors a transform splits, such as a fused QKV, are copies)."""
    from conversion.key_mapping import KeyMap

    with torch.device("meta"):
        ours = model_class(config)
    key_map = rules if isinstance(rules, KeyMap) else KeyMap(rules)
    state = dict(key_map.apply(reference.state_dict().items()))
    ours.load_state_dict(state, strict=True, assign=True)
    for module in ours.modules():  # rotary tables are non-persistent buffers, absent from state dicts
        if hasattr(module, "compute_inv_freq"):
            module.register_buffer("inv_freq", module.compute_inv_freq().to(device), persistent=False)
    ours.tie_weights()
    return ours.eval()


def write_readme_section(readme: Path, key: str, content: str) -> None:
    """Replace the benchmark table `bench:KEY` in the README."""
    from conversion.readme_sections import write_readme_section as write_section

    write_section(readme, f"bench:{key}", content)
