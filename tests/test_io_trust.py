"""No silent failure in lora_jax's own files: checksums, parse failures, non-finite adapters, writes, signatures.

Every damaged adapter file is refused with ``CheckpointCorruptError`` naming the file (and the tensor or
metadata entry), never loaded as other numbers and never a bare ``KeyError``/``TypeError``/``ValueError``;
every write is whole, flushed, of the mode ``open`` would give, and cleans what a killed writer left.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

import lora_jax as lj
from lora_jax import adapters, io, serve, training
from lora_jax.errors import AdapterMismatchError, CheckpointCorruptError, NonFiniteError
from lora_jax.io import adapter, atomic
from lora_jax.paths import flatten, path_str
from lora_jax.spec import SPEC_METADATA_KEY

PARAMS = {"enc": {"q": {"kernel": jnp.ones((16, 8))}, "v": {"kernel": jnp.ones((16, 2, 4))}}, "head": jnp.ones((8, 2))}
SPEC = lj.LoraSpec([lj.Rule("enc/q/kernel", rank=4), lj.Rule("enc/v/kernel", rank=2, in_axes=0), lj.trainable("head")])
TENSORS = ["enc/q/kernel/a", "enc/q/kernel/b", "enc/v/kernel/a", "enc/v/kernel/b", "head"]


def _trained():
    lora = lj.init(jax.random.key(0), PARAMS, SPEC)
    return jax.tree_util.tree_map(lambda x: x + jax.random.normal(jax.random.key(1), x.shape), lora)


def _saved(tmp_path, name="a.safetensors"):
    return io.save_adapter(tmp_path / name, PARAMS, _trained(), SPEC)


def _save_format_1(path, lora=None):
    """Write an adapter as save_adapter did before checksums (format 1)."""
    leaves = {path_str(p): x for p, x in flatten(_trained() if lora is None else lora)[0]}
    metadata = {
        "format": adapter.FORMAT_1,
        "signature": json.dumps(adapters.signature(PARAMS, SPEC)),
        "dtypes": json.dumps({name: str(x.dtype) for name, x in leaves.items()}),
    }
    save_file({name: np.asarray(x, np.float32) for name, x in leaves.items()}, path, metadata=metadata)
    return path


def _contents(path):
    with safe_open(str(path), framework="numpy") as handle:
        return dict(handle.metadata()), {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def _reseal(metadata, tensors):
    """Recompute a format-2 file's checksums, as a writer that made the damage itself would."""
    try:
        dtypes = json.loads(metadata["dtypes"])
    except (ValueError, RecursionError):
        dtypes = {}
    dtypes = dtypes if isinstance(dtypes, dict) else {}
    checksums = {
        "metadata": adapter._metadata_digest(
            metadata["format"], metadata["signature"], metadata["dtypes"], metadata.get(SPEC_METADATA_KEY)
        ),
        "tensors": {
            name: adapter._tensor_digest(name, array, str(dtypes.get(name))) for name, array in tensors.items()
        },
    }
    return {**metadata, "sha256": json.dumps(checksums)}


