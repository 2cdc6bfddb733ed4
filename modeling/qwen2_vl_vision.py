"""Qwen2-VL's vision tower: a ViT that reads images at their own resolution.

No fixed grid and, in Qwen2-VL, no learned position table: each patch gets a 2D rotary position (its row and column),
images of different sizes are packed into one sequence and attend only within themselves (block-diagonal
attention, so memory grows with the sum of per-image squares, not the square of the total), and a
PatchMerger joins every 2x2 window of neighbouring patches into one token for the LLM. Qwen3-VL, the pattern's next
step, adds learned absolute positions beside the rotary ones (resampled_positions.py). `num_position_embeddings`
turns them on (`visual.pos_embed`, Qwen3-VL's name); Qwen2-VL's own checkpoints have none.
Parameter names follow `Qwen/Qwen2-VL-*` (`visual.patch_embed.proj`, `visual.blocks.N.attn.qkv`, `visual.merger`).

Axes: I images (or videos), N patches of all images packed, D vision width, H heads, d head dim,
t/h/w the patch grid of one image, m the merge size.
"""

import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import attention_function
from .configuration_qwen2_vl import Qwen2VLVisionTowerConfig
from .resampled_positions import resampled_positions, resampling_taps


def vision_position_ids(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """(row, column) of every patch, (N, 2), in the processor's order: m x m windows, row-major inside each,
    windows row-major over the image, the whole grid repeated for each temporal step."""
    positions = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge_size, merge_size, 1, 1).expand(-1, -1, w // merge_size, merge_size)
        cols = torch.arange(w).view(1, 1, w // merge_size, merge_size).expand(h // merge_size, merge_size, -1, -1)
        # (h/m, m, w/m, m) -> (h/m, w/m, m, m): window-major, then flattened
        hw = torch.stack([rows.permute(0, 2, 1, 3).flatten(), cols.permute(0, 2, 1, 3).flatten()], dim=-1)
        positions.append(hw.repeat(t, 1))
    return torch.cat(positions).to(grid_thw.device)


class VisionRotaryEmbedding2D(nn.Module):
    """Half of each head rotates with the patch row, the other half with its column (same frequencies)."""

    def __init__(self, config: Qwen2VLVisionTowerConfig):
        super().__init__()
        self.half_dim = config.head_dim // 2
        self.theta = config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        exponents = torch.arange(0, self.half_dim, 2, dtype=torch.int64).float() / self.half_dim
        return 1.0 / (self.theta**exponents)  # (d/4,)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (N, 2) -> cos, sin (N, d) in float32."""
        angles = (positions[..., None].float() * self.inv_freq.float()).flatten(1)  # (N, d/2): rows then columns
        angles = torch.cat([angles, angles], dim=-1)  # (N, d)
        return angles.cos(), angles.sin()


def apply_rotary_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, H, d); rotation in float32, as Qwen2-VL trained it."""
    x_float = x.float()
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (N, 1, d)
    x1, x2 = x_float.chunk(2, dim=-1)
    rotated = x_float * cos + torch.cat([-x2, x1], dim=-1) * sin
    return rotated.to(x.dtype)


def block_diagonal_attention(module: nn.Module, q, k, v, lengths: list[int], config) -> torch.Tensor:
    """Attention within each image only. q, k, v (1, H, N, d) packed -> (N, H, d).

    flash-attention gets the packed sequence and cumulative lengths (varlen); other kernels run once per group
    of equally long images, batched, so memory stays at the sum of per-image squares.
    """
    attention = attention_function(config)
    if config._attn_implementation.startswith("flash"):
        cu_seqlens = F.pad(torch.tensor(lengths, device=q.device).cumsum(0), (1, 0)).to(torch.int32)
        out, _ = attention(
            module, q, k, v, None, scaling=module.scaling, is_causal=False,
            cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max(lengths), max_length_k=max(lengths),
        )  # fmt: skip
        return out[0]  # (N, H, d)
    outputs = [None] * len(lengths)
    starts = [0, *itertools.accumulate(lengths)]
    by_length: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        by_length.setdefault(length, []).append(i)
    for length, members in by_length.items():
        group = [
            torch.cat([x[:, :, starts[i] : starts[i] + length] for i in members]) for x in (q, k, v)
        ]  # (G, H, L, d)
        out, _ = attention(module, *group, None, scaling=module.scaling, is_causal=False)  # (G, L, H, d)
        for j, i in enumerate(members):
            outputs[i] = out[j]
    return torch.cat(outputs)  # (N, H, d)


class PatchMerger(nn.Module):
    """LayerNorm, then each m x m window of neighbouring patches (m^2 consecutive rows) -> one LLM token."""

    def __init__(self, config: Qwen2VLVisionTowerConfig):
        super().__init__()
        self.window = config.embed_dim * config.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(self.window, self.window), nn.GELU(), nn.Linear(self.window, config.out_hidden_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.window))  # (N, D) -> (N / m^2, D_text)


class PatchProjection(nn.Conv3d):
    """The checkpoint's Conv3d, applied as what it is here, a matrix product: the kernel equals the stride and each
    row of `pixel_values` is exactly one flattened patch. Done in the module's own call (not by reading its weight
    from outside), so offloading (accelerate), which brings a module's weights in for its call, sees the use."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.linear(pixel_values.to(self.weight.dtype), self.weight.flatten(1))  # (N, C*T*P*P) -> (N, D)


