"""A transformers KV cache that holds TurboQuant codes: `model.generate(...,
past_key_values=TurboQuantCache(key_bits=4, value_bits=4))` on any decoder-only model.

Each attention layer keeps its newest tokens in the model dtype, in a residual of up to
`residual_length` tokens, and every older token as TurboQuantizer codes: the packed indices
and float16 norms of a vLLM record (record/layout.py), so a compressed token takes
RecordLayout(head_dim, key_bits, key_mode, value_bits).size bytes per KV head. When an update
takes the residual past `residual_length` tokens, all of it is quantized at once, as
transformers' QuantizedLayer does. Attention reads what the cache holds: the dequantized
codes, then the residual. The current step's tokens are stored before they are read, so with
residual_length=0 every query sees only compressed keys and values, as in the vLLM backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import fields

import torch
from transformers.cache_utils import Cache, DynamicLayer

from tq_vllm.quant.centroids import check_bits
from tq_vllm.quant.quantizer import SERVED_GAIN, TurboCodes, TurboQuantizer, check_mode


def _code_tensors(codes: TurboCodes | None) -> dict[str, torch.Tensor]:
    """The tensors a code holds, by field name (prod mode adds the signs and residual norms)."""
    if codes is None:
        return {}
    return {f.name: t for f in fields(codes) if (t := getattr(codes, f.name)) is not None}


def _cat_codes(old: TurboCodes, new: TurboCodes) -> TurboCodes:
    """Codes of [batch, heads, tokens] vectors, joined along the tokens."""
    return TurboCodes(
        **{
            name: torch.cat([t, getattr(new, name)], dim=2)
            for name, t in _code_tensors(old).items()
        }
    )


def _no_tokens(states: torch.Tensor) -> torch.Tensor:
    # A fresh tensor, not a [..., :0, :] view: a view would keep the flushed residual alive.
    b, h, _, d = states.shape
    return states.new_empty(b, h, 0, d)


class TurboQuantLayer(DynamicLayer):
    """One attention layer's cache: TurboQuant codes of the old tokens, the newest in a
    full-precision residual. Keys use `key_mode` ("mse" or "prod"), values "mse"; both share
    the rotation of `seed`, as a vLLM record does."""

    def __init__(
        self,
        key_bits: int = 4,
        value_bits: int = 4,
        residual_length: int = 128,
        seed: int = 0,
        key_mode: str = "mse",
    ) -> None:
        super().__init__()
        check_bits(key_bits, "key_bits")
        check_bits(value_bits, "value_bits")
        check_mode(key_mode, "key_mode")
        bad = isinstance(residual_length, bool) or not isinstance(residual_length, int)
        if bad or residual_length < 0:
            raise ValueError(f"residual_length must be an integer >= 0, got {residual_length!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.key_bits, self.value_bits, self.key_mode = key_bits, value_bits, key_mode
        self.residual_length, self.seed = residual_length, seed
        self.key_codes: TurboCodes | None = None
        self.value_codes: TurboCodes | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        head_dim = key_states.shape[-1]
        self.key_quantizer = TurboQuantizer(
            head_dim, self.key_bits, self.key_mode, self.seed, self.device, self.dtype, SERVED_GAIN
        )
        self.value_quantizer = TurboQuantizer(
            head_dim, self.value_bits, "mse", self.seed, self.device, self.dtype, SERVED_GAIN
        )
        self.keys, self.values = _no_tokens(key_states), _no_tokens(value_states)
        self.is_initialized = True

    def store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Add tokens [batch, kv_heads, tokens, head_dim]; quantize the residual if it is full."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.keys.shape[-2] > self.residual_length:
            # check=False, as in serving: a non-finite token reads back as zeros rather than
            # stopping the batch, and no host sync per layer and step checks for it.
            keys = self.key_quantizer.quantize(self.keys, check=False)
            values = self.value_quantizer.quantize(self.values, check=False)
            if self.key_codes is None:
                self.key_codes, self.value_codes = keys, values
            else:
                self.key_codes = _cat_codes(self.key_codes, keys)
                self.value_codes = _cat_codes(self.value_codes, values)
            self.keys, self.values = _no_tokens(self.keys), _no_tokens(self.values)

    def key_states(self) -> torch.Tensor:
        """All stored keys [batch, kv_heads, tokens, head_dim]: dequantized, then the residual."""
        return self._read(self.key_quantizer, self.key_codes, self.keys)

    def value_states(self) -> torch.Tensor:
        """All stored values [batch, kv_heads, tokens, head_dim]: dequantized, then the residual."""
        return self._read(self.value_quantizer, self.value_codes, self.values)

    @staticmethod
    def _read(
        quantizer: TurboQuantizer, codes: TurboCodes | None, residual: torch.Tensor
    ) -> torch.Tensor:
        if codes is None:
            return residual
        return torch.cat([quantizer.dequantize(codes), residual], dim=-2)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens, return every stored key and value (what attention reads)."""
        self.store(key_states, value_states)
        return self.key_states(), self.value_states()

    @property
    def compressed_tokens(self) -> int:
        return 0 if self.key_codes is None else self.key_codes.shape[-1]

    def get_seq_length(self) -> int:
        return self.compressed_tokens + self.keys.shape[-2] if self.is_initialized else 0

    def _tensors(self) -> list[torch.Tensor]:
        held = [self.keys, self.values] if self.is_initialized else []
        for codes in (self.key_codes, self.value_codes):
            held += _code_tensors(codes).values()
        return held

    def memory_bytes(self) -> int:
        """Bytes held: the codes (packed indices, float16 norms; in prod mode the QJL signs and
        residual norms too) and the residual tokens at their dtype's width."""
        return sum(t.nbytes for t in self._tensors())

    def uncompressed_bytes(self) -> int:
        """Bytes a DynamicCache would hold for the same tokens: K and V in the model dtype."""
        if not self.is_initialized:
            return 0
        batch, heads, _, head_dim = self.keys.shape
        return 2 * batch * heads * self.get_seq_length() * head_dim * self.keys.element_size()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every held tensor t by fn(t); all have batch on dim 0 and tokens on dim 2."""
        self.keys, self.values = fn(self.keys), fn(self.values)
        for codes in (self.key_codes, self.value_codes):
            for name, t in _code_tensors(codes).items():
                setattr(codes, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # Codes are selected as they are: unlike QuantizedLayer, no lossy re-quantization.
        if self.get_seq_length() > 0:
            self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._apply(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens: -n removes n; a positive n (transformers' legacy form) keeps
        the first n."""
        length = self.get_seq_length()
        keep = min(tokens_to_remove, length) if tokens_to_remove > 0 else length + tokens_to_remove
        keep = max(keep, 0)
        if keep == length:
            return
        residual = max(keep - self.compressed_tokens, 0)
        keys, values = self.keys[:, :, :residual], self.values[:, :, :residual]
        self._apply(lambda t: t[:, :, :keep])
        self.keys, self.values = keys, values

    def reset(self) -> None:
        super().reset()
        self.key_codes = self.value_codes = None