def _layout(data):
    """Return a safetensors file's header and where its tensor data starts."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(bytes(data[8 : 8 + size])), 8 + size


def _refused(path, error=CheckpointCorruptError, match=""):
    """Assert that load_adapter refuses ``path`` with exactly ``error``, its message starting with the file."""
    with pytest.raises(error) as caught:
        io.load_adapter(path, PARAMS, SPEC)
    assert type(caught.value) is error
    assert str(caught.value).startswith(str(path)), str(caught.value)
    assert re.search(match, str(caught.value)), str(caught.value)


def _same_adapter(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


# -- checksums --------------------------------------------------------------------------------------------------


def test_checksums_are_stored_and_a_whole_file_loads_without_warning(tmp_path):
    lora = _trained()
    path = io.save_adapter(tmp_path / "a.safetensors", PARAMS, lora, SPEC)
    metadata, _ = _contents(path)
    assert metadata["format"] == adapter.FORMAT == "lora_jax.adapter/2"
    assert set(json.loads(metadata["sha256"])["tensors"]) == set(TENSORS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _same_adapter(io.load_adapter(path, PARAMS, SPEC), lora)


@pytest.mark.parametrize("name", TENSORS)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_bit_in_tensor_data_is_refused_naming_the_tensor(tmp_path, name, where):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    header, start = _layout(data)
    begin, end = header[name]["data_offsets"]
    data[start + {"first": begin, "middle": (begin + end) // 2, "last": end - 1}[where]] ^= 0x01
    path.write_bytes(data)
    _refused(path, match=rf"tensor {name} \(float32, shape \[.*\]\) does not match its checksum")


@pytest.mark.parametrize("name", TENSORS)
@pytest.mark.parametrize("dtype", ["I32", "U32"])
def test_a_header_dtype_changed_so_the_bytes_read_as_other_numbers_is_refused(tmp_path, name, dtype):
    path = _saved(tmp_path)
    data = path.read_bytes()
    entry = json.dumps(name).encode() + b':{"dtype":"F32"'
    assert data.count(entry) == 1
    path.write_bytes(data.replace(entry, entry.replace(b"F32", dtype.encode())))
    _refused(
        path,
        match=rf"tensor {name} \({ {'I32': 'int32', 'U32': 'uint32'}[dtype] }, shape .* does not match its checksum",
    )


def _edit_header(path, old, new):
    data = path.read_bytes()
    assert data.count(old) >= 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new, 1))


@pytest.mark.parametrize(
    "old, new",
    [
        (rb"\"enc/q/kernel/a\": \"float32\"", rb"\"enc/q/kernel/a\": \"float16\""),  # the dtypes map
        (rb"\"scale\": 2.0", rb"\"scale\": 8.0"),  # the signature: read as another alpha
        (rb"\"rank\": 4", rb"\"rank\": 5"),
        (b"lora_jax.adapter/2", b"lora_jax.adapter/1"),  # passed off as a file without checksums
    ],
    ids=["dtypes", "scale", "rank", "format"],
)
def test_changed_metadata_is_refused_by_its_checksum(tmp_path, old, new):
    path = _saved(tmp_path)
    _edit_header(path, old, new)
    _refused(path, match=r"the metadata \(format, signature, dtypes\) does not match its checksum")


def test_swapped_tensor_data_and_a_changed_shape_are_refused(tmp_path):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    header, start = _layout(data)
    (b0, b1), (h0, h1) = header["enc/v/kernel/b"]["data_offsets"], header["head"]["data_offsets"]
    assert b1 - b0 == h1 - h0
    data[start + b0 : start + b1], data[start + h0 : start + h1] = (
        data[start + h0 : start + h1],
        data[start + b0 : start + b1],
    )
    path.write_bytes(data)
    _refused(path, match="tensor enc/v/kernel/b .* does not match its checksum")

    path = _saved(tmp_path, "b.safetensors")
    _edit_header(
        path, b'"enc/q/kernel/a":{"dtype":"F32","shape":[16,4]', b'"enc/q/kernel/a":{"dtype":"F32","shape":[4,16]'
    )
    _refused(path, match=r"tensor enc/q/kernel/a \(float32, shape \[4, 16\]\) does not match its checksum")


def _rewritten(path, edit):
    metadata, tensors = _contents(path)
    metadata, tensors = edit(metadata, tensors)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _without(mapping, key):
    return {k: v for k, v in mapping.items() if k != key}


CHECKSUM_DAMAGE = {
    "no sha256 entry": (lambda m, t: (_without(m, "sha256"), t), "has no 'sha256' entry"),
    "sha256 not JSON": (lambda m, t: ({**m, "sha256": m["sha256"][:-3]}, t), "'sha256' is not JSON"),
    "sha256 a list": (lambda m, t: ({**m, "sha256": "[]"}, t), "'sha256' is not a JSON object"),
    "no tensor map": (lambda m, t: ({**m, "sha256": json.dumps({"metadata": "0"})}, t), "no map of tensor checksums"),
    "a checksum missing": (
        lambda m, t: (
            {**m, "sha256": json.dumps({**json.loads(m["sha256"]), "tensors": {"head": "0"}})},
            t,
        ),
        "tensor enc/q/kernel/a has no checksum",
    ),
    "an extra tensor": (lambda m, t: (m, {**t, "extra": np.zeros(3, np.float32)}), "tensor extra has no checksum"),
    "a tensor missing": (lambda m, t: (m, _without(t, "head")), "tensor head is listed but missing"),
}


@pytest.mark.parametrize("case", list(CHECKSUM_DAMAGE))
def test_damaged_checksums_are_refused(tmp_path, case):
    edit, message = CHECKSUM_DAMAGE[case]
    path = _rewritten(_saved(tmp_path), edit)
    _refused(path, match=message)


def test_a_file_without_checksums_loads_with_a_warning_naming_it(tmp_path):
    lora = _trained()
    path = _save_format_1(tmp_path / "old.safetensors", lora)
    with pytest.warns(UserWarning, match=re.escape(str(path)) + r" has no checksums .*cannot be verified"):
        restored = io.load_adapter(path, PARAMS, SPEC)
    _same_adapter(restored, lora)
    # Saving it again adds the checksums.
    again = io.save_adapter(tmp_path / "new.safetensors", PARAMS, restored, SPEC)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _same_adapter(io.load_adapter(again, PARAMS, SPEC), lora)


# -- parse failures: every one a CheckpointCorruptError naming the file ----------------------------------------


def _dtypes(edit):
    def apply(metadata, tensors):
        dtypes = json.loads(metadata["dtypes"])
        edit(dtypes)
        return {**metadata, "dtypes": json.dumps(dtypes)}, tensors

    return apply


def _signature(edit):
    def apply(metadata, tensors):
        return {**metadata, "signature": json.dumps(edit(json.loads(metadata["signature"])))}, tensors

    return apply


METADATA_DAMAGE = {
    "dtype float33": (
        _dtypes(lambda d: d.update({"head": "float33"})),
        r"tensor head the dtype 'float33', which is not",
    ),
    "dtype a,b": (_dtypes(lambda d: d.update({"head": "float32,,"})), r"tensor head the dtype 'float32,,'"),
    "dtype null": (_dtypes(lambda d: d.update({"head": None})), r"tensor head the dtype None"),
    "dtype int32": (_dtypes(lambda d: d.update({"head": "int32"})), r"tensor head the dtype 'int32'"),
    "dtype <f4": (_dtypes(lambda d: d.update({"head": "<f4"})), r"tensor head the dtype '<f4'"),
    "dtype missing": (_dtypes(lambda d: d.pop("enc/q/kernel/a")), r"'dtypes' has no dtype for tensor enc/q/kernel/a"),
    "dtypes not JSON": (lambda m, t: ({**m, "dtypes": "{float32"}, t), r"metadata entry 'dtypes' is not JSON"),
    "dtypes a list": (lambda m, t: ({**m, "dtypes": "[]"}, t), r"metadata entry 'dtypes' is not a JSON object"),
    "dtypes missing": (lambda m, t: (_without(m, "dtypes"), t), r"the metadata has no 'dtypes' entry"),
    "signature not JSON": (lambda m, t: ({**m, "signature": "{'a': 1}"}, t), r"entry 'signature' is not JSON"),
    "signature missing": (lambda m, t: (_without(m, "signature"), t), r"the metadata has no 'signature' entry"),
    "signature of numbers": (_signature(lambda s: {**s, "head": 3}), r"'signature' is not a map of leaf -> settings"),
    "number too long": (
        lambda m, t: ({**m, "signature": '{"head": {"shape": [' + "1" * 5000 + "]}}"}, t),
        r"'signature' is not JSON",
    ),
    "nesting too deep": (lambda m, t: ({**m, "dtypes": "[" * 100_000}, t), r"'dtypes' is not JSON"),
    "format missing": (lambda m, t: (_without(m, "format"), t), r"not a lora_jax adapter \(format None"),
    "format foreign": (lambda m, t: ({**m, "format": "pt"}, t), r"not a lora_jax adapter \(format 'pt'"),
    "no metadata": (lambda m, t: ({}, t), r"not a lora_jax adapter"),
    "tensor missing": (lambda m, t: (m, _without(t, "head")), r"tensor head is listed but missing"),
    "tensor int32": (
        lambda m, t: (m, {**t, "head": t["head"].astype(np.int32)}),
        r"tensor head is stored as int32; adapters are float32",
    ),
    "tensor reshaped": (
        lambda m, t: (m, {**t, "enc/q/kernel/a": t["enc/q/kernel/a"].reshape(4, 16)}),
        r"tensor enc/q/kernel/a has shape \[4, 16\], but the file's signature says \[16, 4\]",
    ),
}


@pytest.mark.parametrize("sealed", [False, True], ids=["format-1", "format-2-resealed"])
@pytest.mark.parametrize("case", list(METADATA_DAMAGE))
def test_a_damaged_header_is_refused_naming_the_file_and_the_entry(tmp_path, case, sealed):
    edit, message = METADATA_DAMAGE[case]
    path = tmp_path / "a.safetensors"
    if sealed:  # checksums that agree with the damage: the parse itself must refuse it
        io.save_adapter(path, PARAMS, _trained(), SPEC)

        def resealed(metadata, tensors):
            metadata, tensors = edit(metadata, tensors)
            if metadata.get("format") == adapter.FORMAT and {"signature", "dtypes"} <= set(metadata):
                metadata = _reseal(metadata, tensors)
            return metadata, tensors

        _rewritten(path, resealed)
        _refused(path, match=message)
    else:
        _save_format_1(path)
        _rewritten(path, edit)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # no checksums: the warning is tested above
            _refused(path, match=message)


def _safetensors_bytes(header):
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text


def _file_damage(data):
    header_end = _layout(data)[1]
    rng = np.random.default_rng(0)
    cases = {f"truncated at {n}": data[:n] for n in [0, 1, 7, 8, 9, header_end // 2, header_end - 1, header_end]}
    cases |= {
        "truncated in the data": data[: header_end + 10],
        "last byte cut": data[:-1],
        "random bytes": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "random bytes after a plausible length": (100).to_bytes(8, "little") + rng.bytes(100),
        "length beyond the file": (2**40).to_bytes(8, "little") + data[8:],
        "text": b"this is not an adapter\n",
        "json": b'{"format": "lora_jax.adapter/2"}',
        "header a list": _safetensors_bytes([]),
        "bfloat16 tensor": _safetensors_bytes({"t": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}})
        + bytes(4),
        "float8 tensor": _safetensors_bytes({"t": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}})
        + bytes(4),
        "trailing bytes": data + b"\x00" * 8,
    }
    return cases


def test_unreadable_files_are_refused_naming_the_file(tmp_path):
    original = _saved(tmp_path, "original.safetensors").read_bytes()
    cases = _file_damage(original)
    assert len(cases) >= 19
    for case, data in cases.items():
        path = tmp_path / f"{case.replace(' ', '_')}.safetensors"
        path.write_bytes(data)
        if case.startswith("truncated at 0"):
            assert path.stat().st_size == 0
        _refused(path)


def test_a_folder_is_refused_naming_it_and_a_missing_file_is_not_found(tmp_path):
    (tmp_path / "peft").mkdir()
    _refused(tmp_path / "peft", match="is a folder, not an adapter file.*load_peft")
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        io.load_adapter(tmp_path / "nothing.safetensors", PARAMS, SPEC)


# -- hypothesis: corrupt a valid file anywhere ------------------------------------------------------------------


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    directory = tmp_path_factory.mktemp("original")
    lora = _trained()
    return io.save_adapter(directory / "a.safetensors", PARAMS, lora, SPEC).read_bytes(), lora, directory


_CORRUPTIONS = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 7)), min_size=1, max_size=3)),
    st.tuples(st.just("byte"), st.integers(0, 2**31), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 2**31)),
    st.tuples(st.just("insert"), st.integers(0, 2**31), st.binary(min_size=1, max_size=16)),
)


def _corrupt(data, corruption):
    out = bytearray(data)
    kind = corruption[0]
    if kind == "flip":
        for position, bit in corruption[1]:
            out[position % len(out)] ^= 1 << bit
    elif kind == "byte":
        out[corruption[1] % len(out)] = corruption[2]
    elif kind == "truncate":
        del out[corruption[1] % (len(out) + 1) :]
    else:
        position = corruption[1] % (len(out) + 1)
        out[position:position] = corruption[2]
    return bytes(out)


@settings(max_examples=1500, deadline=None)
@given(corruption=_CORRUPTIONS)
def test_corrupted_bytes_load_the_original_numbers_or_are_refused(original, corruption):
    data, lora, directory = original
    corrupted = _corrupt(data, corruption)
    path = directory / "corrupted.safetensors"
    path.write_bytes(corrupted)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a damaged file never passes for an old one without checksums
            restored = io.load_adapter(path, PARAMS, SPEC)
    except CheckpointCorruptError as err:
        # Not AdapterMismatchError either: the signature is under the checksum, so damage to it is damage.
        assert type(err) is CheckpointCorruptError and str(err).startswith(str(path)), str(err)
        return
    _same_adapter(restored, lora)
    if corrupted != data:
        # The only bytes the format ignores: the spaces that pad the JSON header, replaced by other JSON whitespace.
        header_end = _layout(data)[1]
        changed = [i for i in range(len(data)) if corrupted[i] != data[i]]
        assert len(corrupted) == len(data) and all(8 <= i < header_end for i in changed)
        assert all(data[i] == ord(" ") and corrupted[i] in b" \t\n\r" for i in changed)


def test_header_padding_is_the_only_place_a_change_goes_unseen(original, tmp_path):
    data, lora, _ = original
    header_end = _layout(data)[1]
    assert data[header_end - 1] == ord(" ")  # safetensors pads the header with spaces to 8 bytes
    path = tmp_path / "padded.safetensors"
    path.write_bytes(data[: header_end - 1] + b"\n" + data[header_end:])
    _same_adapter(io.load_adapter(path, PARAMS, SPEC), lora)


# -- non-finite adapters are never saved ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "leaf, value, dtype",
    [
        ("enc/q/kernel/a", np.nan, "float32"),
        ("enc/q/kernel/b", np.inf, "float32"),
        ("enc/v/kernel/b", -np.inf, "float32"),
        ("head", np.nan, "float32"),
        ("enc/q/kernel/a", np.nan, "bfloat16"),
        ("enc/v/kernel/a", np.inf, "float16"),
    ],
)
def test_save_refuses_non_finite_adapters_and_writes_nothing(tmp_path, leaf, value, dtype):
    spec = lj.LoraSpec([lj.Rule("enc/q/kernel", rank=4, dtype=dtype), *SPEC.rules[1:]])
    if dtype == "float16":
        spec = lj.LoraSpec([SPEC.rules[0], lj.Rule("enc/v/kernel", rank=2, in_axes=0, dtype=dtype), SPEC.rules[2]])
    lora = jax.tree_util.tree_map(lambda x: x + 0.5, lj.init(jax.random.key(0), PARAMS, spec))
    keys = leaf.split("/")
    parent = lora
    for key in keys[:-1]:
        parent = parent[key]
    parent[keys[-1]] = parent[keys[-1]].at[(0,) * parent[keys[-1]].ndim].set(value)
    path = tmp_path / "a.safetensors"
    message = (
        rf"^adapter leaf {leaf} holds NaN or Inf: nothing was written to {re.escape(str(path))}\. "
        r"Training diverged: find the first step whose loss is NaN or Inf"
    )
    with pytest.raises(NonFiniteError, match=message):
        io.save_adapter(path, PARAMS, lora, spec)
    assert list(tmp_path.iterdir()) == []
    # Nor over an existing file: it stays as it was.
    finite = jax.tree_util.tree_map(jnp.zeros_like, lora)
    io.save_adapter(path, PARAMS, finite, spec)
    before = path.read_bytes()
    with pytest.raises(NonFiniteError, match=leaf):
        io.save_adapter(path, PARAMS, lora, spec, overwrite=True)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_save_refuses_every_leaf_non_finite_naming_the_count(tmp_path):
    lora = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), _trained())
    with pytest.raises(NonFiniteError, match=r"adapter leaf enc/q/kernel/a \(and 4 more\) holds NaN or Inf"):
        io.save_adapter(tmp_path / "a.safetensors", PARAMS, lora, SPEC)


def test_load_refuses_a_non_finite_file_without_checksums(tmp_path):
    lora = _trained()
    lora["head"] = lora["head"].at[1, 1].set(jnp.nan)
    path = _save_format_1(tmp_path / "old.safetensors", lora)
    with (
        pytest.warns(UserWarning, match="cannot be verified"),
        pytest.raises(NonFiniteError, match=rf"adapter leaf head holds NaN or Inf: {re.escape(str(path))}"),
    ):
        io.load_adapter(path, PARAMS, SPEC)


# -- signatures: one comparison, for adapter files and training checkpoints -------------------------------------


def test_one_signature_comparison():
    assert training.signature_differences is adapters.signature_differences
    saved = {"w/a": {"shape": [4, 2], "mode": "lora", "rank": 2, "scale": 2.0, "dropout": 0.1}}
    wanted = {"w/a": {"shape": [4, 2], "mode": "dora", "rank": 2, "scale": 2.0, "dropout": 0.2}}
    assert adapters.signature_differences(saved, wanted, saved_in="the file") == [
        "w/a: mode lora in the file, dora now",
        "w/a: dropout 0.1 in the file, 0.2 now",  # a setting a variant adds is compared too
    ]
    assert adapters.signature_differences(wanted, wanted) == []


BIGGER = {
    **PARAMS,
    "enc": {**PARAMS["enc"], "q": {"kernel": jnp.ones((16, 12))}},
    "extra": {"kernel": jnp.ones((8, 8))},
}

SIGNATURE_CHANGES = {
    "rank": (PARAMS, [lj.Rule("enc/q/kernel", rank=2), *SPEC.rules[1:]], r"enc/q/kernel/a: rank 4 in the file, 2 now"),
    "alpha": (
        PARAMS,
        [lj.Rule("enc/q/kernel", rank=4, alpha=16), *SPEC.rules[1:]],
        r"enc/q/kernel/a: scale \(alpha / r\) 2.0 in the file, 4.0 now",
    ),
    "fewer targets": (PARAMS, SPEC.rules[:2], r"targets: head only in the file \(1 leaves\)"),
    "more targets": (
        BIGGER,
        [lj.Rule("enc/q/kernel", rank=4), *SPEC.rules[1:], lj.Rule("extra/kernel", rank=2)],
        r"targets: extra/kernel/a, extra/kernel/b only in this spec \(2 leaves\)",
    ),
    "base shape": (BIGGER, SPEC.rules, r"enc/q/kernel/b: shape \[4, 8\] in the file, \[4, 12\] now"),
    "mode": (
        PARAMS,
        [lj.trainable("enc/q/kernel"), *SPEC.rules[1:]],
        r"targets: enc/q/kernel/a, enc/q/kernel/b only in the file .*enc/q/kernel only in this spec",
    ),
    "many": (
        PARAMS,
        [lj.Rule("enc/q/kernel", rank=2, alpha=16), lj.Rule("enc/v/kernel", rank=1, in_axes=0), SPEC.rules[2]],
        r"; and \d+ more\. Load it under the spec and base it was saved with$",
    ),
}


@pytest.mark.parametrize("case", list(SIGNATURE_CHANGES))
def test_load_under_another_spec_names_the_file_and_what_differs(tmp_path, case):
    params, rules, message = SIGNATURE_CHANGES[case]
    path = _saved(tmp_path)
    with pytest.raises(AdapterMismatchError, match=re.escape(f"{path} was saved for another spec or base: ") + ".*"):
        io.load_adapter(path, params, lj.LoraSpec(rules))
    with pytest.raises(AdapterMismatchError, match=message):
        io.load_adapter(path, params, lj.LoraSpec(rules))


# -- writes -----------------------------------------------------------------------------------------------------


def test_the_temporary_file_is_flushed_before_it_replaces_the_target(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if sys.platform == "linux" else fd))
        fsync(fd)

    def recording_replace(source, destination):
        events.append(("replace", str(source)))
        replace(source, destination)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    path = _saved(tmp_path)
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    temporary = events[1][1]
    assert re.fullmatch(r"\.a\.safetensors\.[0-9a-f]{16}\.tmp", Path(temporary).name)
    if sys.platform == "linux":
        assert events[0][1] == temporary and events[2][1] == str(tmp_path)  # the file, then its folder
    assert path.exists()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077, 0o027], ids=oct)
def test_a_new_file_gets_the_mode_open_would_give(tmp_path, umask):
    previous = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        with open(plain, "w") as f:
            f.write("x")
        adapter_path = _saved(tmp_path)
        text = atomic.write_text(tmp_path / "t.txt", "x")
        folder = atomic.write_directory_atomic(tmp_path / "peft", {"w": lambda p: Path(p).write_bytes(b"w")})
    finally:
        os.umask(previous)
    want = 0o666 & ~umask
    assert _mode(plain) == want
    assert _mode(adapter_path) == want and _mode(text) == want and _mode(folder / "w") == want
    assert _mode(folder) == 0o777 & ~umask


def _mode(path):
    return os.stat(path).st_mode & 0o7777


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o640, 0o664, 0o444], ids=oct)
def test_a_replaced_file_keeps_its_mode(tmp_path, mode):
    path = _saved(tmp_path)
    os.chmod(path, mode)
    io.save_adapter(path, PARAMS, _trained(), SPEC, overwrite=True)
    assert _mode(path) == mode
    text = atomic.write_text(tmp_path / "t.txt", "x")
    os.chmod(text, mode)
    atomic.write_text(text, "y", overwrite=True)
    assert _mode(text) == mode and text.read_text() == "y"


def test_a_symbolic_link_is_written_through(tmp_path):
    real = atomic.write_text(tmp_path / "real.txt", "old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    with pytest.raises(FileExistsError, match="link.txt"):
        atomic.write_text(link, "new")
    assert atomic.write_text(link, "new", overwrite=True) == link
    assert link.is_symlink() and real.read_text() == "new"


def _leftover(directory, name, token="0123456789abcdef", age=0.0, folder=False):
    path = directory / f".{name}.{token}.tmp"
    if folder:
        path.mkdir()
        (path / "half").write_text("half")
    else:
        path.write_text("half")
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "a.safetensors"
    ours = [
        _leftover(tmp_path, "a.safetensors"),
        _leftover(tmp_path, "a.safetensors", "fedcba9876543210", age=7200),
        _leftover(tmp_path, "a.safetensors", "00112233445566aa", folder=True),
    ]
    not_ours = [
        _leftover(tmp_path, "b.safetensors"),  # another target's
        _leftover(tmp_path, "a.safetensors", "backup"),  # not a token we make
        _leftover(tmp_path, "a.safetensors", "20240101"),  # a user's dated copy, not 16 hex digits
        tmp_path / "a.safetensors.tmp",
        tmp_path / ".a.safetensors.0123456789abcdef.old",  # a file; only folders are set aside
    ]
    for path in not_ours[2:]:
        path.write_text("keep")
    io.save_adapter(target, PARAMS, _trained(), SPEC)
    assert not any(path.exists() for path in ours)
    assert all(path.exists() for path in not_ours)


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from lora_jax.io import atomic

def write(tmp):
    Path(tmp).write_text("half")
    print("writing", flush=True)
    time.sleep(120)

atomic.write_atomic(sys.argv[1], write, overwrite=True)
"""


