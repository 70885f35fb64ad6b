"""Causal LMs of the GPT-2, Llama (Llama 3, Mistral, Qwen2, Qwen3) and GPT-NeoX families with
a slot KV cache, for serving.

Written like gpt-fast / nanoGPT: a small readable model whose forward takes a packed
step (the new tokens of S sequences laid end to end) and a preallocated KV cache, so
prefill and decode share one code path and nothing is re-encoded. The families differ by a
few switches in ModelArgs (norm, MLP, biases, q/k norm, partial rotary, parallel residual,
sliding window); weights come from a Hugging Face checkpoint through one mapping function per
family (see `from_hf`). Tests check greedy output against `transformers`' `generate` token for
token and logits to 1e-4 (tests/test_model.py, tests/test_model_families.py).

Shapes: T = new tokens in the step (packed), S = sequences in the step,
H = query heads, Hkv = key/value heads, D = head dim, R = rotary dims (<= D), L = cached length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox")
"""HF model_type values from_hf accepts."""
ROPE_TYPES = ("default", "linear", "llama3")
"""HF rope scaling types implemented (rope_inv_freq)."""


@dataclass(frozen=True)
class ModelArgs:
    arch: str  # HF model_type, one of SUPPORTED
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    d_model: int
    d_ff: int
    head_dim: int
    max_position: int
    norm_eps: float
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_params: tuple[tuple[str, float], ...] = ()  # factor etc. of the linear / llama3 scalings
    rotary_dim: int = 0           # R: leading dims of each head RoPE rotates (GPT-NeoX rotary_pct); 0: all
    tie_embeddings: bool = True
    attn_bias: bool = True        # q/k/v projections (Qwen2: True, o_proj has none)
    o_bias: bool = True
    mlp_bias: bool = True
    act: str = "silu"             # "silu": gated SwiGLU MLP; "gelu" / "gelu_tanh": plain up-act-down
    qk_norm: bool = False         # Qwen3: RMSNorm over each head's q and k before RoPE
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    sliding_window: int | None = None  # Mistral: a query at p sees keys p - W < k <= p

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED:
            raise ValueError(f"unsupported architecture {self.arch!r} (supported: {', '.join(SUPPORTED)})")
        if self.n_head % self.n_kv_head:
            raise ValueError("n_head must be a multiple of n_kv_head")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope scaling type {self.rope_type!r} is not supported ({', '.join(ROPE_TYPES)} are)")
        if self.act not in ("silu", "gelu", "gelu_tanh"):
            raise ValueError(f"activation {self.act!r} is not supported")

    @property
    def rms_norm(self) -> bool:
        return self.arch not in ("gpt2", "gpt_neox")


def args_from_hf_config(cfg) -> ModelArgs:
    """Maps a transformers config of a SUPPORTED model_type to ModelArgs; refuses what we do not implement."""
    mt = cfg.model_type
    if mt not in SUPPORTED:
        raise ValueError(f"model_type {mt!r} is not supported; supported model types: {', '.join(SUPPORTED)}")
    if mt == "gpt2":
        return _gpt2_args(cfg)
    return _neox_args(cfg) if mt == "gpt_neox" else _llama_args(cfg)


def _gpt2_args(cfg) -> ModelArgs:
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False):
        raise ValueError("gpt2 options scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
    if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"gpt2 activation {cfg.activation_function!r} is not supported")
    return ModelArgs(arch="gpt2", vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_kv_head=cfg.n_head, d_model=cfg.n_embd, d_ff=cfg.n_inner or 4 * cfg.n_embd,
                     head_dim=cfg.n_embd // cfg.n_head, max_position=cfg.n_positions,
                     norm_eps=cfg.layer_norm_epsilon, act="gelu_tanh", tie_embeddings=True)


def _rope_config(cfg) -> tuple[dict, str]:
    """(HF rope parameters, rope type): transformers 5 keeps them in `rope_parameters`, 4.x in
    `rope_scaling` (with `rope_theta` beside it); types we do not implement are refused by name."""
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rtype = rope.get("rope_type", rope.get("type")) or "default"
    if rtype not in ROPE_TYPES:
        raise ValueError(f"{cfg.model_type} rope scaling type {rtype!r} is not supported ({', '.join(ROPE_TYPES)} are)")
    return rope, rtype


def _rope_params(cfg, rope: dict, rtype: str) -> tuple[tuple[str, float], ...]:
    if rtype == "linear":
        return (("factor", float(rope["factor"])),)
    if rtype == "llama3":   # original_max_position_embeddings defaults as in HF standardize_rope_params
        orig = rope.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None) \
            or cfg.max_position_embeddings
        return tuple((k, float(rope[k])) for k in ("factor", "low_freq_factor", "high_freq_factor")) + (
            ("original_max_position_embeddings", float(orig)),)
    return ()


def _sliding_window(cfg) -> int | None:
    """Mistral applies its window in every layer; Qwen2/3 only with use_sliding_window (then in
    layers >= max_window_layers, which we do not implement). A window no shorter than the model's
    context changes nothing."""
    w = getattr(cfg, "sliding_window", None)
    if w is None or w >= cfg.max_position_embeddings:
        return None
    if cfg.model_type == "mistral":
        return int(w)
    types = getattr(cfg, "layer_types", None)     # transformers 5 lists each layer's kind
    if ("sliding_attention" in types) if types else getattr(cfg, "use_sliding_window", False):
        raise ValueError(f"{cfg.model_type} with use_sliding_window (window {w} < context "
                         f"{cfg.max_position_embeddings}, per layer type) is not supported")
    return None


def _llama_args(cfg) -> ModelArgs:
    """Llama, Mistral, Qwen2, Qwen3: RMSNorm, SwiGLU, RoPE over the whole head."""
    mt = cfg.model_type
    rope, rtype = _rope_config(cfg)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{mt} partial_rotary_factor is not supported")
    if cfg.hidden_act != "silu":
        raise ValueError(f"{mt} activation {cfg.hidden_act!r} is not supported")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    qkv_bias = True if mt == "qwen2" else bool(getattr(cfg, "attention_bias", False))
    return ModelArgs(arch=mt, vocab_size=cfg.vocab_size, n_layer=cfg.num_hidden_layers,
                     n_head=cfg.num_attention_heads, n_kv_head=cfg.num_key_value_heads or cfg.num_attention_heads,
                     d_model=cfg.hidden_size, d_ff=cfg.intermediate_size, head_dim=head_dim,
                     max_position=cfg.max_position_embeddings, norm_eps=cfg.rms_norm_eps,
                     rope_theta=float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))),
                     rope_type=rtype, rope_params=_rope_params(cfg, rope, rtype),
                     tie_embeddings=bool(cfg.tie_word_embeddings), attn_bias=qkv_bias,
                     o_bias=qkv_bias and mt != "qwen2", mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
                     act="silu", qk_norm=mt == "qwen3", sliding_window=_sliding_window(cfg))


def _neox_args(cfg) -> ModelArgs:
    """GPT-NeoX / Pythia: LayerNorm, GELU MLP, RoPE on the first rotary_pct of each head, parallel residual."""
    rope, rtype = _rope_config(cfg)
    acts = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
    if cfg.hidden_act not in acts:
        raise ValueError(f"gpt_neox activation {cfg.hidden_act!r} is not supported")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    pct = rope.get("partial_rotary_factor", getattr(cfg, "rotary_pct", 1.0))
    theta = rope.get("rope_theta", getattr(cfg, "rotary_emb_base", 10000.0))
    bias = bool(getattr(cfg, "attention_bias", True))
    return ModelArgs(arch="gpt_neox", vocab_size=cfg.vocab_size, n_layer=cfg.num_hidden_layers,
                     n_head=cfg.num_attention_heads, n_kv_head=cfg.num_attention_heads, d_model=cfg.hidden_size,
                     d_ff=cfg.intermediate_size, head_dim=head_dim, max_position=cfg.max_position_embeddings,
                     norm_eps=cfg.layer_norm_eps, rope_theta=float(theta), rope_type=rtype,
                     rope_params=_rope_params(cfg, rope, rtype), rotary_dim=int(head_dim * pct),
                     tie_embeddings=bool(cfg.tie_word_embeddings), attn_bias=bias, o_bias=bias, mlp_bias=True,
                     act=acts[cfg.hidden_act], parallel_residual=bool(cfg.use_parallel_residual))


def rope_inv_freq(a: ModelArgs) -> torch.Tensor:
    """(R/2,) inverse frequencies, computed as HF modeling_rope_utils does for a.rope_type
    (default, linear: Chen et al. 2023 position interpolation, llama3: Llama 3.1's smoothed
    low-frequency scaling) so that fp32 results match bit for bit."""
    dim = a.rotary_dim or a.head_dim
    inv = 1.0 / (a.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    p = dict(a.rope_params)
    if a.rope_type == "linear":
        return inv / p["factor"]
    if a.rope_type == "llama3":
        factor, lo, hi, old = (p[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings"))
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)       # long wavelengths: divided
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled        # in between: interpolated
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
    return inv


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # same order of operations as HF LlamaRMSNorm: normalise in fp32, scale in input dtype
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (T, h, D); cos/sin: (T, 1, R); rotate-half convention of HF Llama on the first R dims
    # (GPT-NeoX's partial rotary; the other D - R pass through)
    R = cos.shape[-1]
    xr = x[..., :R]
    x1, x2 = xr.chunk(2, dim=-1)
    out = xr * cos + torch.cat((-x2, x1), dim=-1) * sin
    return out if R == x.shape[-1] else torch.cat((out, x[..., R:]), dim=-1)


@dataclass
class StepLayout:
    """Where the T packed tokens of a step go. Sequences occupy the contiguous cache slots
    [slot0, slot0 + S), so the cache is read through views, never gathered or copied."""

    slot0: int
    seq_lens: list[int]    # new tokens per sequence, S entries
    start_pos: list[int]   # cached tokens per sequence before this step
    positions: torch.Tensor  # (T,) absolute position of each new token
    tok_seq: torch.Tensor    # (T,) sequence index 0..S-1 of each token
    tok_col: torch.Tensor    # (T,) index of the token within its sequence's new tokens
    mask: torch.Tensor | None  # (S, 1, Q, L) bool, True = attend; None when decode-only
    kv_len: int            # L = max(start_pos + seq_len)
    decode_pad: torch.Tensor | None = None  # (S, 1, 1, L) decode-only steps: True = key beyond the sequence; None: none

    @staticmethod
    def build_decode(slot0: int, start_pos: list[int], device: torch.device) -> "StepLayout":
        """A decode-only step: one new token per sequence, so no (S, Q, L) mask; the key mask
        is built once here for all layers."""
        S = len(start_pos)
        starts = torch.tensor(start_pos, device=device)
        kv_len = max(start_pos) + 1
        pad = None
        if any(s != kv_len - 1 for s in start_pos):   # sequence i sees its own start_pos_i + 1 keys
            pad = (torch.arange(kv_len, device=device)[None, :] > starts[:, None])[:, None, None, :]
        ar = torch.arange(S, device=device)
        return StepLayout(slot0, [1] * S, list(start_pos), starts, ar, torch.zeros_like(ar), None, kv_len, pad)

    @staticmethod
    def build(slot0: int, seq_lens: list[int], start_pos: list[int], device: torch.device) -> "StepLayout":
        S = len(seq_lens)
        lens = torch.tensor(seq_lens, device=device)
        starts = torch.tensor(start_pos, device=device)
        tok_seq = torch.repeat_interleave(torch.arange(S, device=device), lens)
        offsets = torch.cumsum(lens, 0) - lens
        tok_col = torch.arange(int(lens.sum()), device=device) - offsets[tok_seq]
        positions = starts[tok_seq] + tok_col
        kv_len = max(s + n for s, n in zip(start_pos, seq_lens))
        q = max(seq_lens)
        # query j of seq i sees keys 0..start_i + j; padded queries (j >= n_i) see key 0 only (no NaN rows)
        qpos = starts[:, None] + torch.arange(q, device=device)[None, :]          # (S, Q)
        qpos = torch.where(torch.arange(q, device=device)[None, :] < lens[:, None], qpos, torch.zeros_like(qpos))
        mask = torch.arange(kv_len, device=device)[None, None, :] <= qpos[:, :, None]  # (S, Q, L)
        return StepLayout(slot0, list(seq_lens), list(start_pos), positions, tok_seq, tok_col, mask[:, None], kv_len)


class KVCache:
    """Preallocated keys and values: (n_layer, slots, Hkv, max_ctx, D) each."""

    def __init__(self, args: ModelArgs, slots: int, max_ctx: int, dtype: torch.dtype, device: torch.device):
        shape = (args.n_layer, slots, args.n_kv_head, max_ctx, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_ctx = slots, max_ctx

    def write_index(self, lay: "StepLayout") -> torch.Tensor:
        """(T * Hkv,) rows of a layer's cache viewed as (slots * Hkv * max_ctx, D) that the step's
        tokens write: computed once per step, then one index_copy_ per layer and tensor (several
        times faster than advanced-indexing assignment on CPU)."""
        hkv = self.k.shape[2]
        slots = lay.tok_seq + lay.slot0                                              # (T,)
        heads = torch.arange(hkv, device=slots.device)
        return ((slots[:, None] * hkv + heads[None, :]) * self.max_ctx + lay.positions[:, None]).reshape(-1)

    def write(self, layer: int, idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (T, Hkv, D) into the rows idx (write_index) of layer `layer`."""
        D = k.shape[-1]
        self.k[layer].view(-1, D).index_copy_(0, idx, k.reshape(-1, D).to(self.k.dtype))
        self.v[layer].view(-1, D).index_copy_(0, idx, v.reshape(-1, D).to(self.v.dtype))

    def move(self, src: int, dst: int, length: int) -> None:
        """Copies one slot's first `length` positions to another (keeps live slots contiguous)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def swap(self, a: int, b: int, len_a: int, len_b: int) -> None:
        """Exchanges two slots: slot a's first len_a positions go to b, slot b's first len_b to a."""
        for t in (self.k, self.v):
            tmp = t[:, a, :, :len_a].clone()               # (n_layer, Hkv, len_a, D)
            t[:, a, :, :len_b] = t[:, b, :, :len_b]
            t[:, b, :, :len_a] = tmp


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.q_proj = nn.Linear(a.d_model, a.n_head * a.head_dim, bias=a.attn_bias)
        self.k_proj = nn.Linear(a.d_model, a.n_kv_head * a.head_dim, bias=a.attn_bias)
        self.v_proj = nn.Linear(a.d_model, a.n_kv_head * a.head_dim, bias=a.attn_bias)
        self.o_proj = nn.Linear(a.n_head * a.head_dim, a.d_model, bias=a.o_bias)
        if a.qk_norm:   # over D, shared by the heads
            self.q_norm, self.k_norm = RMSNorm(a.head_dim, a.norm_eps), RMSNorm(a.head_dim, a.norm_eps)

    def forward(self, x, lay: StepLayout, cache: KVCache, layer: int, rope, kv_idx: torch.Tensor) -> torch.Tensor:
        a, T = self.a, x.shape[0]
        q = self.q_proj(x).view(T, a.n_head, a.head_dim)
        k = self.k_proj(x).view(T, a.n_kv_head, a.head_dim)
        v = self.v_proj(x).view(T, a.n_kv_head, a.head_dim)
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = _rope(q, *rope), _rope(k, *rope)
        S = len(lay.seq_lens)
        cache.write(layer, kv_idx, k, v)
        keys = cache.k[layer, lay.slot0:lay.slot0 + S, :, :lay.kv_len]    # (S, Hkv, L, D) view
        vals = cache.v[layer, lay.slot0:lay.slot0 + S, :, :lay.kv_len]
        gqa = a.n_head != a.n_kv_head
        if lay.mask is None:  # decode: one query per sequence, T == S
            # Plain matmuls, not SDPA: with one query per sequence, SDPA's CPU flash kernel cost
            # ~1.1 ms a layer at batch 32 (10% of a GPT-2-small step); this is a few times less.
            # The G = H / Hkv queries that share a KV head sit in the "query" dimension (GQA).
            G = a.n_head // a.n_kv_head
            att = torch.matmul(q.view(S, a.n_kv_head, G, a.head_dim), keys.transpose(-1, -2))  # (S, Hkv, G, L)
            att = att * a.head_dim ** -0.5
            if lay.decode_pad is not None:
                att = att.masked_fill(lay.decode_pad, float("-inf"))
            o = torch.matmul(att.softmax(-1), vals).view(S, a.n_head, a.head_dim)           # (S, H, D)
        else:
            Q = lay.mask.shape[2]
            qs = q.new_zeros(S, Q, a.n_head, a.head_dim)
            qs[lay.tok_seq, lay.tok_col] = q
            o = F.scaled_dot_product_attention(qs.transpose(1, 2), keys, vals, attn_mask=lay.mask, enable_gqa=gqa)
            o = o.transpose(1, 2)[lay.tok_seq, lay.tok_col]               # (T, H, D)
        return self.o_proj(o.reshape(T, a.n_head * a.head_dim))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.act = a.act
        if a.act == "silu":
            self.gate_proj = nn.Linear(a.d_model, a.d_ff, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.d_model, a.d_ff, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.d_ff, a.d_model, bias=a.mlp_bias)

    def forward(self, x):
        if self.act == "silu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh" if self.act == "gelu_tanh" else "none"))


def _norm(a: ModelArgs, dim: int) -> nn.Module:
    return RMSNorm(dim, a.norm_eps) if a.rms_norm else nn.LayerNorm(dim, eps=a.norm_eps)


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.parallel = a.parallel_residual
        self.ln1, self.attn, self.ln2, self.mlp = _norm(a, a.d_model), Attention(a), _norm(a, a.d_model), MLP(a)

    def forward(self, x, lay, cache, layer, rope, kv_idx):
        h = self.attn(self.ln1(x), lay, cache, layer, rope, kv_idx)
        if self.parallel:   # GPT-NeoX: both branches read x (summed in HF's order)
            return self.mlp(self.ln2(x)) + h + x
        x = x + h
        return x + self.mlp(self.ln2(x))


class CausalLM(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.embed = nn.Embedding(a.vocab_size, a.d_model)
        self.pos_embed = nn.Embedding(a.max_position, a.d_model) if a.arch == "gpt2" else None
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.n_layer))
        self.norm = _norm(a, a.d_model)
        self.lm_head = nn.Linear(a.d_model, a.vocab_size, bias=False)
        if a.arch != "gpt2":
            self.register_buffer("inv_freq", rope_inv_freq(a), persistent=False)

    def _rope(self, positions: torch.Tensor):
        if self.args.arch == "gpt2":
            return None
        freqs = positions.float()[:, None] * self.inv_freq[None, :]    # (T, R/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.embed.weight.dtype
        return emb.cos()[:, None, :].to(dtype), emb.sin()[:, None, :].to(dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, lay: StepLayout, cache: KVCache,
                logits_for: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (T,) -> logits (len(logits_for), V) at the token indices `logits_for` (all if None).
        Writes the step's keys and values into the cache."""
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(lay.positions)
        rope = self._rope(lay.positions)
        kv_idx = cache.write_index(lay)
        W = self.args.sliding_window
        if W is not None and lay.kv_len > W:
            lay = _windowed(lay, W)
        for i, blk in enumerate(self.blocks):
            x = blk(x, lay, cache, i, rope, kv_idx)
        if logits_for is not None:
            x = x[logits_for]
        return self.lm_head(self.norm(x)).float()


