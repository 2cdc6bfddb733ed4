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
    from vlm_patterns.conversion.key_mapping import KeyMap

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
    from vlm_patterns.publishing import write_readme_section as write_section

    write_section(readme, f"bench:{key}", content)


# ----------------------------------------------------------------------------------------------------------
# The static decode path ("fast path") against transformers' generate


def generate_call(model, inputs: dict, new_tokens: int, **options) -> Callable[[], object]:
    """One greedy generate of exactly `new_tokens` tokens."""
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **options)
    return lambda: model.generate(**inputs, **options)


def first_call_seconds(fn: Callable[[], object], device: str) -> float:
    """Wall time of a first call: compilation, graph capture and allocation included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class Pairing:
    """One side against the other on the same inputs: each side's time to the first token (s) and decode speed
    (tok/s, from the time difference of generating 1 and 1 + N tokens), medians of paired runs."""

    first: list[float]
    decode: list[float]


def pair_generates(ours, reference, ours_inputs, reference_inputs, new_tokens, repeats, device,
                   ours_options: dict, reference_options: dict) -> Pairing:  # fmt: skip
    with torch.inference_mode():
        first = paired_median_seconds(
            generate_call(ours, ours_inputs, 1, **ours_options),
            generate_call(reference, reference_inputs, 1, **reference_options),
            device,
            repeats,
        )
        many = paired_median_seconds(
            generate_call(ours, ours_inputs, new_tokens + 1, **ours_options),
            generate_call(reference, reference_inputs, new_tokens + 1, **reference_options),
            device,
            repeats,
        )
    return Pairing(first, [new_tokens / (m - o) for m, o in zip(many, first, strict=True)])


def add_fast_path_rows(
    report: Report,
    ours,
    reference,
    ours_inputs: dict,
    reference_inputs: dict,
    new_tokens: int,
    repeats: int,
    device: str,
    decode_target: float | None = None,
    first_token_target: float = 1.0,
    compiled_step: bool = False,
) -> None:
    """Rows "fast path": our static decode path against transformers' `generate` (its default dynamic cache)
    on the same weights and inputs: time to the first token, and decode tokens per second. On CUDA also against
    transformers' best, a static cache with torch.compile, with each side's warm-up (graph capture; compilation)
    measured on its first call. With `compiled_step` (off CUDA), also the static path compiled: its prompt pass
    and its step (`step_mode="compiled", compile_prompt=True`), their compilation measured on its first call; the
    first-token target then applies to that row, and the plain one has none."""
    on_cuda = device.startswith("cuda")
    fast = dict(static_decode=True)
    sides = (ours, reference, ours_inputs, reference_inputs, new_tokens, repeats, device)
    with torch.inference_mode():
        warmup = first_call_seconds(generate_call(ours, ours_inputs, new_tokens + 1, **fast), device)
    plain = pair_generates(*sides, fast, {})
    plain_first_target = None if compiled_step and not on_cuda else first_token_target
    report.add("fast path: time to first token vs generate", "ms", plain.first[0] * 1e3, plain.first[1] * 1e3, False,
               plain_first_target)  # fmt: skip
    report.add(f"fast path: decode, {new_tokens} tokens vs generate", "tok/s", *plain.decode, True, decode_target)
    report.notes.append(
        f"Fast path warm-up (first call, buffers{' and CUDA graph' if on_cuda else ''}): {warmup:.2f} s."
    )
    if compiled_step and not on_cuda:
        step = dict(static_decode=True, step_mode="compiled", compile_prompt=True)
        with torch.inference_mode():
            step_warmup = first_call_seconds(generate_call(ours, ours_inputs, new_tokens + 1, **step), device)
        compiled = pair_generates(*sides, step, {})
        report.add("fast path, compiled: time to first token vs generate", "ms", compiled.first[0] * 1e3,
                   compiled.first[1] * 1e3, False, first_token_target)  # fmt: skip
        report.add(f"fast path, compiled step: decode, {new_tokens} tokens vs generate", "tok/s", *compiled.decode,
                   True, decode_target)  # fmt: skip
        report.notes.append(
            f"Compiled warm-up (first call: torch.compile of the prompt pass and of the step): {step_warmup:.1f} s."
        )
    if not on_cuda:
        return
    compiled = dict(cache_implementation="static")
    try:
        with torch.inference_mode():
            compile_seconds = first_call_seconds(
                generate_call(reference, reference_inputs, new_tokens + 1, **compiled), device
            )
        decode_c = pair_generates(*sides, fast, compiled).decode
        report.add("fast path: decode vs static cache + torch.compile", "tok/s", *decode_c, True, 1.2)
        report.add("fast path: warm-up vs torch.compile's", "s", warmup, compile_seconds, False, 3.0)
    except Exception as error:  # the reference class may not support a static cache; say so, keep the rest
        report.notes.append(f"transformers' static cache + torch.compile did not run here: {error!r}")
        decode_c = plain.decode
    floor = weight_reading_floor(ours, device)
    report.add("fast path: decode vs the weight-reading floor", "tok/s", decode_c[0], floor, True, 0.7)


def run_embedded(family: str, new_tokens: int, repeats: int) -> Report:
    """The shipped checkpoint `training/checkpoints/<family>` (what the Space serves by default), on CPU: our
    static decode path against transformers' `generate` on the very same model, with a picture of the task's."""
    from vlm_patterns import training
    from vlm_patterns.inference import NOT_MODEL_INPUTS, build_inputs, load
    from vlm_patterns.training.synthetic_vqa import held_out_seed, make_example

    folder = Path(training.__path__[0]) / "checkpoints" / family
    model, processor = load(folder)
    report = Report(family, "embedded", "cpu", str(model.dtype).removeprefix("torch."))
    example = make_example(held_out_seed(7), kinds=("color", "shape", "position", "count"))
    inputs = build_inputs(processor, example.images[:1], example.question)
    inputs = {k: v for k, v in dict(inputs).items() if k not in NOT_MODEL_INPUTS}
    report.notes.append(f"{folder.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                        f"{inputs['input_ids'].shape[1]}-token prompt.")  # fmt: skip
    add_fast_path_rows(report, model, model, inputs, inputs, new_tokens, repeats, "cpu", 3.0, first_token_target=2.0,
                       compiled_step=True)  # fmt: skip
    return report


def weight_reading_floor(model, device: str) -> float:
    """Tokens per second if a decode step only read the language model's weights once: one `F.linear` of a
    single token per weight matrix (and the LM head), captured in one CUDA graph and replayed."""
    weights = [
        module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and (".language_model." in f".{name}." or name == "lm_head")
    ]
    inputs = [torch.zeros(1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights]

    def read_all():
        for x, w in zip(inputs, weights, strict=True):
            torch.nn.functional.linear(x, w)

    with torch.inference_mode():
        read_all()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            read_all()
        seconds = median_seconds(graph.replay, device, repeats=20, warmup=3)
    return 1.0 / seconds