class PatchEmbed(nn.Module):
    def __init__(self, config: Qwen2VLVisionTowerConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = PatchProjection(config.in_channels, config.embed_dim, kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values)


class VisionAttention(nn.Module):
    def __init__(self, config: Qwen2VLVisionTowerConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.scaling = config.head_dim**-0.5
        self.is_causal = False
        self.num_key_value_groups = 1
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)  # each (N, H, d)
        q, k = apply_rotary_2d(q, *rotary), apply_rotary_2d(k, *rotary)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, N, d)
        out = block_diagonal_attention(self, q, k, v, lengths, self.config)
        return self.proj(out.reshape(N, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: Qwen2VLVisionTowerConfig):
        super().__init__()
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.fc1 = nn.Linear(config.embed_dim, hidden)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(GradientCheckpointingLayer):
    def __init__(self, config: Qwen2VLVisionTowerConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rotary, lengths)
        return x + self.mlp(self.norm2(x))


class VisionLayout(NamedTuple):
    """What the grids say, read on the host once per call: each image's patch count (attention stays within it),
    the patches' 2D rotary tables, and where they read the learned positions (None without them)."""

    lengths: list[int]
    rotary: tuple[torch.Tensor, torch.Tensor]
    position_taps: tuple[torch.Tensor, torch.Tensor] | None


class Qwen2VLVisionTower(nn.Module):
    def __init__(self, config: Qwen2VLVisionTowerConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = None
        if config.num_position_embeddings:
            self.add_learned_positions(config.num_position_embeddings)
        self.rotary_pos_emb = VisionRotaryEmbedding2D(config)
        self.blocks = nn.ModuleList([VisionBlock(config) for _ in range(config.depth)])
        self.merger = PatchMerger(config)

    def forward(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, layout: VisionLayout | None = None
    ) -> torch.Tensor:
        """pixel_values (N, C*T*P*P) in the processor's patch order, grid_thw (I, 3) -> (N / m^2, D_text).
        `layout`: what `layout` returns for them, when the caller has it already."""
        layout = layout if layout is not None else self.layout(pixel_values, grid_thw)
        hidden_states = self.embed(pixel_values, layout)
        for block in self.blocks:
            hidden_states = block(hidden_states, layout.rotary, layout.lengths)
        return self.merger(hidden_states)

    def embed(self, pixel_values: torch.Tensor, layout: VisionLayout) -> torch.Tensor:
        """The patches' embeddings (N, D), with the learned positions added where the tower has them."""
        hidden_states = self.patch_embed(pixel_values)
        if self.pos_embed is not None:
            positions = resampled_positions(self.pos_embed, *layout.position_taps)  # each patch's own
            hidden_states = hidden_states + positions.to(hidden_states.dtype)
        return hidden_states

    def add_learned_positions(self, count: int) -> None:
        """Give the tower Qwen3-VL's learned positions, a sqrt(count) x sqrt(count) table (the config says so too,
        so a saved checkpoint has them)."""
        self.config.num_position_embeddings = count
        self.config.validate_vision_shapes()
        self.pos_embed = nn.Embedding(count, self.config.embed_dim)

    # Read from the grids on the host; torch.compile (the static path's compiled prompt pass) runs it as it is
    # and compiles the blocks around it.
    @torch.compiler.disable
    def layout(self, pixel_values: torch.Tensor, grid_thw) -> VisionLayout:
        """Checks the grids against the patches -> what they say (`VisionLayout`)."""
        config = self.config
        if pixel_values.dim() != 2 or pixel_values.shape[1] != config.patch_dim:
            raise ValueError(
                f"pixel_values must have shape (patches, {config.patch_dim}), got {tuple(pixel_values.shape)}"
            )
        grid_thw = torch.as_tensor(grid_thw).view(-1, 3)
        if int(grid_thw.prod(-1).sum()) != pixel_values.shape[0]:
            raise ValueError(
                f"grid_thw describes {int(grid_thw.prod(-1).sum())} patches but pixel_values holds {pixel_values.shape[0]}"
            )
        if bool((grid_thw[:, 1:] % config.spatial_merge_size).any()):
            raise ValueError(f"every grid height and width must be a multiple of {config.spatial_merge_size}")
        # Each temporal step of an image attends to itself only, as Qwen2-VL's cumulative lengths say.
        lengths = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
        grid_thw = grid_thw.to(pixel_values.device)
        positions = vision_position_ids(grid_thw, config.spatial_merge_size)
        rotary = self.rotary_pos_emb(positions)
        taps = None
        if self.pos_embed is not None:
            sizes = grid_thw[:, 1:].repeat_interleave(grid_thw.prod(-1), dim=0)  # each patch's image's (h, w)
            taps = resampling_taps(positions, sizes, math.isqrt(config.num_position_embeddings))
        return VisionLayout(lengths, rotary, taps)