class TurboQuantCache(Cache):
    """A transformers `Cache` of TurboQuantLayer, one per layer, created as the model first
    writes to it (as DynamicCache does without a config):

        cache = TurboQuantCache(key_bits=4, value_bits=4, residual_length=128)
        out = model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
        print(cache.memory_bytes(), cache.uncompressed_bytes())

    Every layer is an attention layer here: models with recurrent (linear-attention) layers
    need transformers' own caches.
    """

    def __init__(
        self,
        key_bits: int = 4,
        value_bits: int = 4,
        residual_length: int = 128,
        seed: int = 0,
        key_mode: str = "mse",
    ) -> None:
        layer = functools.partial(
            TurboQuantLayer, key_bits, value_bits, residual_length, seed, key_mode
        )
        super().__init__(layer_class_to_replicate=layer)
        # Layer 0 now, so that bad arguments fail here rather than inside generate().
        self.layers.append(layer())

    def memory_bytes(self) -> int:
        """Bytes held by all layers (codes and residuals)."""
        return sum(layer.memory_bytes() for layer in self.layers)

    def uncompressed_bytes(self) -> int:
        """Bytes a DynamicCache would hold for the same tokens."""
        return sum(layer.uncompressed_bytes() for layer in self.layers)


class TurboQuantKVCache:
    """One layer's compressed KV cache with the seed project's interface, over a
    TurboQuantLayer. residual_length defaults to 0 here: every token is compressed."""

    def __init__(
        self,
        key_bits: int = 4,
        value_bits: int = 4,
        residual_length: int = 0,
        seed: int = 0,
        key_mode: str = "mse",
    ) -> None:
        self.layer = TurboQuantLayer(key_bits, value_bits, residual_length, seed, key_mode)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys and values [batch, kv_heads, tokens, head_dim]."""
        if keys.dim() != 4 or keys.shape != values.shape:
            raise ValueError(
                "keys and values must both be [batch, kv_heads, tokens, head_dim], got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}"
            )
        self.layer.store(keys, values)

    def _check_stored(self) -> None:
        if self.layer.get_seq_length() == 0:
            raise ValueError("the cache is empty: append keys and values first")

    def attention_scores(self, query: torch.Tensor) -> torch.Tensor:
        """query @ keys^T over all stored tokens, unscaled: [batch, heads, q_tokens, tokens] for
        query [batch, heads, q_tokens, head_dim]. With grouped queries (heads a multiple of
        kv_heads), query head h reads KV head h // (heads / kv_heads), as transformers does."""
        self._check_stored()
        keys = self.layer.key_states()
        kv_heads, head_dim = keys.shape[1], keys.shape[-1]
        if query.dim() != 4 or query.shape[1] % kv_heads or query.shape[-1] != head_dim:
            raise ValueError(
                f"query must be [batch, heads, q_tokens, head_dim] with heads a multiple of "
                f"{kv_heads} and head_dim {head_dim}, got {tuple(query.shape)}"
            )
        keys = keys.repeat_interleave(query.shape[1] // kv_heads, dim=1).to(query.dtype)
        return query @ keys.transpose(-1, -2)

    def get_values(self) -> torch.Tensor:
        """The dequantized values [batch, kv_heads, tokens, head_dim] (the residual as stored)."""
        self._check_stored()
        return self.layer.value_states()

    def memory_usage_bits(self) -> int:
        """Bits held: packed indices and norms of compressed tokens, residual tokens at their
        dtype's width."""
        return 8 * self.layer.memory_bytes()