def test_a_live_writer_is_left_alone_and_a_killed_one_cleaned(tmp_path):
    target = tmp_path / "notes.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE, env=env)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == b"writing"
        (temporary,) = [p for p in tmp_path.iterdir() if p.name.startswith(".notes.txt.")]
        atomic.write_text(target, "mine")  # while the other writer lives: its file is left alone
        assert temporary.exists() and target.read_text() == "mine"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    atomic.write_text(target, "again", overwrite=True)  # now it is a leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and target.read_text() == "again"


def test_a_nested_write_to_the_same_target_leaves_the_outer_one_alone(tmp_path):
    target = tmp_path / "notes.txt"

    def outer(tmp):
        Path(tmp).write_text("outer")
        atomic.write_text(target, "inner")
        assert Path(tmp).read_text() == "outer"

    atomic.write_atomic(target, outer)
    assert target.read_text() == "outer" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def _folder_files(version):
    return {
        "adapter_model.safetensors": lambda p: Path(p).write_text(f"weights {version}"),
        "adapter_config.json": lambda p: Path(p).write_text(f"config {version}"),
    }


def _read_folder(directory):
    return {p.name: p.read_text() for p in sorted(directory.iterdir()) if p.is_file()}


def test_write_directory_atomic_makes_a_new_folder(tmp_path):
    directory = tmp_path / "deep" / "peft"
    assert atomic.write_directory_atomic(directory, _folder_files(1)) == directory
    assert _read_folder(directory) == {"adapter_config.json": "config 1", "adapter_model.safetensors": "weights 1"}
    assert sorted(p.name for p in directory.parent.iterdir()) == ["peft"]


