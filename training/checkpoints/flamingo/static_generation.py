"""Static decoding: the one fast decode path every family shares, `model.generate(..., static_decode=True)`.

transformers' `generate` rebuilds the causal mask, the positions and the cache bookkeeping, and runs a chain of
logits processors and stopping checks, at every step; for small models (and on a GPU for any model at batch 1) that
per-step overhead, not reading the weights, sets the speed. Here the prompt runs once through the family's own
forward (images, M-RoPE, Flamingo's image keys/values: exactly as in `generate`); its keys and values are copied
into buffers allocated once per request shape; and each step then has fixed shapes: the token's embedding, its
rotary tables from a per-row position, a mask read from a preallocated validity buffer at the step's index, the
layers writing their keys and values in place, the LM head. On CUDA that step is captured once in a CUDA graph per
(batch size, length bucket) and replayed. Elsewhere a greedy step also chooses the next token itself (EOS held
back, finished rows padded), so one call per token runs nothing else; sampling (the usual filters on the device
with a seeded generator), repetition penalty and stop strings choose outside the step.

Axes: B batch, T prompt tokens, L buffer length (prompt + new tokens, rounded up to a bucket), V vocabulary,
Hkv key/value heads, d head dim.
"""

import functools
import threading
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import eager_attention
from .input_checks import check_input_ids

# Generation-config options the static path applies. Others with a non-default value send the call back to
# transformers' `generate` with a clear error, never silently ignored.
SUPPORTED_OPTIONS = {
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k", "top_p",
    "repetition_penalty", "eos_token_id", "pad_token_id", "bos_token_id", "stop_strings", "use_cache",
    "return_dict_in_generate", "num_beams", "num_return_sequences",
}  # fmt: skip
# Bucket lengths of the graph and compiled steps: one serves every request whose prompt + new tokens fit the bucket.
MIN_BUCKET = 256
# How a decode step runs: "eager" (op by op), "graph" (captured once in a CUDA graph and replayed: the default on
# CUDA) or "compiled" (torch.compile of the step, once per shape: on CPU it fuses the step's small ops, a few tens
# of seconds of compilation per shape for several times fewer dispatches per token).
STEP_MODES = ("eager", "graph", "compiled")


def bucket_length(needed: int, limit: int, bucketed: bool) -> int:
    """Buffer length for `needed` positions: exact for the eager step (nothing to reuse, shorter attention), else
    the next power of two from MIN_BUCKET, so a handful of captured graphs or compiled steps serve every length;
    never past `limit`."""
    if not bucketed:
        return needed
    length = MIN_BUCKET
    while length < needed:
        length *= 2
    return max(needed, min(length, limit))


# ----------------------------------------------------------------------------------------------------------
# Choosing tokens


@dataclass(frozen=True)
class Sampling:
    """Greedy or sampled, with transformers' filters in transformers' order: repetition penalty, temperature,
    top-k, top-p; `min_new_tokens` holds EOS back."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    @classmethod
    def from_config(cls, config) -> "Sampling":
        if not config.do_sample:
            return cls(repetition_penalty=config.repetition_penalty)
        return cls(True, config.temperature or 1.0, config.top_k, config.top_p, config.repetition_penalty)

    def scores(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """logits (B, V) float32 -> filtered scores (B, V); `seen` (B, V) bool: tokens already in each row."""
        scores = logits
        if self.repetition_penalty not in (None, 1.0) and seen is not None:
            penalised = torch.where(scores < 0, scores * self.repetition_penalty, scores / self.repetition_penalty)
            scores = torch.where(seen, penalised, scores)
        if not self.do_sample:
            return scores
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k is not None and 0 < self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k).values[..., -1:]  # (B, 1)
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            ascending, order = torch.sort(scores, descending=False)
            cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= 1 - self.top_p
            remove[..., -1] = False  # the most likely token always stays
            scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        return scores

    def choose(self, scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Filtered scores (B, V) -> the next token of each row (B,)."""
        if not self.do_sample:
            return scores.argmax(dim=-1)
        probabilities = scores.softmax(dim=-1)
        return torch.multinomial(probabilities, num_samples=1, generator=generator).squeeze(1)


