"""The architecture registry: lookups, the bundled entries' data, and a fourth family added from a test alone.

The fourth family ("tiny") is defined entirely here, from the shared layers, with its own config,
checkpoint names and registry entry; no library file knows it. It loads from a safetensors file
written in ``tmp_path``, and presets, init, combine, merge and generation work on it.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import lora_jax
import lora_jax.models as models
from lora_jax.models.common.config import pick_fields
from lora_jax.models.common.convert import KeyMap, embed_keys, linear_keys, norm_keys, prefixed
from lora_jax.models.common.layers import ATTENTION_LINEARS, Attention, RMSNorm
from lora_jax.models.registry import Architecture, Build, KVCache, Linear
from lora_jax.paths import flatten, unrolled_key

# --- the fourth family: config, modules, key map, registry entry -------------------------------------------


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    model_type: ClassVar[str] = "tiny"
    vocab: int = 40
    width: int = 16
    depth: int = 2
    heads: int = 2
    ffn: int = 24
    max_len: int = 24
    initializer_range: float = 0.02

    @property
    def num_hidden_layers(self) -> int:
        return self.depth

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @classmethod
    def from_hf(cls, values: dict[str, Any]) -> TinyConfig:
        return cls(**pick_fields(cls, values))


class TinyMLP(nn.Module):
    config: TinyConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"use_bias": False, "dtype": self.dtype, "param_dtype": self.param_dtype}
        h = nn.Dense(self.config.ffn, **kw, name="w_in")(x)
        return nn.Dense(self.config.width, **kw, name="w_out")(jax.nn.gelu(h))


class TinyBlock(models.DecoderBlock):
    config: TinyConfig

    @staticmethod
    def norm(config: TinyConfig, dtype: Any, param_dtype: Any, name: str) -> nn.Module:
        return RMSNorm(1e-6, dtype, param_dtype, name=name)

    def attention(self) -> nn.Module:
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        return Attention(cfg.heads, cfg.heads, cfg.head_dim, use_bias=False, rope_theta=100.0, **kw, name="attention")

    def mlp(self) -> nn.Module:
        return TinyMLP(self.config, self.dtype, self.param_dtype, name="mlp")


class TinyLM(models.CausalLM):
    config: TinyConfig
    block = TinyBlock

    def embed(self, input_ids: jax.Array, positions: jax.Array, deterministic: bool) -> tuple[jax.Array, nn.Embed]:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        tokens = nn.Embed(self.config.vocab, self.config.width, **kw, name="token_embeddings")
        return tokens(input_ids), tokens

    def head(self, x: jax.Array, tokens: nn.Embed) -> jax.Array:
        return tokens.attend(x)


def tiny_keys(model: TinyLM) -> KeyMap:
    """``backbone.tok``, ``backbone.blocks.{i}.{ln_a,mix.w[qkvo],ln_b,ff.w_in,ff.w_out}``, ``backbone.ln_out``."""
    keys: KeyMap = embed_keys("tok", ("token_embeddings",))
    for i in range(model.config.depth):
        hf, fx = f"blocks.{i}", ("decoder", unrolled_key(i))
        keys |= norm_keys(f"{hf}.ln_a", (*fx, "attention_norm"), bias=False)
        for short, proj in (("q", "query"), ("k", "key"), ("v", "value")):
            keys |= linear_keys(f"{hf}.mix.w{short}", (*fx, "attention", proj), 1, bias=False)
        keys |= linear_keys(f"{hf}.mix.wo", (*fx, "attention", "out"), 2, bias=False)
        keys |= norm_keys(f"{hf}.ln_b", (*fx, "mlp_norm"), bias=False)
        keys |= linear_keys(f"{hf}.ff.w_in", (*fx, "mlp", "w_in"), 1, bias=False)
        keys |= linear_keys(f"{hf}.ff.w_out", (*fx, "mlp", "w_out"), 1, bias=False)
    keys |= norm_keys("ln_out", ("final_norm",), bias=False)
    return prefixed(keys, "backbone.")


TINY = Architecture(
    model_type="tiny",
    config=TinyConfig,
    builds=(Build("TinyForCausalLM", TinyLM),),
    key_map=tiny_keys,
    stack="decoder",
    linears=(*ATTENTION_LINEARS, Linear("w_in", "mlp/w_in"), Linear("w_out", "mlp/w_out", parallel="row")),
    prefix="backbone.",
    ignored=(r"blocks\.\d+\.mix\.rotary_cache",),
    cache=KVCache(layers="depth", kv_heads="heads", head_dim="head_dim", max_positions="max_len"),
)
REGISTRY = models.ARCHITECTURES.add(TINY)


def write_checkpoint(path, config: TinyConfig, prefix: str = "backbone.") -> dict[str, np.ndarray]:
    """A random checkpoint in PyTorch layout (Linear weights ``[out, in]``), with one unused buffer."""
    rng = np.random.default_rng(0)
    d, f = config.width, config.ffn

    def draw(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    tensors = {"tok.weight": draw(config.vocab, d), "ln_out.weight": 1 + draw(d, scale=0.1)}
    for i in range(config.depth):
        block = {
            "ln_a.weight": 1 + draw(d, scale=0.1),
            "ln_b.weight": 1 + draw(d, scale=0.1),
            "ff.w_in.weight": draw(f, d),
            "ff.w_out.weight": draw(d, f),
            "mix.rotary_cache": draw(config.max_len, config.head_dim),
            **{f"mix.w{p}.weight": draw(d, d) for p in "qkvo"},
        }
        tensors |= {f"blocks.{i}.{name}": value for name, value in block.items()}
    tensors = {prefix + name: value for name, value in tensors.items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")
    values = {"architectures": ["TinyForCausalLM"], "model_type": "tiny", **dataclasses.asdict(config)}
    (path / "config.json").write_text(json.dumps(values))
    return tensors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    return path, write_checkpoint(path, TinyConfig())


# --- the fourth family at work ----------------------------------------------------------------------------


def test_fourth_family_loads_with_its_own_key_map(tiny):
    path, tensors = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rotary buffer is ignored, nothing is unused or drawn
        model, params = models.from_pretrained(path, registry=REGISTRY)
    assert type(model) is TinyLM and model.config == TinyConfig()
    d, h, dh = 16, 2, 8
    query = params["decoder"]["layer_1"]["attention"]["query"]["kernel"]
    np.testing.assert_array_equal(query, tensors["backbone.blocks.1.mix.wq.weight"].T.reshape(d, h, dh))
    out = params["decoder"]["layer_0"]["attention"]["out"]["kernel"]
    np.testing.assert_array_equal(out, tensors["backbone.blocks.0.mix.wo.weight"].T.reshape(h, dh, d))
    names = {"/".join(p) for p, _ in flatten(params)[0]}
    assert len(names) == 1 + 2 * 8 + 1 and "final_norm/scale" in names
    assert models.hf_names(model, REGISTRY)["decoder/layer_1/mlp/w_in/kernel"][0] == "backbone.blocks.1.ff.w_in.weight"

    scanned_model, scanned = models.from_pretrained(path, scan_layers=True, registry=REGISTRY)
    for a, b in zip(jax.tree.leaves(models.stack_layers(params)), jax.tree.leaves(scanned)):
        np.testing.assert_array_equal(a, b)
    ids = np.array([[1, 5, 7, 3, 2]], np.int32)
    np.testing.assert_allclose(
        model.apply({"params": params}, ids).logits, scanned_model.apply({"params": scanned}, ids).logits, atol=1e-5
    )


def test_fourth_family_without_the_prefix_loads_the_same(tmp_path, tiny):
    path, _ = tiny
    write_checkpoint(tmp_path, TinyConfig(), prefix="")
    _, bare = models.from_pretrained(tmp_path, registry=REGISTRY)
    _, reference = models.from_pretrained(path, registry=REGISTRY)
    for a, b in zip(jax.tree.leaves(bare), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)


def test_fourth_family_presets_init_combine_merge(tiny):
    path, _ = tiny
    model, params = models.from_pretrained(path, registry=REGISTRY)
    spec = models.lora_spec(model, "qv", rank=2, alpha=4.0, registry=REGISTRY)
    names = sorted(t.name for t in lora_jax.plan(params, spec))
    assert names == [f"decoder/layer_{i}/attention/{p}/kernel" for i in range(2) for p in ("query", "value")]
    assert lora_jax.describe(params, spec).adapter_size == 2 * 2 * 2 * (16 + 16)
    assert models.lora_spec(model, "all-linear", registry=REGISTRY).rules[-1].name == "mlp.w_out"

    lora = lora_jax.init(jax.random.key(0), params, spec)
    ids = np.array([[3, 4, 5, 6]], np.int32)
    base = model.apply({"params": params}, ids).logits
    rng = np.random.default_rng(1)
    lora = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(x.dtype), lora)
    combined = model.apply({"params": lora_jax.combine(params, lora, spec)}, ids).logits
    merged = model.apply({"params": lora_jax.merge(params, lora, spec)}, ids).logits
    assert np.abs(combined - base).max() > 1e-3
    np.testing.assert_allclose(combined, merged, atol=1e-5)

    generated = models.generate(model, params, ids, 6, registry=REGISTRY)
    assert generated.shape == (1, 10)
    with pytest.raises(models.ConfigError, match="max_len"):
        models.generate(model, params, ids, 30, registry=REGISTRY)


def test_fourth_family_is_unknown_to_the_default_registry(tiny):
    path, _ = tiny
    assert "TinyForCausalLM" not in models.ARCHITECTURES and "TinyForCausalLM" in REGISTRY
    with pytest.raises(models.ConfigError, match="TinyForCausalLM"):
        models.from_pretrained(path)
    model = TinyLM(TinyConfig())
    with pytest.raises(models.ConfigError, match=r"ARCHITECTURES\.add"):
        models.lora_spec(model)


# --- lookups and the bundled entries ----------------------------------------------------------------------


def test_lookups_by_name_type_and_module():
    registry = models.ARCHITECTURES
    assert registry["GPT2Model"] is registry["GPT2LMHeadModel"] is registry.by_type("gpt2")
    assert registry.of(models.BertForSequenceClassification(models.BertConfig())).model_type == "bert"
    assert registry.of(models.LlamaConfig()).model_type == "llama"
    assert registry.by_type("llama").build("LlamaForCausalLM").module is models.LlamaForCausalLM
    with pytest.raises(models.ConfigError, match="t5"):
        registry.by_type("t5")
    with pytest.raises(models.ConfigError, match="registered twice"):
        registry.add(dataclasses.replace(TINY, model_type="llama"))
    with pytest.raises(models.ConfigError, match="registered twice"):
        REGISTRY.add(dataclasses.replace(TINY, model_type="tiny2"))


def test_bundled_entries_carry_targets_parallel_layout_and_cache():
    llama = models.ARCHITECTURES.by_type("llama")
    assert [lin.name for lin in llama.linears] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert llama.column_parallel() == (
        ("attention/query", 2),
        ("attention/key", 2),
        ("attention/value", 2),
        ("mlp/gate", 1),
        ("mlp/up", 1),
    )
    assert llama.row_parallel() == (("attention/out", 2), ("mlp/down", 1))
    config = models.LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    assert llama.cache.shape(config, 5, 100) == (3, 5, 100, 2, 16)
    bert = models.ARCHITECTURES.by_type("bert")
    assert bert.cache is None and bert.head == "classifier" and bert.stack == "encoder"
    assert bert.row_parallel() == (("attention/out", 2), ("mlp/output", 1))
    with pytest.raises(models.ConfigError, match="no KV cache"):
        models.cache_for(models.BertModel(models.BertConfig()), 1, 8)


def test_options_go_to_the_builds_that_take_them():
    values = {"model_type": "bert", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1}
    model = models.build_model("BertForSequenceClassification", values, num_labels=5, pooling="mean")
    assert model.config.num_labels == 5 and model.pooling == "mean"
    assert models.build_model("BertModel", values, add_pooler=False).add_pooler is False
    with pytest.raises(models.ConfigError, match="num_labels applies to BertForSequenceClassification, not BertModel"):
        models.build_model("BertModel", values, num_labels=5)
    with pytest.raises(models.ConfigError, match="does not fit model_type"):
        models.build_model("LlamaForCausalLM", values)