@pytest.mark.parametrize("existing", ["adapter_model.safetensors", "adapter_config.json"])
def test_write_directory_atomic_refuses_an_existing_file_naming_it(tmp_path, existing):
    directory = tmp_path / "peft"
    directory.mkdir()
    (directory / existing).write_text("user's")
    with pytest.raises(FileExistsError, match=re.escape(str(directory / existing)) + ".*overwrite=True"):
        atomic.write_directory_atomic(directory, _folder_files(1))
    assert _read_folder(directory) == {existing: "user's"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]
    # A folder that holds none of the files is written into without overwrite: nothing of the user's is replaced.
    (directory / existing).unlink()
    (directory / "README.md").write_text("notes")
    atomic.write_directory_atomic(directory, _folder_files(1))
    assert set(_read_folder(directory)) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.parametrize("failing", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_failing_write_leaves_the_old_folder_untouched(tmp_path, failing):
    directory = tmp_path / "peft"
    atomic.write_directory_atomic(directory, _folder_files(1))
    (directory / "README.md").write_text("notes")
    before = _read_folder(directory)

    def broken(path):
        Path(path).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_directory_atomic(directory, {**_folder_files(2), failing: broken}, overwrite=True)
    assert _read_folder(directory) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]  # no temporary folder left behind


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_replaces_the_files_and_keeps_everything_else(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    directory = tmp_path / "peft"
    atomic.write_directory_atomic(directory, _folder_files(1))
    (directory / "README.md").write_text("notes")
    (directory / "tokenizer").mkdir()
    (directory / "tokenizer" / "vocab.txt").write_text("a b c")
    (directory / "link").symlink_to("README.md")
    os.chmod(directory / "adapter_config.json", 0o640)
    os.chmod(directory, 0o750)
    atomic.write_directory_atomic(directory, _folder_files(2), overwrite=True)
    assert _read_folder(directory) == {
        "README.md": "notes",
        "adapter_config.json": "config 2",
        "adapter_model.safetensors": "weights 2",
        "link": "notes",
    }
    assert (directory / "tokenizer" / "vocab.txt").read_text() == "a b c" and (directory / "link").is_symlink()
    assert _mode(directory) == 0o750 and _mode(directory / "adapter_config.json") == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    directory = tmp_path / "peft"
    atomic.write_directory_atomic(directory, _folder_files(1))
    rename = os.rename

    def failing_rename(source, destination):
        if Path(source).name.endswith(".tmp") and Path(destination) == directory:
            raise OSError("interrupted")
        rename(source, destination)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="interrupted"):
        atomic.write_directory_atomic(directory, _folder_files(2), overwrite=True)
    assert _read_folder(directory)["adapter_config.json"] == "config 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]