# ----------------------------------------------------------------------------------------------------------
# Buffers and the fixed-shape step


class StaticKeysValues:
    """Every decoder layer's keys and values (B, Hkv, L, d), allocated once; `update` writes this step's at
    `write_at` and returns the whole buffers (what `DecoderAttention` expects of a cache)."""

    def __init__(self, num_layers: int, batch: int, heads: int, length: int, head_dim: int, dtype, device):
        shape = (num_layers, batch, heads, length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx].index_copy_(2, self.write_at, keys.to(self.keys.dtype))
        self.values[layer_idx].index_copy_(2, self.write_at, values.to(self.values.dtype))
        return self.keys[layer_idx], self.values[layer_idx]

    def load(self, cache: DynamicCache, num_layers: int) -> int:
        """Copy a prefill's keys and values in; returns the prompt length."""
        for i in range(num_layers):
            layer = cache.layers[i]
            length = layer.keys.shape[2]
            self.keys[i, :, :, :length].copy_(layer.keys)
            self.values[i, :, :, :length].copy_(layer.values)
        return length


def base_rotary_dim(model) -> int:
    rotary = model.model.language_model.rotary_emb
    return rotary.inv_freq.shape[0] * 2


def compile_for_inference(function, dynamic: bool | None = False, **inductor_options):
    """torch.compile of one model's inference function: a decoder's step (`dynamic=False`: once per shape, as one
    CUDA graph per shape) or the model's prompt pass (`dynamic=None`: first for the shape it meets, then once with
    symbolic lengths when another comes).

    - Each function's compiled code is its own (isolate_recompiles). Otherwise every decoder (every model) would
      share the cache of the method's code object: eight of them would exhaust its recompile limit, and another
      model's code could be looked up for this one.
    - Its guards on module attributes (training flags, hooks: a few hundred checks, 0.2-0.4 ms of a 2 ms step on a
      small CPU) are dropped: that code serves one model, in inference mode, and the tensors it reads, parameters
      included, are still checked at every call.
    - inductor's `decompose_mm_pass` writes a one-row matrix product (batch 1: every projection of a step) as a
      fused multiply-and-sum in its own C++ instead of a call into the BLAS library, whose fixed cost per call
      is most of the time of such a product at these widths (0.5 ms of 22 calls per step, measured).
    `inductor_options` add to these.
    """
    options = {
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
        "post_grad_fusion_options": {"decompose_mm_pass": {}},
        **inductor_options,
    }
    return torch.compile(function, dynamic=dynamic, isolate_recompiles=True, options=options)


