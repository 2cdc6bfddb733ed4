"""OpenFlamingo's forward pass, assembled independently of our modules, to check conversions against.

The `open_flamingo` package pins old versions of torch, transformers and open_clip, so it cannot run beside
this project. This reference follows its equations (open_flamingo/src/helpers.py and flamingo_lm.py) on the
original tensors, read by their OpenFlamingo names:
- CLIP: transformers' `CLIPVisionModel`, last layer, patch tokens only, before `post_layernorm` (what the
  open_clip versions OpenFlamingo pins return as `tokens`);
- the Perceiver Resampler and the gated blocks evaluated straight from checkpoint.pt (fused `to_kv` chunked in
  two, the row maximum subtracted before the softmax, masked scores set to -max, attention of text before any
  image zeroed, `x + tanh(gate) * f(x)`);
- the blocks wrapped around the decoder layers of transformers' `LlamaForCausalLM`, as OpenFlamingo's
  FlamingoLayer does, with each token attending to the image whose count equals its `<image>` count.
"""

from pathlib import Path

import torch
from torch.nn import functional as F
from transformers.utils import logging

from .openflamingo import END_OF_CHUNK, HEAD_DIM, IMAGE_TOKEN, extend_tokenizer, load_checkpoint


def _layer_norm(x, state, prefix):
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=1e-5)


def _heads(x, heads):  # (..., n, heads * d) -> (..., heads, n, d)
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def perceiver(state, x):
    """x (b, T, v, D) -> latents (b, T, n, D)."""
    latents = state["perceiver.latents"].expand(*x.shape[:2], -1, -1)
    depth = len({k.split(".")[2] for k in state if k.startswith("perceiver.layers.")})
    for i in range(depth):
        p = f"perceiver.layers.{i}"
        media, lat = _layer_norm(x, state, f"{p}.0.norm_media"), _layer_norm(latents, state, f"{p}.0.norm_latents")
        heads = state[f"{p}.0.to_q.weight"].shape[0] // HEAD_DIM
        q = _heads(lat @ state[f"{p}.0.to_q.weight"].T, heads) * HEAD_DIM**-0.5
        k, v = (_heads(t, heads) for t in (torch.cat([media, lat], -2) @ state[f"{p}.0.to_kv.weight"].T).chunk(2, -1))
        sim = q @ k.transpose(-1, -2)
        attn = (sim - sim.amax(-1, keepdim=True)).softmax(-1)
        out = (attn @ v).transpose(-3, -2).flatten(-2)
        latents = latents + out @ state[f"{p}.0.to_out.weight"].T
        hidden = F.gelu(_layer_norm(latents, state, f"{p}.1.0") @ state[f"{p}.1.1.weight"].T)
        latents = latents + hidden @ state[f"{p}.1.3.weight"].T
    return _layer_norm(latents, state, "perceiver.norm")


def gated_block(state, prefix, x, media, text_time):
    """x (B, T, D), media (B, T_img, n, Dv), text_time (B, T): the image count at each token."""
    heads = state[f"{prefix}.attn.to_q.weight"].shape[0] // HEAD_DIM
    q = _heads(_layer_norm(x, state, f"{prefix}.attn.norm") @ state[f"{prefix}.attn.to_q.weight"].T, heads)
    n = media.shape[2]
    k, v = (_heads(t, heads) for t in (media.flatten(1, 2) @ state[f"{prefix}.attn.to_kv.weight"].T).chunk(2, -1))
    sim = (q * HEAD_DIM**-0.5) @ k.transpose(-1, -2)  # (B, h, T, T_img * n)
    media_time = torch.arange(media.shape[1], device=x.device).repeat_interleave(n) + 1
    sees = text_time[:, None, :, None] == media_time  # only the most recent image
    sim = sim.masked_fill(~sees, -torch.finfo(sim.dtype).max)
    attn = (sim - sim.amax(-1, keepdim=True)).softmax(-1)
    attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
    out = (attn @ v).transpose(1, 2).flatten(-2) @ state[f"{prefix}.attn.to_out.weight"].T
    x = x + out * state[f"{prefix}.attn_gate"].tanh()
    hidden = F.gelu(_layer_norm(x, state, f"{prefix}.ff.0") @ state[f"{prefix}.ff.1.weight"].T)
    return x + hidden @ state[f"{prefix}.ff.3.weight"].T * state[f"{prefix}.ff_gate"].tanh()


class _FlamingoLayer(torch.nn.Module):
    """A decoder layer with OpenFlamingo's gated block in front; conditioned through `owner`, as in OpenFlamingo."""

    def __init__(self, owner, prefix: str, decoder_layer):
        super().__init__()
        self.prefix, self.decoder_layer = prefix, decoder_layer
        self.owner = [owner]  # a list: not a submodule

    def forward(self, hidden_states, *args, **kwargs):
        owner = self.owner[0]
        hidden_states = gated_block(owner.state, self.prefix, hidden_states, owner.media, owner.text_time)
        return self.decoder_layer(hidden_states, *args, **kwargs)


class OpenFlamingoReference(torch.nn.Module):
    def __init__(self, checkpoint: Path, vision: Path, language: Path, converted_model, dtype=torch.float32):
        super().__init__()
        from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

        self.state = {k: v.to(dtype) for k, v in load_checkpoint(Path(checkpoint)).items()}
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # a CLIPModel folder: its text half is expected to go unused
        try:
            self.clip = CLIPVisionModel.from_pretrained(vision, dtype=dtype).eval()
        finally:
            logging.set_verbosity(verbosity)
        self.llama = LlamaForCausalLM.from_pretrained(language, dtype=dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(language)
        extend_tokenizer(self.tokenizer)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.end_of_chunk_id = self.tokenizer.convert_tokens_to_ids(END_OF_CHUNK)
        old = self.llama.get_input_embeddings().weight.shape[0]
        self.llama.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        with torch.no_grad():
            embed = self.state.get("lang_encoder.model.embed_tokens.weight")
            if embed is not None:
                self.llama.get_input_embeddings().weight.copy_(embed)
            # The output rows of the added tokens were never trained: the converter's draws are used.
            self.llama.get_output_embeddings().weight[old:] = converted_model.get_output_embeddings().weight[old:]
        layers = self.llama.model.layers
        for i in range(len(layers)):
            prefix = f"lang_encoder.model.layers.{i}.gated_cross_attn_layer"
            if f"{prefix}.attn_gate" in self.state:
                layers[i] = _FlamingoLayer(self, prefix, layers[i])
        self.media = self.text_time = None

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, T_img, 3, H, W) -> resampled media (B, T_img, n, Dv)."""
        B, T = pixel_values.shape[:2]
        tokens = self.clip(pixel_values.flatten(0, 1)).last_hidden_state[:, 1:]  # patches, before post_layernorm
        return perceiver(self.state, tokens.unflatten(0, (B, T)))

    def forward(self, input_ids, pixel_values, attention_mask=None, **kwargs):
        self.media = self.encode_images(pixel_values)
        self.text_time = (input_ids == self.image_token_id).cumsum(-1)
        try:
            return self.llama(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            self.media = self.text_time = None

    @torch.no_grad()
    def generate(self, input_ids, pixel_values, max_new_tokens=8, eos_token_ids=(), **kwargs):
        """Greedy, recomputing the whole sequence each step (no cache): slow and simple."""
        for _ in range(max_new_tokens):
            next_token = self(input_ids, pixel_values).logits[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, next_token], dim=1)
            if int(next_token) in eos_token_ids:
                break
        return input_ids