def test_a_folder_a_killed_swap_left_aside_is_settled_by_the_next_write(tmp_path):
    # Killed between the two renames: no folder, the old one aside, the new one under its temporary name.
    directory = tmp_path / "peft"
    aside = tmp_path / ".peft.0123456789abcdef.old"
    atomic.write_directory_atomic(aside, {**_folder_files(1), "README.md": lambda p: Path(p).write_text("notes")})
    _leftover(tmp_path, "peft", "fedcba9876543210", folder=True)
    with pytest.raises(FileExistsError, match="adapter_model.safetensors"):  # the old folder is back, so: refused
        atomic.write_directory_atomic(directory, _folder_files(2))
    assert _read_folder(directory)["adapter_config.json"] == "config 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]
    # Killed after the swap, before the old folder was merged and removed: what the new one lacks is kept.
    aside.mkdir()
    (aside / "adapter_config.json").write_text("config 0")
    (aside / "added during the swap.txt").write_text("late")
    atomic.write_directory_atomic(directory, _folder_files(3), overwrite=True)
    assert _read_folder(directory) == {
        "README.md": "notes",
        "added during the swap.txt": "late",
        "adapter_config.json": "config 3",
        "adapter_model.safetensors": "weights 3",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]


@pytest.mark.parametrize("why", ["parent not writable", "mount point"])
def test_a_folder_that_cannot_be_swapped_is_written_in_place(tmp_path, monkeypatch, why):
    directory = tmp_path / "peft"
    atomic.write_directory_atomic(directory, _folder_files(1))
    (directory / "README.md").write_text("notes")
    inode = os.stat(directory).st_ino
    if why == "mount point":
        monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == directory)
    else:
        mkdir = os.mkdir

        def refused(path, *args, **kwargs):
            if Path(path).parent == tmp_path:
                raise PermissionError(13, "Permission denied", str(path))
            mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", refused)
    with pytest.raises(FileExistsError, match="adapter_model.safetensors"):
        atomic.write_directory_atomic(directory, _folder_files(2))
    atomic.write_directory_atomic(directory, _folder_files(2), overwrite=True)
    assert os.stat(directory).st_ino == inode  # the same folder, written in place
    assert _read_folder(directory) == {
        "README.md": "notes",
        "adapter_config.json": "config 2",
        "adapter_model.safetensors": "weights 2",
    }
    if why == "parent not writable":
        with pytest.raises(PermissionError):  # and a new folder cannot be made there at all
            atomic.write_directory_atomic(tmp_path / "other", _folder_files(1))