class StaticDecoder:
    """Buffers (and, on CUDA, a captured graph) for one model at one (batch, length) shape; reused by every
    request of that shape. Not shared by two requests at once: `DecoderPool` hands each its own."""

    def __init__(self, model, batch: int, length: int, mode: str):
        text = model.config.text_config
        weight = model.get_input_embeddings().weight
        self.model, self.batch, self.length = model, batch, length
        self.device, self.dtype = weight.device, weight.dtype
        self.num_layers = text.num_hidden_layers
        self.cache = StaticKeysValues(
            self.num_layers, batch, text.num_key_value_heads, length, text.head_dim, self.dtype, self.device
        )
        self.key_valid = torch.zeros(batch, length, dtype=torch.bool, device=self.device)  # real prompt tokens
        self.slots = torch.arange(length, device=self.device)  # (L,)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.index = torch.zeros((), dtype=torch.long, device=self.device)  # where this step's token goes
        self.start_index = torch.zeros((), dtype=torch.long, device=self.device)  # where the prompt ends
        rotary_dim = base_rotary_dim(model)
        self.cos = torch.zeros(batch, length, rotary_dim, dtype=self.dtype, device=self.device)
        self.sin = torch.zeros(batch, length, rotary_dim, dtype=self.dtype, device=self.device)
        self.images = None  # the family's image context (Flamingo: keys/values, visibility state), reused
        # One query over a short buffer: on CPU the plain softmax kernel costs a fraction of sdpa's CPU kernel,
        # whose fixed cost per call dominates a step of a small model.
        # Flash kernels take a padding mask they unpad on the host, which a CUDA graph cannot hold: sdpa instead.
        if self.device.type == "cpu":
            self.attention = {"attention_function": eager_attention}
        elif text._attn_implementation in ("eager", "sdpa"):
            self.attention = {}
        else:
            self.attention = {"attention_function": ALL_ATTENTION_FUNCTIONS["sdpa"]}
        # Greedy steps choose each row's next token inside the step: one call per token, nothing read back.
        vocab = model.get_output_embeddings().weight.shape[0]
        self.chosen = torch.zeros(batch, length, dtype=torch.long, device=self.device)  # (B, L): tokens, by step
        self.produced = torch.zeros((), dtype=torch.long, device=self.device)  # tokens chosen so far
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=self.device)
        self.is_eos = torch.zeros(vocab, dtype=torch.bool, device=self.device)  # (V,)
        self.min_new = torch.zeros((), dtype=torch.long, device=self.device)  # EOS is held back before this
        self.pad = torch.zeros((), dtype=torch.long, device=self.device)
        self.mode = mode
        self.graph, self.logits = None, None
        self.compiled_step = compile_for_inference(self.forward_step) if mode == "compiled" else None
        self.compiled_greedy_step = compile_for_inference(self.greedy_step) if mode == "compiled" else None

    def start(self, prefill, attention_mask: torch.Tensor | None) -> None:
        """Load a prefill's outputs: its keys and values, which prompt positions are real, where decoding
        continues, and the family's image context."""
        next_position = self.model.model.next_positions(prefill, attention_mask)
        prompt_length = self.cache.load(prefill.cache, self.num_layers)
        self.key_valid.fill_(True)
        if attention_mask is not None:
            self.key_valid[:, :prompt_length].copy_(attention_mask.to(torch.bool))
        self.index.fill_(prompt_length)
        self.start_index.fill_(prompt_length)
        # Every step's rotary tables at once (B, L - T, r): a step then only reads its row.
        steps = torch.arange(self.length - prompt_length, device=self.device)
        positions = next_position.view(self.batch, 1).to(self.device) + steps  # (B, L - T)
        cos, sin = self.model.model.language_model.rotary_emb(positions, self.dtype)
        self.cos[:, : cos.shape[1]].copy_(cos)
        self.sin[:, : sin.shape[1]].copy_(sin)
        images = self.model.model.static_images(prefill, self.images)
        if images is not self.images:  # new image buffers: a captured step would read the old ones
            self.graph, self.images = None, images

    def forward_step(self) -> torch.Tensor:
        """The fixed-shape step: `token` (B, 1) at `index` -> logits (B, V) float32. Captured as is."""
        base = self.model.model
        hidden_states = base.get_input_embeddings()(self.token)  # (B, 1, D)
        step = (self.index - self.start_index).view(1)
        position_embeddings = self.cos.index_select(1, step), self.sin.index_select(1, step)  # each (B, 1, r)
        visible = self.key_valid & (self.slots <= self.index)  # (B, L): real prompt tokens and those generated
        mask = visible[:, None, None, :]  # (B, 1, 1, L), True = attend
        self.cache.write_at.copy_(self.index.view(1))
        image_context = self.images.step(self.token) if self.images is not None else None
        hidden_states = base.run_layers(
            hidden_states, position_embeddings, mask, self.cache, image_context, **self.attention
        )
        hidden_states = base.language_model.norm(hidden_states)
        return self.model.lm_head(hidden_states[:, -1]).float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the chosen tokens (B,) and return the next logits (B, V) float32; advances the index."""
        self.token.copy_(tokens.view(self.batch, 1))
        if self.mode == "graph":
            if self.graph is None:
                self.capture()
            self.graph.replay()
            logits = self.logits
        elif self.compiled_step is not None:
            logits = self.compiled_step()
        else:
            logits = self.forward_step()
        self.index += 1
        return logits

    def start_greedy(self, sequences: torch.Tensor, unfinished: torch.Tensor, eos: torch.Tensor | None, pad: int,
                     min_new: int) -> None:  # fmt: skip
        """Hand the tokens chosen so far (B, n) to `greedy_step`, with what it needs to choose the rest."""
        done = sequences.shape[1]
        self.chosen[:, :done].copy_(sequences)
        self.produced.fill_(done)
        self.unfinished.copy_(unfinished)
        self.is_eos.zero_()
        if eos is not None:
            self.is_eos[eos[eos < self.is_eos.shape[0]]] = True  # an id past the vocabulary is never generated
        self.min_new.fill_(min_new)
        self.pad.fill_(pad)
        self.token.copy_(sequences[:, -1:])

    def greedy_step(self) -> None:
        """Run the step for `token`, then choose each row's next token as the greedy loop would (EOS held back
        before `min_new`, finished rows padded), record it in `chosen` and feed it to the next step."""
        logits = self.forward_step()  # (B, V)
        self.index.add_(1)
        held = self.is_eos & (self.produced < self.min_new)  # (V,)
        tokens = logits.masked_fill(held, float("-inf")).argmax(dim=-1)  # (B,)
        tokens = torch.where(self.unfinished, tokens, self.pad)
        self.chosen.index_copy_(1, self.produced.view(1), tokens.view(self.batch, 1))
        self.unfinished.logical_and_(~self.is_eos[tokens])
        self.token.copy_(tokens.view(self.batch, 1))
        self.produced.add_(1)

    def advance_greedy(self) -> None:
        """One greedy step: the compiled one when this decoder has it, else `greedy_step` as written."""
        (self.compiled_greedy_step or self.greedy_step)()

    def capture(self) -> None:
        """Record `forward_step` in a CUDA graph. Its warm-up runs write into the buffers at the current index
        (overwritten by the real step) and advance Flamingo's image state, which is restored after."""
        saved = self.images.snapshot() if self.images is not None else None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward_step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.restore_images(saved)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (a server's other models, the Space's other columns) keep using the device
        # while this one captures; the default would fail their calls for the length of the capture.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = self.forward_step()
        self.restore_images(saved)

    def restore_images(self, saved) -> None:
        if self.images is not None:
            self.images.restore(saved)


