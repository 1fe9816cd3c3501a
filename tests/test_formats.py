"""adapterctl.formats: the one reader each of safetensors files, PEFT adapter configs and GGUF files."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adapterctl.formats import peft
from adapterctl.formats import safetensors as st

# -- safetensors -------------------------------------------------------------------------------


def _hand_written(path: Path, tensors: list[tuple[str, str, list[int], bytes]], metadata=None) -> Path:
    """A safetensors file with the tensors' data in the order given (not sorted by name)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, blob in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(t[3] for t in tensors))
    return path


def test_read_header_has_dtypes_shapes_and_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float16)}, str(path), {"k": "v"})
    specs, metadata = st.read_header(path)
    assert specs == {"a": st.TensorSpec("F32", (2, 3)), "b": st.TensorSpec("F16", (4,))}
    assert metadata == {"k": "v"}


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda raw: raw[:8] + b"{" * 20 + raw[28:],  # header not JSON
        lambda raw: (1 << 40).to_bytes(8, "little") + raw[8:],  # header length past the end
        lambda raw: raw[: len(raw) - 3],  # data cut short
        lambda raw: b"",
    ],
)
def test_a_file_the_library_refuses_is_a_value_error_naming_it(tmp_path, corrupt):
    path = tmp_path / "w.safetensors"
    save_file({"a": np.ones((4, 4), np.float32)}, str(path))
    path.write_bytes(corrupt(path.read_bytes()))
    for read in (st.read_header, st.SafetensorsFile):
        with pytest.raises(ValueError, match="safetensors header does not parse") as exc:
            read(path)
        assert str(path) in str(exc.value)


def test_a_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        st.read_header(tmp_path / "none.safetensors")


def test_raw_bytes_follow_the_header_offsets_not_the_name_order(tmp_path):
    b_bits = np.array([0x3F80, 0xC000, 0x7FC1], "<u2")  # BF16 1, -2, a NaN with a payload
    a_vals = np.array([0.5, 1.5], "<f4")
    path = _hand_written(
        tmp_path / "w.safetensors",
        [
            ("b", "BF16", [3], b_bits.tobytes()),
            ("a", "F32", [2], a_vals.tobytes()),
            ("c", "I64", [1], bytes(8)),
        ],
        {"format": "pt"},
    )
    f = st.SafetensorsFile(path)
    assert f.metadata == {"format": "pt"}
    assert bytes(f.raw("b")) == b_bits.tobytes() and bytes(f.raw("a")) == a_vals.tobytes()
    assert f.float32("b")[:2].tolist() == [1.0, -2.0] and math.isnan(f.float32("b")[2])
    assert f.float32("a").tolist() == [0.5, 1.5]
    with pytest.raises(ValueError, match="tensor c is I64, not F32/F16/BF16"):
        f.float32("c")
    with pytest.raises(ValueError, match="I64"):
        f.float32_all()


def test_write_is_read_back_bit_exact_by_the_library_and_leaves_no_temp_file(tmp_path):
    bits = np.arange(6, dtype="<u2").reshape(2, 3)
    path = tmp_path / "out.safetensors"
    st.write(
        path,
        {"z": ("F32", (2,), np.array([1.0, 2.0], "<f4").tobytes()), "bf": ("BF16", (2, 3), bits.tobytes())},
        {"source_sha256": "ab", "n": 3},
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    specs, metadata = st.read_header(path)
    assert metadata == {"source_sha256": "ab", "n": "3"}  # metadata values are strings
    assert specs["bf"] == st.TensorSpec("BF16", (2, 3))
    assert bytes(st.SafetensorsFile(path).raw("bf")) == bits.tobytes()
    st.write(path, {"z": ("F32", (2,), np.array([1.0, 2.0], "<f4").tobytes())}, {})
    assert load_file(str(path))["z"].tolist() == [1.0, 2.0]
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0  # the data section is 8-byte aligned


def test_encode_rounds_to_nearest_even_bfloat16_and_keeps_nan_a_nan():
    values = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, np.nan, -0.0], np.float32)
    bits = np.frombuffer(st.encode(values, "BF16"), "<u2")
    assert [hex(b) for b in bits[:3]] == ["0x3f80", "0x3f80", "0x3f82"]  # ties go to the even mantissa
    assert bits[3] == 0x7FC0 and bits[4] == 0x8000
    assert np.frombuffer(st.encode(values[:2], "F16"), "<f2").tolist() == [1.0, 1.00390625]
    with pytest.raises(ValueError, match="cannot encode I8"):
        st.encode(values, "I8")