@pytest.mark.parametrize("name", ["", ".", "..", "sub/file", "/abs"])
def test_write_directory_atomic_takes_plain_file_names(tmp_path, name):
    with pytest.raises(ValueError, match="is not a file name"):
        atomic.write_directory_atomic(tmp_path / "peft", {name: lambda p: None})
    assert list(tmp_path.iterdir()) == []


def test_write_directory_atomic_refuses_a_file_for_a_folder(tmp_path):
    (tmp_path / "peft").write_text("a file")
    with pytest.raises(NotADirectoryError, match="peft is a file"):
        atomic.write_directory_atomic(tmp_path / "peft", _folder_files(1), overwrite=True)


@pytest.mark.skipif(sys.platform != "linux", reason="RENAME_EXCHANGE is Linux's")
def test_a_reader_never_sees_new_weights_beside_an_old_config(tmp_path):
    directory = tmp_path / "peft"
    atomic.write_directory_atomic(directory, _folder_files(0))
    seen, mixed, failures, done = [], [], [], threading.Event()

    def read(fd, name):
        handle = os.open(name, os.O_RDONLY, dir_fd=fd)  # within the one folder the reader opened
        try:
            return os.read(handle, 100).decode().split()[1]
        finally:
            os.close(handle)

    def reader():
        while not done.is_set():
            try:
                fd = os.open(directory, os.O_RDONLY)  # never missing: the swap is one exchange
            except OSError as err:
                failures.append(err)
                return
            try:
                versions = {read(fd, "adapter_model.safetensors"), read(fd, "adapter_config.json")}
            except FileNotFoundError:
                continue  # the old folder, emptied after the swap: not a mixed one
            finally:
                os.close(fd)
            seen.append(versions)
            if len(versions) > 1:
                mixed.append(versions)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(1, 40):
            atomic.write_directory_atomic(directory, _folder_files(version), overwrite=True)
    finally:
        done.set()
        thread.join()
    assert seen and not mixed and not failures