class DecoderPool:
    """The model's `StaticDecoder`s by shape, each lent to one request at a time (the Space and a server run
    requests in threads): a busy shape gets another decoder; at most `keep` idle ones are kept."""

    def __init__(self, keep: int = 4):
        self.idle: list[StaticDecoder] = []
        self.keep = keep
        self.lock = threading.Lock()

    def acquire(self, model, batch: int, length: int, mode: str) -> StaticDecoder:
        with self.lock:
            for decoder in self.idle:
                if (decoder.batch, decoder.length, decoder.mode) == (batch, length, mode):
                    self.idle.remove(decoder)
                    return decoder
        return StaticDecoder(model, batch, length, mode)

    def release(self, decoder: StaticDecoder) -> None:
        with self.lock:
            self.idle.insert(0, decoder)
            del self.idle[self.keep :]


# ----------------------------------------------------------------------------------------------------------
# The loop


IGNORED_OPTIONS = SUPPORTED_OPTIONS | {
    "transformers_version",
    "static_decode",
    "cache_implementation",
    "length_penalty",
}
_NOT_SET = object()


@functools.cache
def default_options() -> dict:
    """A default generation config's attributes: what an option is compared with to tell whether it was set."""
    return dict(vars(GenerationConfig()))


def unsupported_options(config) -> list[str]:
    """The options of a generation config that the static path does not implement (empty: it runs it all).
    Read from the config's attributes against the defaults, as `to_diff_dict` would, without its deep copies
    (a millisecond per call, on the path of every request)."""
    defaults = default_options()
    # Falsy values are options switched off (output_scores=False, no_repeat_ngram_size=0, ...).
    unsupported = [
        key for key, value in vars(config).items()
        if key not in IGNORED_OPTIONS and not key.startswith("_") and value
        and (defaults.get(key, _NOT_SET) is _NOT_SET or value != defaults[key])
    ]  # fmt: skip
    if config.num_beams not in (None, 1) or (config.num_return_sequences or 1) != 1:
        unsupported.append("num_beams/num_return_sequences")
    return sorted(unsupported)