# -- PEFT adapter_config.json ------------------------------------------------------------------

FULL = {
    "peft_type": "LORA",
    "r": 8,
    "lora_alpha": 16,
    "target_modules": ["q_proj", "self_attn.v_proj"],
    "lora_dropout": 0.05,
    "use_rslora": False,
    "bias": "none",
    "base_model_name_or_path": "local/tiny-llama",
    "task_type": "CAUSAL_LM",
}


def _config(tmp_path: Path, doc) -> Path:
    (tmp_path / peft.CONFIG_FILE).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return tmp_path


def test_load_parses_a_peft_config_into_a_frozen_model(tmp_path):
    cfg = peft.load(_config(tmp_path, FULL), strict=True)
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules) == (8, 16, ("q_proj", "self_attn.v_proj"))
    assert cfg.path == tmp_path / peft.CONFIG_FILE and cfg.base_model_name_or_path == "local/tiny-llama"
    assert cfg.scale() == 2.0 and cfg.merge_blockers() == []
    assert cfg.summary() == {
        k: FULL[k] for k in ("r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora")
    }
    assert peft.load(tmp_path / peft.CONFIG_FILE) == cfg  # the file itself, or its directory
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 4  # type: ignore[misc]


def test_lenient_load_takes_peft_defaults_for_what_the_file_leaves_out(tmp_path):
    cfg = peft.load(_config(tmp_path, {"r": 4, "lora_alpha": 8}))
    assert (cfg.peft_type, cfg.target_modules, cfg.bias, cfg.lora_dropout, cfg.use_rslora) == (
        None,
        None,
        "none",
        0.0,
        False,
    )
    assert cfg.summary() == {"r": 4, "lora_alpha": 8}
    with pytest.raises(peft.PeftConfigError, match="peft_type is None, expected 'LORA'"):
        peft.load(tmp_path, strict=True)


@pytest.mark.parametrize(
    ("doc", "strict", "needle"),
    [
        ('{"r": 8,', False, "not valid JSON"),
        ("[1, 2]", False, "must be a JSON object"),
        ({**FULL, "peft_type": "PREFIX_TUNING"}, False, "peft_type is 'PREFIX_TUNING', expected 'LORA'"),
        ({k: v for k, v in FULL.items() if k != "r"}, False, "missing 'r' (the LoRA rank)"),
        ({**FULL, "r": "8"}, False, "'r' must be a positive integer, got '8'"),
        ({**FULL, "r": True}, False, "'r' must be a positive integer"),
        ({**FULL, "r": 0}, False, "'r' must be a positive integer"),
        ({**FULL, "lora_alpha": None}, False, "'lora_alpha' missing or not a number"),
        ({**FULL, "target_modules": []}, True, "'target_modules' missing or empty"),
        ({**FULL, "target_modules": 3}, False, "'target_modules' must be a list of module names or a regex"),
        ({**FULL, "rank_pattern": {"q_proj": "4"}}, False, "'rank_pattern' must map module names to ranks"),
        ({**FULL, "alpha_pattern": ["q_proj"]}, False, "'alpha_pattern' must map module names to alphas"),
        ({**FULL, "lora_dropout": "0.1"}, False, "'lora_dropout' must be a number"),
    ],
)
def test_an_invalid_config_names_the_file_what_is_wrong_and_the_fix(tmp_path, doc, strict, needle):
    with pytest.raises(peft.PeftConfigError) as exc:
        peft.load(_config(tmp_path, doc), strict=strict)
    assert str(exc.value).startswith(f"{tmp_path / peft.CONFIG_FILE}: ")
    assert needle in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_a_missing_config_says_an_adapter_needs_one(tmp_path):
    with pytest.raises(peft.PeftConfigError, match="missing") as exc:
        peft.load(tmp_path / "nowhere")
    assert exc.value.path == tmp_path / "nowhere" / peft.CONFIG_FILE
    assert exc.value.fix == "a PEFT adapter directory needs adapter_config.json"