def test_save_adapter_refuses_a_name_that_is_not_safetensors(tmp_path):
    with pytest.raises(lj.LoraError, match=r"adapter\.bin: .*ending in \.safetensors"):
        io.save_adapter(tmp_path / "adapter.bin", PARAMS, _trained(), SPEC)
    assert list(tmp_path.iterdir()) == []


def test_an_adapter_read_with_other_kernel_axes_is_refused_even_when_the_shapes_agree(tmp_path):
    # A square kernel read with its input and output axes swapped gives factors of the same shapes: only the
    # recorded axes tell the two apart, and merging under the wrong ones would give other weights.
    params = {"attn": {"kernel": jnp.ones((8, 8))}}
    saved_spec = lj.LoraSpec([lj.Rule("attn/kernel", rank=2)])
    other_spec = lj.LoraSpec([lj.Rule("attn/kernel", rank=2, in_axes=(1,))])
    lora = jax.tree_util.tree_map(lambda x: x + 1.0, lj.init(jax.random.key(0), params, saved_spec))
    path = io.save_adapter(tmp_path / "a.safetensors", params, lora, saved_spec)
    with pytest.raises(AdapterMismatchError, match=r"attn/kernel/a: axes stack\(\) in\(0,\) out\(1,\) in the file, "):
        io.load_adapter(path, params, other_spec)
    with training.Checkpoints(tmp_path / "ckpt", params, saved_spec) as checkpoints:
        checkpoints.save(1, {"lora": lora})
    mismatch = pytest.raises(AdapterMismatchError, match=r"axes stack\(\) in\(0,\) out\(1,\) in the checkpoint")
    with training.Checkpoints(tmp_path / "ckpt", params, other_spec) as checkpoints, mismatch:
        checkpoints.restore_latest({"lora": lora})
    # A file written before axes were recorded (format 1 here) still loads: compared on what it records.
    old = _save_format_1(tmp_path / "old.safetensors")
    metadata, tensors = _contents(old)
    unrecorded = {
        name: {k: v for k, v in entry.items() if k != "axes"}
        for name, entry in adapters.signature(PARAMS, SPEC).items()
    }
    save_file(tensors, old, metadata={**metadata, "signature": json.dumps(unrecorded)})
    with pytest.warns(UserWarning, match="has no checksums"):
        _same_adapter(io.load_adapter(old, PARAMS, SPEC), _trained())