def _windowed(lay: StepLayout, W: int) -> StepLayout:
    """The step's masks narrowed to Mistral's sliding window: a query at position p sees keys
    p - W < k <= p (HF masking_utils.sliding_window_overlay). Built once per step."""
    dev = lay.positions.device
    keys = torch.arange(lay.kv_len, device=dev)
    starts = torch.tensor(lay.start_pos, device=dev)
    if lay.mask is None:   # decode: query position = start_pos
        old = (keys[None, :] <= (starts - W)[:, None])[:, None, None, :]          # (S, 1, 1, L)
        return replace(lay, decode_pad=old if lay.decode_pad is None else lay.decode_pad | old)
    Q = lay.mask.shape[2]
    cols = torch.arange(Q, device=dev)[None, :]
    qpos = torch.where(cols < torch.tensor(lay.seq_lens, device=dev)[:, None], starts[:, None] + cols, 0)  # (S, Q)
    return replace(lay, mask=lay.mask & (keys[None, None, :] > qpos[:, :, None] - W)[:, None])


_GPT2_MAP = {"wte": "embed", "wpe": "pos_embed", "ln_f": "norm", "ln_1": "ln1", "ln_2": "ln2",
             "attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}


def transposed(w: torch.Tensor, tile: int = 256) -> torch.Tensor:
    """w.t().contiguous() of a 2-D w, (I, O) -> (O, I), copied in tile x tile blocks. A plain transposed
    copy walks one side with a stride of a whole row and ran at ~1.4 GB/s on the 2-core Xeon; 256 x 256
    fp32 blocks (256 KB) stay in L2 on both sides: ~3.6 GB/s. GPT-2's Conv1D weights (340 MB in GPT-2
    small) are transposed on every load, a hot swap's included: 0.23 -> 0.09 s (bench/RESULTS.md)."""
    I, O = w.shape
    out = torch.empty((O, I), dtype=w.dtype, device=w.device)
    for o in range(0, O, tile):
        for i in range(0, I, tile):
            out[o:o + tile, i:i + tile].copy_(w[i:i + tile, o:o + tile].t())
    return out


def _gpt2_state(sd: dict, a: ModelArgs) -> dict:
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("transformer.")
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias") or k == "lm_head.weight":
            continue
        k = k.replace("h.", "blocks.", 1) if k.startswith("h.") else k
        if ".attn.c_attn." in k:  # Conv1D (in, out) fused qkv -> three Linear (out, in)
            base, kind = k.split(".attn.c_attn.")
            parts = v.split(a.d_model, dim=-1)   # weight (in, 3 * out) or bias (3 * out,)
            for name, part in zip(("q", "k", "v"), parts):
                out[f"{base}.attn.{name}_proj.{kind}"] = transposed(part) if kind == "weight" else part.contiguous()
            continue
        conv = k.endswith(".weight") and any(s in k for s in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
        for old, new in _GPT2_MAP.items():
            k = k.replace(old, new)
        out[k] = transposed(v) if conv else v
    out["lm_head.weight"] = out["embed.weight"]
    return out


def _llama_state(sd: dict, a: ModelArgs) -> dict:
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("model.")
        k = (k.replace("embed_tokens", "embed").replace("layers.", "blocks.")
             .replace("self_attn.", "attn.").replace("input_layernorm", "ln1")
             .replace("post_attention_layernorm", "ln2"))
        out[k] = v
    if a.tie_embeddings or "lm_head.weight" not in out:
        out["lm_head.weight"] = out["embed.weight"]
    return out


_NEOX_MAP = {"embed_in": "embed", "final_layer_norm": "norm", "layers.": "blocks.", "input_layernorm": "ln1",
             "post_attention_layernorm": "ln2", "attention.dense": "attn.o_proj", "mlp.dense_h_to_4h": "mlp.up_proj",
             "mlp.dense_4h_to_h": "mlp.down_proj", "embed_out": "lm_head"}


def _neox_state(sd: dict, a: ModelArgs) -> dict:
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("gpt_neox.")
        if k.endswith(".attention.bias") or k.endswith(".attention.masked_bias") or "rotary_emb" in k:
            continue
        for old, new in _NEOX_MAP.items():
            k = k.replace(old, new)
        if ".attention.query_key_value." in k:
            # fused rows are laid out per head: (H, 3, D, ...) = [q_h; k_h; v_h] for each head h
            # (HF GPTNeoXAttention: view(..., H, 3 * D) then chunk(3) on the last dim)
            base, kind = k.split(".attention.query_key_value.")
            parts = v.view(a.n_head, 3, a.head_dim, *v.shape[1:]).unbind(1)   # 3 x (H, D, ...)
            for name, part in zip(("q", "k", "v"), parts):
                out[f"{base}.attn.{name}_proj.{kind}"] = part.reshape(a.n_head * a.head_dim, *v.shape[1:]).contiguous()
            continue
        out[k] = v
    if a.tie_embeddings or "lm_head.weight" not in out:
        out["lm_head.weight"] = out["embed.weight"]
    return out


_STATE_MAPS = {"gpt2": _gpt2_state, "gpt_neox": _neox_state}   # the Llama-likes: _llama_state


def from_hf(hf_model) -> CausalLM:
    """Builds a CausalLM with the weights of a transformers causal LM of a SUPPORTED model_type."""
    a = args_from_hf_config(hf_model.config)
    sd = _STATE_MAPS.get(a.arch, _llama_state)(hf_model.state_dict(), a)
    dtype = next(hf_model.parameters()).dtype
    m = CausalLM(a).to(dtype)
    if a.arch != "gpt2":   # the cast rounded the RoPE frequencies too: keep them fp32, as transformers does
        m.inv_freq = rope_inv_freq(a)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "inv_freq"]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return m.eval()


class PackedLinear(nn.Module):
    """Inference-only Linear whose weight is prepacked once for oneDNN (CPU, fp32).

    Dense input in, dense output out (`mkldnn._linear_pointwise` on a weight from
    `mkldnn._reorder_linear_weight`, the pair torch's inductor uses for frozen CPU linears), so
    there is no per-call layout conversion and it serves any number of rows, prefill and decode.
    Why: torch's CPU `F.linear` is MKL sgemm, and MKL runs its AVX2 code on AMD CPUs, while oneDNN
    picks the widest ISA the CPU has. Measured (bench/RESULTS.md, 2 cores): on an AVX-512 AMD EPYC,
    1.03-5.59x the GFLOPS of F.linear over the GPT-2-small shapes at 1-753 rows (e.g. 768x3072 at 32
    rows 0.33 vs 1.22 ms; the square 768x768 at 1 row is a tie); on the AVX2 Intel machines of
    earlier sessions, decode steps ~5% faster.
    Results differ from F.linear by summation order only (<= 1.3e-6 of the output's scale)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.w = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach().contiguous())
        self.b = None if lin.bias is None else lin.bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]).contiguous(), self.w, self.b, "none", [], "")
        return y.view(*shape[:-1], self.out_features)


def pack_for_cpu(m: CausalLM, which: str = "all") -> CausalLM:
    """Replaces Linear layers by PackedLinear on CPU fp32 ('all', 'lm_head' or 'none'); layers that are
    no longer nn.Linear (serve.quantize's int8 ones) stay as they are."""
    p = next(m.parameters())
    if which == "none" or p.device.type != "cpu" or p.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return m
    if which == "lm_head":
        if isinstance(m.lm_head, nn.Linear):
            m.lm_head = PackedLinear(m.lm_head)
        return m
    for name, mod in list(m.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                setattr(mod, cname, PackedLinear(child))
    return m


def num_parameters(m: CausalLM) -> int:
    """Parameters of the checkpoint (a tied lm_head counted once; packed and int8 layers, which hold
    no nn.Parameter, counted by shape)."""
    n = sum(p.numel() for p in m.parameters())
    for name, mod in m.named_modules():
        shaped_only = hasattr(mod, "out_features") and not isinstance(mod, nn.Linear)
        if not shaped_only or (name == "lm_head" and m.args.tie_embeddings):
            continue
        bias = mod.b if isinstance(mod, PackedLinear) else mod.bias()   # torch.ao's quantized Linear: a method
        n += mod.in_features * mod.out_features + (0 if bias is None else bias.numel())
    if isinstance(m.lm_head, nn.Linear) and m.args.tie_embeddings:
        n -= m.lm_head.weight.numel()
    return n


__all__ = ["ModelArgs", "CausalLM", "KVCache", "StepLayout", "from_hf", "args_from_hf_config", "num_parameters",
           "SUPPORTED", "rope_inv_freq"]


def sequence_logits(m: CausalLM, ids: list[int], first: int) -> torch.Tensor:
    """Logits predicting ids[first:] given everything before, (len(ids) - first, V), in one
    prefill on a private one-slot cache (scoring off the request path; the engine's cache is untouched)."""
    p = next(m.parameters())
    cache = KVCache(m.args, 1, len(ids), p.dtype, p.device)
    lay = StepLayout.build(0, [len(ids)], [0], p.device)
    return m(torch.tensor(ids, device=p.device), lay, cache,
             logits_for=torch.arange(first - 1, len(ids) - 1, device=p.device))