def test_rank_and_alpha_patterns_apply_as_peft_applies_them(tmp_path):
    doc = {
        **FULL,
        "use_rslora": True,
        "rank_pattern": {"v_proj": 4},
        "alpha_pattern": {"layers.1.*q_proj|o_proj": 2},
    }
    cfg = peft.load(_config(tmp_path, doc))
    q0, q1, v0 = (f"model.layers.{i}.self_attn.{m}" for i, m in ((0, "q_proj"), (1, "q_proj"), (0, "v_proj")))
    assert (cfg.rank(q0), cfg.rank(v0), cfg.rank(v0 + "_extra")) == (8, 4, 8)  # the pattern ends at a name
    assert (cfg.alpha(q0), cfg.alpha(q1), cfg.alpha("model.layers.0.self_attn.o_proj")) == (16, 2, 2)
    assert cfg.scale(v0) == 16 / math.sqrt(4) and cfg.scale(q1) == 2 / math.sqrt(8)


def test_targets_matches_leaf_names_and_dotted_suffixes_like_peft(tmp_path):
    cfg = peft.load(_config(tmp_path, FULL))
    assert cfg.targets("base_model.model.model.layers.0.self_attn.q_proj")
    assert cfg.targets("base_model.model.model.layers.0.self_attn.v_proj")
    assert not cfg.targets("base_model.model.model.layers.0.mlp.v_proj")  # not under self_attn
    assert not cfg.targets("base_model.model.model.layers.0.self_attn.o_proj")
    regex = peft.load(_config(tmp_path, {**FULL, "target_modules": ".*proj"}))
    assert regex.target_modules == ".*proj" and regex.targets("anything")


def test_merge_blockers_name_what_a_plain_merge_cannot_express(tmp_path):
    doc = {**FULL, "use_dora": True, "modules_to_save": ["lm_head"], "bias": "all", "fan_in_fan_out": False}
    cfg = peft.load(_config(tmp_path, doc))
    assert cfg.merge_blockers() == [
        "DoRA (use_dora: true)",
        "modules_to_save ['lm_head']",
        "bias 'all' (only 'none')",
    ]
    assert cfg.use_dora and cfg.modules_to_save == ("lm_head",)


# -- GGUF ----------------------------------------------------------------------------------------