def check_options(config) -> None:
    """Refuse what the static path does not implement, naming it (transformers' `generate` does it all)."""
    unsupported = unsupported_options(config)
    if unsupported:
        raise ValueError(
            f"The static decode path does not implement {', '.join(unsupported)}: call generate without "
            "static_decode=True for transformers' own loop"
        )


def eos_ids(config, device) -> torch.Tensor | None:
    eos = config.eos_token_id
    if eos is None:
        return None
    return torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long, device=device)


def static_generate(
    model,
    inputs: dict,
    config,
    *,
    streamer=None,
    tokenizer=None,
    generator: torch.Generator | None = None,
    step_mode: str | None = None,
    compile_prompt: bool = False,
    check_every: int = 8,
) -> torch.Tensor:
    """Generate as transformers' `generate` would with `config` (greedy: the same tokens), on static buffers.
    Returns (B, T + new) token ids, prompt first; rows that finish early are padded with `pad_token_id`, and
    generation stops when every row has finished. Without a streamer or stop strings, "has every row finished"
    is read from the device only every `check_every` steps (the extra steps' tokens are dropped), so the step
    loop does not wait on the host. With `compile_prompt`, the prompt pass runs compiled too (the model's
    `compiled_prompt_pass`): the first token sooner, after a compilation per new kind of prompt."""
    check_options(config)
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise ValueError("The static decode path needs input_ids (embeddings alone have no tokens to track)")
    if inputs.get("image_attention_mask") is not None:
        raise ValueError(
            "The static decode path follows Flamingo's image rule from the <image> tokens; with an explicit "
            "image_attention_mask, call generate without static_decode=True"
        )
    batch, prompt_length = input_ids.shape
    device = model.get_input_embeddings().weight.device
    new_tokens = config.max_new_tokens
    if new_tokens is None:
        new_tokens = config.max_length - prompt_length
    min_new = config.min_new_tokens or max(0, (config.min_length or 0) - prompt_length)
    sampling = Sampling.from_config(config)
    eos = eos_ids(config, device)
    pad = config.pad_token_id if config.pad_token_id is not None else (int(eos[0]) if eos is not None else 0)
    on_cuda = device.type == "cuda"
    step_mode = step_mode or ("graph" if on_cuda else "eager")
    if step_mode not in STEP_MODES or (step_mode == "graph" and not on_cuda):
        raise ValueError(f"step_mode must be one of {', '.join(STEP_MODES)} (graph on CUDA only), not {step_mode!r}")
    limit = model.config.text_config.max_position_embeddings
    length = bucket_length(prompt_length + new_tokens, limit, step_mode != "eager")

    stop_strings = None
    if config.stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings need the tokenizer: pass tokenizer= (as transformers' generate does)")
        stop_strings = StopStrings(tokenizer, config.stop_strings, prompt_length)

    sequences = torch.full((batch, prompt_length + new_tokens), pad, dtype=torch.long, device=device)
    sequences[:, :prompt_length] = input_ids
    seen = None
    if sampling.repetition_penalty not in (None, 1.0):
        seen = torch.zeros(batch, model.config.text_config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids, True)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    if new_tokens <= 0:
        return sequences[:, :prompt_length]
    # Greedy without a repetition penalty or stop strings: the step itself chooses the tokens (not inside a CUDA
    # graph, which captures the forward alone).
    greedy_inside = not sampling.do_sample and seen is None and stop_strings is None and step_mode != "graph"
    attention_mask = inputs.get("attention_mask")
    prompt_pass = model
    if compile_prompt:
        # Checked here, where the bad id can be named; compiled code checks it on the device without naming it.
        check_input_ids(input_ids, model.config.text_config.vocab_size)
        prompt_pass = model.compiled_prompt_pass()
    prefill = prompt_pass(**inputs, use_cache=True, logits_to_keep=1)
    logits = prefill.logits[:, -1].float()
    pool = model.static_decoders()
    decoder = None
    done = 0
    try:
        for step in range(new_tokens):
            scores = logits
            if eos is not None and step < min_new:
                scores = scores.index_fill(1, eos, float("-inf"))
            tokens = sampling.choose(sampling.scores(scores, seen), generator)
            tokens = torch.where(unfinished, tokens, pad)  # a finished row only pads
            sequences[:, prompt_length + step] = tokens
            done = step + 1
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            if streamer is not None:
                streamer.put(tokens.cpu())
            if eos is not None:
                unfinished &= ~torch.isin(tokens, eos)
            if stop_strings is not None:
                unfinished &= ~stop_strings(sequences[:, : prompt_length + done])
            if streamer is not None or stop_strings is not None or done % check_every == 0:
                if not bool(unfinished.any()):
                    break
            if done == new_tokens:
                break
            if decoder is None:  # once the first token is out: its latency does not include filling the buffers
                decoder = pool.acquire(model, batch, length, step_mode)
                decoder.start(prefill, attention_mask)
                prefill = None
            if greedy_inside:
                done = greedy_rest(decoder, sequences, prompt_length, done, new_tokens, unfinished, eos, pad,
                                   min_new, streamer, check_every)  # fmt: skip
                break
            logits = decoder.step(tokens)
    finally:
        if decoder is not None:
            pool.release(decoder)
        if streamer is not None:
            streamer.end()
    # Steps run after every row finished (between checks) are dropped, as transformers would never run them.
    finished_at = finished_lengths(sequences[:, prompt_length : prompt_length + done], eos, stop_strings is None)
    return sequences[:, : prompt_length + min(done, finished_at)]


def greedy_rest(decoder: StaticDecoder, sequences, prompt_length: int, done: int, new_tokens: int, unfinished, eos,
                pad: int, min_new: int, streamer, check_every: int) -> int:  # fmt: skip
    """The rest of a greedy answer, `done` tokens in, each token chosen inside the step; writes them into
    `sequences` and returns how many tokens the answer has now."""
    decoder.start_greedy(sequences[:, prompt_length : prompt_length + done], unfinished, eos, pad, min_new)
    while done < new_tokens:
        decoder.advance_greedy()
        done += 1
        if streamer is not None:
            streamer.put(decoder.token.view(-1).cpu())
        if (streamer is not None or done % check_every == 0) and not bool(decoder.unfinished.any()):
            break
    sequences[:, prompt_length : prompt_length + done] = decoder.chosen[:, :done]
    return done


class StopStrings:
    """Which rows' answers so far hold one of the stop strings, read from the decoded text: the step at which
    transformers' `StopStringCriteria` stops (the one whose token completes the string), for any vocabulary. That
    criterion builds its tables by decoding each token after a probe word, which fails for word-level vocabularies
    such as the shipped models' ("substring not found")."""

    def __init__(self, tokenizer, strings: str | list[str], prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length
        self.strings = [strings] if isinstance(strings, str) else list(strings)

    def __call__(self, sequences: torch.Tensor) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(sequences[:, self.prompt_length :].tolist())
        return torch.tensor([any(s in text for s in self.strings) for text in texts], device=sequences.device)


def finished_lengths(new: torch.Tensor, eos: torch.Tensor | None, by_eos_only: bool) -> int:
    """How many new tokens transformers would have generated: up to the step where the last row ended."""
    steps = new.shape[1]
    if eos is None or not by_eos_only:
        return steps
    is_eos = torch.isin(new, eos)  # (B, n)
    if not bool(is_eos.any(dim=1).all()):
        return steps
    first = torch.where(is_eos, torch.arange(steps, device=new.device), steps).min(dim=1).values  # (B,)
    return int(first.max()) + 1
