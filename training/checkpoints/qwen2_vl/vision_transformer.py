"""A CLIP-style vision transformer: patches + class token + learned positions, pre-LayerNorm blocks.

Parameter names follow CLIP's checkpoints (`embeddings.patch_embedding`, `pre_layrnorm` [sic],
`encoder.layers.N.self_attn.q_proj`, ...), so converters map whole prefixes. No pattern logic lives here.

Axes: B images, C channels, S image side, P patches (+1 for the class token), D hidden, H heads, d head dim.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import attention_function
from .configuration_backbones import VisionTowerConfig


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        self.config = config
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, C, S, S) -> (B, P + 1, D)."""
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (batch, {', '.join(map(str, expected))}), got {tuple(pixel_values.shape)}"
            )
        B = pixel_values.shape[0]
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)  # (B, P, D)
        cls = self.class_embedding.to(patches.dtype).expand(B, 1, -1)  # (B, 1, D)
        # Called, not read as `.weight`: with offloading (accelerate), a module's weights exist only during its call.
        positions = self.position_embedding(torch.arange(patches.shape[1] + 1, device=patches.device))
        return torch.cat([cls, patches], dim=1) + positions  # (B, P + 1, D)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # every patch sees every patch
        self.num_key_value_groups = 1
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, P, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, P, -1, self.head_dim).transpose(1, 2)  # (B, H, P, d)
        k = self.k_proj(hidden_states).view(B, P, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, P, -1, self.head_dim).transpose(1, 2)
        out, _ = attention_function(self.config)(
            self,
            q,
            k,
            v,
            None,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
        )
        return self.out_proj(out.reshape(B, P, -1))  # (B, P, D)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class VisionEncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states))
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        self.layers = nn.ModuleList([VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class VisionTransformer(nn.Module):
    """Returns the hidden states a family asks for, running only as many layers as those need.

    Hidden state i is the input of layer i (0: the embeddings after `pre_layrnorm`); index L (or -1) is
    the output of the last layer, before `post_layernorm`, the same numbering as transformers'
    `output_hidden_states`. LLaVA reads layer -2, so the last layer is never computed.
    """

    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def hidden_state_index(self, layer: int) -> int:
        """Map a possibly negative hidden-state index to 0..L, or raise."""
        count = self.config.num_hidden_layers + 1
        if not -count <= layer < count:
            raise ValueError(f"vision feature layer {layer} is out of range for a {count - 1}-layer vision tower")
        return layer % count

    def forward(self, pixel_values: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """pixel_values (B, C, S, S) -> the hidden states (B, P + 1, D) at `layers`, in that order."""
        wanted = [self.hidden_state_index(layer) for layer in layers]
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values))
        kept = {0: hidden_states} if 0 in wanted else {}  # hold only the requested states, not all L + 1
        for i, layer in enumerate(self.encoder.layers[: max(wanted)], start=1):
            hidden_states = layer(hidden_states)
            if i in wanted:
                kept[i] = hidden_states
        return [kept[i] for i in wanted]

    def pooled_output(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP's pooled image embedding: `post_layernorm` of the class token after the last layer, (B, D)."""
        (last,) = self.forward(pixel_values, [-1])
        return self.post_layernorm(last[:, 0])
