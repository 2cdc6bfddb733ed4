"""Declarative checkpoint conversion: ordered `(regex, replacement)` rules, named tensor transforms, and a
strict check of every produced key and shape against the target model.

A rule's regex must match the whole key; the first matching rule wins; a key no rule matches is an error,
and dropping a key takes an explicit rule with replacement `None`. Transforms act on renamed keys:
`Split` turns one tensor into several (a fused QKV into q, k, v), `Gather` waits for all parts of a
tensor, which may sit in different shards, and joins them (`name#0`, `name#1`, ... -> `name`).
"""

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

Rules = list[tuple[str, str | None]]


@dataclass(frozen=True)
class Split:
    pattern: str
    split: Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Gather:
    pattern: str
    parts: int
    combine: Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass
class KeyMap:
    rules: Rules
    splits: list[Split] = field(default_factory=list)
    gathers: list[Gather] = field(default_factory=list)

    def __post_init__(self):
        self._compiled = [(re.compile(pattern), target) for pattern, target in self.rules]

    def rename(self, key: str) -> str | None:
        for pattern, target in self._compiled:
            match = pattern.fullmatch(key)
            if match:
                return None if target is None else match.expand(target)
        raise KeyError(f"No conversion rule covers the checkpoint key {key!r}")

    def apply(self, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Renamed and transformed (key, tensor) pairs; gathered tensors come out once complete."""
        waiting: dict[str, dict[int, torch.Tensor]] = {}
        for key, tensor in items:
            new_key = self.rename(key)
            if new_key is None:
                continue
            name, _, part = new_key.partition("#")
            if part:
                gather = self._gather_for(name)
                waiting.setdefault(name, {})[int(part)] = tensor
                if len(waiting[name]) == gather.parts:
                    parts = waiting.pop(name)
                    yield from self._split(name, gather.combine([parts[i] for i in range(gather.parts)]))
                continue
            yield from self._split(new_key, tensor)
        if waiting:
            raise KeyError(f"Incomplete tensors, parts missing from the checkpoint: {sorted(waiting)}")

    def _gather_for(self, name: str) -> Gather:
        for gather in self.gathers:
            if re.fullmatch(gather.pattern, name):
                return gather
        raise KeyError(f"{name} is produced in parts but no Gather rule joins it")

    def _split(self, key: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        for split in self.splits:
            if re.fullmatch(split.pattern, key):
                yield from split.split(key, tensor).items()
                return
        yield key, tensor


def check_against(
    produced: Iterable[tuple[str, torch.Tensor]], expected: dict[str, torch.Size]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass tensors through, raising on a key the target lacks or a wrong shape; at the end, on missing keys."""
    seen = set()
    for key, tensor in produced:
        if key not in expected:
            raise KeyError(f"The conversion produced {key!r}, which the target model does not have")
        if tensor.shape != expected[key]:
            raise ValueError(
                f"{key}: the checkpoint has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key])}"
            )
        seen.add(key)
        yield key, tensor
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise KeyError(f"The checkpoint lacks {len(missing)} tensors the model needs: {shown}")


def reverse_rules(prefix_pairs: list[tuple[str, str]]) -> tuple[Rules, Rules]:
    """Forward and backward rules from (source prefix, target prefix) pairs that simply swap prefixes."""
    forward = [(re.escape(src) + "(.*)", target.replace("\\", "\\\\") + r"\1") for src, target in prefix_pairs]
    backward = [(re.escape(target) + "(.*)", src.replace("\\", "\\\\") + r"\1") for src, target in prefix_pairs]
    return forward, backward