def _write_gguf(path: Path, tensors: dict, alignment: int | None = None) -> Path:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])  # arrays and strings are skipped
    for name, value in tensors.items():
        writer.add_tensor(name, np.asarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tensor_infos_have_type_shape_offset_and_size(tmp_path):
    from adapterctl.formats import gguf as gguf_format

    path = _write_gguf(
        tmp_path / "m.gguf", {"x": np.zeros((4, 8), np.float16), "y": np.ones(3, np.float32)}, 64
    )
    infos = gguf_format.tensor_infos(path)
    assert infos["x"].type == 1 and infos["x"].shape == (8, 4) and infos["x"].nbytes == 64  # GGUF order
    assert infos["y"].type == 0 and infos["y"].nbytes == 12
    data = path.read_bytes()
    assert data[infos["y"].offset : infos["y"].offset + 12] == np.ones(3, np.float32).tobytes()
    assert all(t.offset % 64 == 0 for t in infos.values())


def test_changed_tensor_bytes_counts_changed_new_and_reshaped_tensors_fully(tmp_path):
    from adapterctl.formats import gguf as gguf_format

    same = np.arange(1000, dtype=np.float32)
    edited = np.arange(300, dtype=np.float16)
    tensors = {"same": same, "edited": edited, "reshaped": np.zeros((4, 8), np.float32)}
    old = _write_gguf(tmp_path / "old.gguf", tensors, alignment=64)
    edited2 = edited.copy()
    edited2[-1] += 1  # one element, at the end of the tensor
    new = _write_gguf(
        tmp_path / "new.gguf",
        {
            "added": np.ones(10, np.float32),  # only in new; shifts every other tensor's offset
            "same": same,
            "edited": edited2,
            "reshaped": np.zeros((8, 4), np.float32),
        },
    )
    assert gguf_format.changed_tensors(old, new) == {"added": 40, "edited": 600, "reshaped": 128}
    assert gguf_format.changed_tensor_bytes(old, new) == 40 + 600 + 128
    assert gguf_format.changed_tensor_bytes(new, old) == 600 + 128  # a tensor only in `old` is not sent
    assert gguf_format.changed_tensor_bytes(new, new) == 0
    sizes = gguf_format.tensor_sizes(old)
    assert sizes["same"][1] == 4000 and all(offset % 64 == 0 for offset, _ in sizes.values())


@pytest.mark.parametrize(
    "data",
    [b"GGUF\x03\x00\x00\x00\x05", b"PK\x03\x04" + bytes(20), b"GGUF\x01\x00\x00\x00" + bytes(16), b""],
    ids=["truncated", "zip", "version-1", "empty"],
)
def test_a_file_that_is_not_a_readable_gguf_is_a_value_error_naming_it(tmp_path, data):
    pytest.importorskip("gguf")
    from adapterctl.formats import gguf as gguf_format

    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="not a GGUF file, or a damaged or truncated one") as exc:
        gguf_format.changed_tensor_bytes(path, path)
    assert str(path) in str(exc.value)


def test_without_the_gguf_package_the_error_names_the_extra(monkeypatch, tmp_path):
    import sys

    from adapterctl.formats import gguf as gguf_format

    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(ImportError, match=r"pip install -e '\.\[gguf\]'"):
        gguf_format.tensor_infos(tmp_path / "m.gguf")


# -- strict JSON and the single read pass of the version phase (issue 12) -----------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"lora_alpha": NaN}', "NaN"),
        ('{"lora_alpha": Infinity}', "Infinity"),
        ('{"a": [1, -Infinity]}', "-Infinity"),
        ('{"lora_alpha": 1e999}', "1e999"),
        ('{"r": 8, "r": 16}', "'r' appears twice"),
        ('{"rank_pattern": {"q": 1, "q": 2}}', "'q' appears twice"),
    ],
)
def test_strict_json_refuses_what_python_json_accepts_but_json_does_not(text, needle):
    json.loads(text)  # Python's json takes all of these
    with pytest.raises(ValueError, match=needle.replace("[", r"\[")) as exc:
        peft.strict_json(text)
    assert needle in str(exc.value)
    assert peft.strict_json('{"a": [1.5, -2e3, null], "b": {"c": true}}') == {
        "a": [1.5, -2000.0, None],
        "b": {"c": True},
    }


def test_features_record_what_downstream_engines_care_about(tmp_path):
    doc = {**FULL, "use_dora": True, "modules_to_save": ["lm_head"], "rank_pattern": {"v_proj": 4}}
    assert peft.load(_config(tmp_path, doc)).features() == {
        "use_dora": True,
        "use_rslora": False,
        "modules_to_save": ["lm_head"],
        "bias": "none",
        "rank_pattern": {"v_proj": 4},
        "alpha_pattern": {},
    }