def _tiny_adapter(seed: int, spec: lj.LoraSpec, params):
    lora = lj.init(jax.random.key(seed), params, spec)
    return jax.tree_util.tree_map(lambda x: x + jax.random.normal(jax.random.key(seed + 1), x.shape), lora)


def test_serving_refuses_adapters_that_hold_nan_or_inf():
    params = {"enc": {"q": {"kernel": jnp.ones((8, 8))}}}
    spec = lj.LoraSpec([lj.Rule("enc/q/kernel", rank=2)])
    good, bad = _tiny_adapter(0, spec, params), _tiny_adapter(2, spec, params)
    bad["enc"]["q"]["kernel"]["a"] = bad["enc"]["q"]["kernel"]["a"].at[0, 0].set(jnp.nan)
    with pytest.raises(NonFiniteError, match="adapter set slot 1: adapter leaf enc/q/kernel/a holds NaN or Inf"):
        serve.adapter_set(params, [(good, spec), (bad, spec)])
    lora_set = serve.adapter_set(params, [(good, spec)], capacity=2)
    with pytest.raises(NonFiniteError, match="slot 1: adapter leaf enc/q/kernel/a"):
        serve.add(params, bad, spec, lora_set)
    with pytest.raises(NonFiniteError, match="slot 0: adapter leaf enc/q/kernel/a"):
        serve.replace(params, bad, spec, lora_set, 0)
    # A finite adapter that overflows the set's dtype is refused too.
    huge = jax.tree_util.tree_map(lambda x: x * 1e6, good)
    with pytest.raises(NonFiniteError, match="slot 0: adapter leaf"):
        serve.adapter_set(params, [(huge, spec)], dtype="float16")
    for combination in ("linear", "cat", "svd"):
        with pytest.raises(NonFiniteError, match="weighted_adapter: adapter 1's leaf enc/q/kernel/a"):
            serve.weighted_adapter(params, [(good, spec), (bad, spec)], [0.5, 0.5], combination=combination)
    # Weights may be numpy or JAX scalars; the result is the same as with Python floats.
    want, _ = serve.weighted_adapter(params, [(good, spec), (good, spec)], [0.5, 0.25], combination="cat")
    got, _ = serve.weighted_adapter(
        params, [(good, spec), (good, spec)], [jnp.float32(0.5), np.float64(0.25)], combination="cat"
    )
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_checkpoints_never_save_over_another_runs_steps_or_a_users_folders(tmp_path):
    params = {"enc": {"q": {"kernel": jnp.ones((8, 8))}}}
    spec = lj.LoraSpec([lj.Rule("enc/q/kernel", rank=2)])
    other = lj.LoraSpec([lj.Rule("enc/q/kernel", rank=4)])
    state = {"lora": _tiny_adapter(0, spec, params)}
    with training.Checkpoints(tmp_path / "a", params, other, keep=2) as theirs:
        for step in (1, 2, 3):
            theirs.save(step, {"lora": _tiny_adapter(0, other, params)})
    mismatch = pytest.raises(AdapterMismatchError, match=r"checkpoint 2 was written for another spec")
    with training.Checkpoints(tmp_path / "a", params, spec, keep=2) as mine, mismatch:
        mine.save(10, state)
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.isdigit()) == ["2", "3"]
    # A folder of numbered files that no checkpoint wrote is named, not pruned.
    (tmp_path / "b" / "1").mkdir(parents=True)
    (tmp_path / "b" / "1" / "data.txt").write_text("mine")
    unsigned = pytest.raises(CheckpointCorruptError, match=r"checkpoint 1 .* has no spec signature")
    with training.Checkpoints(tmp_path / "b", params, spec, keep=1) as mine, unsigned:
        mine.save(5, state)
    assert (tmp_path / "b" / "1" / "data.txt").read_text() == "mine"
    # The run's own directory saves on.
    with training.Checkpoints(tmp_path / "c", params, spec, keep=2) as mine:
        mine.save(1, state)
    with training.Checkpoints(tmp_path / "c", params, spec, keep=2) as mine:
        mine.save(2, state)
        assert mine.steps() == [1, 2]