def _weights(path: Path, dtype: str, bad: tuple[str, int, float] | None) -> Path:
    """Tensors a (5 values: the next one starts unaligned), b (3000: many 64-byte chunks) and c (2)
    of `dtype`, with `bad` = (tensor, index, value) put in."""
    arrays = {"a": np.ones(5, np.float32), "b": np.linspace(-1, 1, 3000, dtype=np.float32), "c": np.zeros(2)}
    if bad is not None:
        arrays[bad[0]][bad[1]] = bad[2]
    tensors = {k: (dtype, a.shape, st.encode(a.astype(np.float32), dtype)) for k, a in arrays.items()}
    st.write(path, tensors, {"format": "pt"})
    return path


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize(
    ("bad", "found"),
    [(None, None), (("b", 0, np.nan), "b"), (("b", 2999, -np.inf), "b"), (("c", 1, np.inf), "c")],
)
def test_finite_check_reads_each_byte_once_in_the_hashing_pass(tmp_path, dtype, bad, found):
    import hashlib

    path = _weights(tmp_path / "w.safetensors", dtype, bad)
    seen = bytearray()
    with open(path, "rb") as fh:
        assert st.read_checking_finite(fh, seen.extend, chunk=64) == found
    data = path.read_bytes()
    if found is None:  # it read the whole file, in order, each byte once
        assert bytes(seen) == data
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            st.read_checking_finite(fh, h.update, chunk=4 << 20)
        assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    else:  # it stopped at the first bad tensor, having read a prefix once
        assert data.startswith(bytes(seen))


def test_scan_ships_the_allowlist_lists_the_rest_and_refuses_any_symlink(tmp_path):
    import os

    from adapterctl.errors import AdapterInvalid
    from adapterctl.versioning import scan_adapter_dir

    for name in ("adapter_config.json", "tokenizer.model", "chat_template.jinja", "optimizer.pt", ".env"):
        (tmp_path / name).write_bytes(b"12345")
    (tmp_path / "checkpoint-1" / "deep").mkdir(parents=True)
    (tmp_path / "checkpoint-1" / "deep" / "x.bin").write_bytes(b"1234567")
    shipped, left = scan_adapter_dir(tmp_path)
    assert shipped == ["adapter_config.json", "chat_template.jinja", "tokenizer.model"]
    assert left == [(".env", 5), ("checkpoint-1/", 7), ("optimizer.pt", 5)]
    os.symlink("/etc/passwd", tmp_path / "checkpoint-1" / "deep" / "passwd")
    with pytest.raises(AdapterInvalid, match="deep/passwd: is a symlink to /etc/passwd"):
        scan_adapter_dir(tmp_path)


def test_a_file_that_changes_while_it_is_read_is_refused(tmp_path):
    from adapterctl import versioning
    from adapterctl.errors import AdapterInvalid

    path = tmp_path / "tokenizer.json"
    path.write_bytes(b"x" * 1000)
    fh, before = versioning._open_regular(path)
    with fh:
        with open(path, "ab") as writer:  # training is still writing it
            writer.write(b"more")
        fh.read()
        with pytest.raises(AdapterInvalid, match="changed while it was being read"):
            versioning._check_unchanged(path, fh, before)


def test_inspect_adapter_records_features_and_what_is_not_shipped(tmp_path):
    from adapterctl.demo import make_adapter
    from adapterctl.errors import AdapterInvalid
    from adapterctl.versioning import inspect_adapter

    src = make_adapter(tmp_path / "run", seed=1)
    (src / "optimizer.pt").write_bytes(b"\0" * 100)
    info = inspect_adapter(src)
    assert set(info.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert info.not_shipped == (("optimizer.pt", 100),)
    assert info.features["use_dora"] is False and info.features["bias"] == "none"
    cfg = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps(cfg).replace('"lora_alpha": 16', '"lora_alpha": NaN'))
    with pytest.raises(AdapterInvalid, match="NaN"):
        inspect_adapter(src)
