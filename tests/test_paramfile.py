"""Parameter files: round trip, corruption, versions, manifest consistency, hostile JSON, atomic writes."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from pyqsim.runtime import paramfile as pf
from pyqsim.runtime.paramfile import ParamFileError, load_params, save_params

TENSORS = {
    "layer0.w": np.arange(-6, 6, dtype=np.int8).reshape(3, 4),
    "layer0.m": np.array([2**30, 2**31 - 1, 7], np.int32),
    "layer0.s": np.array([0.5, 1.5], np.float32),
    "empty": np.zeros((0, 3), np.uint8),
}


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "model.pqs"
    save_params(p, TENSORS, {"graph": [{"op": "int_gemm", "name": "layer0"}]})
    return p


def rewrite(path, header: dict, data: bytes) -> None:
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def read_raw(path):
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def test_round_trip_is_identical(path):
    tensors, meta = load_params(path)
    assert set(tensors) == set(TENSORS)
    for k, v in TENSORS.items():
        assert tensors[k].dtype == v.dtype and np.array_equal(tensors[k], v)
    assert meta["graph"][0]["op"] == "int_gemm" and meta["version"] == pf.VERSION


def test_safetensors_layout_is_readable_by_safetensors(path):
    st = pytest.importorskip("safetensors.numpy")
    loaded = st.load_file(str(path))
    assert np.array_equal(loaded["layer0.w"], TENSORS["layer0.w"])


@pytest.mark.parametrize("cut", [0, 4, 8, 20, -1, -7])
def test_truncated_file(path, cut):
    blob = path.read_bytes()
    path.write_bytes(blob[:cut] if cut >= 0 else blob[:len(blob) + cut])
    with pytest.raises(ParamFileError, match="truncated|JSON|trailing|data_offsets|checksum"):
        load_params(path)


def test_every_flipped_data_byte_is_detected(path):
    blob = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    for i in range(8 + n, len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        path.write_bytes(bytes(bad))
        with pytest.raises(ParamFileError, match="checksum"):
            load_params(path)


def test_flipped_metadata_is_detected(path):
    header, data = read_raw(path)
    meta = json.loads(header["__metadata__"]["pyqsim"])
    meta["graph"][0]["name"] = "layer1"
    header["__metadata__"]["pyqsim"] = json.dumps(meta)
    rewrite(path, header, data)
    with pytest.raises(ParamFileError, match="checksum"):
        load_params(path)


@pytest.mark.parametrize("version", [2, 0, "1", None, True])
def test_wrong_or_future_version(path, version):
    header, data = read_raw(path)
    meta = json.loads(header["__metadata__"]["pyqsim"])
    meta["version"] = version
    header["__metadata__"]["pyqsim"] = json.dumps(meta)
    rewrite(path, header, data)
    with pytest.raises(ParamFileError, match="version"):
        load_params(path)


def test_not_a_pyqsim_file(tmp_path):
    p = tmp_path / "x.bin"
    rewrite(p, {"a": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]}}, b"\x00")
    with pytest.raises(ParamFileError, match="__metadata__"):
        load_params(p)


def _resign(header, data, meta=None):
    import hashlib
    if meta is not None:
        header["__metadata__"]["pyqsim"] = json.dumps(meta)
    d = hashlib.sha256(header["__metadata__"]["pyqsim"].encode())
    d.update(data)
    header["__metadata__"]["sha256"] = d.hexdigest()


def test_missing_tensor(path):
    header, data = read_raw(path)
    b, e = header["layer0.s"]["data_offsets"]
    del header["layer0.s"]
    for k, v in header.items():  # close the gap left by the removed tensor
        if k != "__metadata__" and v["data_offsets"][0] >= e:
            v["data_offsets"] = [v["data_offsets"][0] - (e - b), v["data_offsets"][1] - (e - b)]
    data = data[:b] + data[e:]
    _resign(header, data)
    rewrite(path, header, data)
    with pytest.raises(ParamFileError, match="missing \\['layer0.s'\\]"):
        load_params(path)


def test_extra_tensor(path):
    header, data = read_raw(path)
    header["intruder"] = {"dtype": "U8", "shape": [2], "data_offsets": [len(data), len(data) + 2]}
    data = data + b"\x01\x02"
    _resign(header, data)
    rewrite(path, header, data)
    with pytest.raises(ParamFileError, match="intruder"):
        load_params(path)


def test_shape_disagrees_with_metadata(path):
    header, data = read_raw(path)
    header["layer0.w"]["shape"] = [4, 3]
    _resign(header, data)
    rewrite(path, header, data)
    with pytest.raises(ParamFileError, match="layer0.w"):
        load_params(path)


def test_dtype_disagrees_with_metadata(path):
    header, data = read_raw(path)
    header["layer0.w"]["dtype"] = "U8"
    _resign(header, data)
    rewrite(path, header, data)
    with pytest.raises(ParamFileError, match="metadata says"):
        load_params(path)


def test_huge_shape_rejected(path):
    header, data = read_raw(path)
    header["layer0.w"]["shape"] = [2**62, 2**62]
    _resign(header, data)
    rewrite(path, header, data)
    with pytest.raises(ParamFileError, match="shape"):
        load_params(path)


def test_huge_header_length(tmp_path):
    p = tmp_path / "x.pqs"
    p.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(ParamFileError, match="header length"):
        load_params(p)


def test_deeply_nested_json(path):
    header, data = read_raw(path)
    deep = "[" * 100_000 + "]" * 100_000
    header["__metadata__"]["pyqsim"] = '{"format": "pyqsim-params", "version": 1, "x": ' + deep + "}"
    rewrite(path, header, data)
    with pytest.raises(ParamFileError, match="nested|JSON"):
        load_params(path)


def test_huge_number_in_json(path):
    header, data = read_raw(path)
    header["__metadata__"]["pyqsim"] = '{"format": "pyqsim-params", "version": 1, "x": 1' + "0" * 100_000 + "}"
    rewrite(path, header, data)
    with pytest.raises(ParamFileError, match="JSON"):
        load_params(path)


def test_nan_constant_in_json(path):
    header, data = read_raw(path)
    header["__metadata__"]["pyqsim"] = '{"format": "pyqsim-params", "version": 1, "x": NaN}'
    rewrite(path, header, data)
    with pytest.raises(ParamFileError, match="NaN"):
        load_params(path)


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "", "x" * 300, ".hidden"])
def test_hostile_tensor_names(tmp_path, name):
    with pytest.raises(ParamFileError, match="name"):
        save_params(tmp_path / "x.pqs", {name: np.zeros(1, np.int8)}, {})
    p = tmp_path / "y.pqs"
    rewrite(p, {name: {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]},
                "__metadata__": {"pyqsim": json.dumps({"format": "pyqsim-params", "version": 1, "tensors": {}}),
                                 "sha256": "0"}}, b"\x00")
    with pytest.raises(ParamFileError, match="name"):
        load_params(p)


def test_no_pickle_dtype(tmp_path):
    with pytest.raises(TypeError, match="unsupported dtype"):
        save_params(tmp_path / "x.pqs", {"o": np.array([object()], dtype=object)}, {})


def test_interrupted_export_leaves_old_file(path, monkeypatch):
    before = path.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pf.os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        save_params(path, {"other": np.ones(5, np.int8)}, {})
    assert path.read_bytes() == before
    assert [f for f in os.listdir(path.parent) if f.endswith(".tmp")] == []


# --------------------------------------------------------------------------- program validation (pyqsim.load)

def _program():
    """A small valid program: x -> quantize -> dequantize -> linear(w, b)."""
    tensors = {"s": np.array(0.1, np.float32), "z": np.array(128, np.int32), "w": np.ones((3, 4), np.float32),
               "b": np.zeros(3, np.float32)}
    nodes = [{"name": "q", "kind": "quantize", "args": [{"@": "x"}], "attrs": {"bits": 8},
              "tensors": {"scale": "s", "zero_point": "z"}},
             {"name": "dq", "kind": "dequantize", "args": [{"@": "q"}], "tensors": {"scale": "s", "zero_point": "z"}},
             {"name": "w", "kind": "constant", "tensors": {"value": "w"}},
             {"name": "b", "kind": "constant", "tensors": {"value": "b"}},
             {"name": "fc", "kind": "linear", "args": [{"@": "dq"}, {"@": "w"}, {"@": "b"}]}]
    prog = {"inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}], "nodes": nodes,
            "outputs": [{"name": "y", "value": {"@": "fc"}}]}
    return tensors, prog


def _edit_unknown_kind(t, p):
    p["nodes"][4]["kind"] = "conv9d"


def _edit_missing_tensor(t, p):
    p["nodes"][0]["tensors"]["scale"] = "absent"


def _edit_missing_slot(t, p):
    del p["nodes"][1]["tensors"]["zero_point"]


def _edit_wrong_rank(t, p):
    t["s2"] = np.array([0.1], np.float32)
    p["nodes"][1]["tensors"]["scale"] = "s2"


def _edit_wrong_dtype(t, p):
    t["z2"] = np.array(128.0, np.float32)
    p["nodes"][0]["tensors"]["zero_point"] = "z2"


def _edit_dangling(t, p):
    p["nodes"][1]["args"] = [{"@": "nowhere"}]


def _edit_cycle(t, p):  # q reads dq, dq reads q
    p["nodes"][0]["args"] = [{"@": "dq"}]


def _edit_duplicate(t, p):
    p["nodes"][3]["name"] = "w"


def _edit_unknown_attr(t, p):
    p["nodes"][0]["attrs"]["rounding"] = "up"


def _edit_bad_attr_value(t, p):
    p["nodes"][0]["attrs"]["bits"] = "eight"


def _edit_bad_arg(t, p):
    p["nodes"][4]["args"][0] = "dq"


@pytest.mark.parametrize("edit, node, why", [
    (_edit_unknown_kind, "fc", "unknown kind 'conv9d'"),
    (_edit_missing_tensor, "q", "not in the file"),
    (_edit_missing_slot, "dq", "lacks tensor 'zero_point'"),
    (_edit_wrong_rank, "dq", "expected 0 dimensions"),
    (_edit_wrong_dtype, "q", "has dtype float32"),
    (_edit_dangling, "dq", "dangling edge or cycle"),
    (_edit_cycle, "q", "dangling edge or cycle"),
    (_edit_duplicate, "w", "defined twice"),
    (_edit_unknown_attr, "q", "unknown attribute 'rounding'"),
    (_edit_bad_attr_value, "q", "attribute 'bits' must be int"),
    (_edit_bad_arg, "fc", "argument 'x' must be tensor"),
], ids=lambda v: v.__name__[6:] if callable(v) else None)
def test_bad_program_names_the_node(tmp_path, edit, node, why):
    import pyqsim

    tensors, prog = _program()
    good = tmp_path / "good.pqs"
    save_params(good, tensors, {"program": prog})
    y = pyqsim.load(good).run(np.ones((2, 4), np.float32), backend="reference")
    assert y.shape == (2, 3)
    edit(tensors, prog)
    bad = tmp_path / "bad.pqs"
    save_params(bad, tensors, {"program": prog})
    with pytest.raises(ParamFileError, match=f"node '{node}'.*{why}") as exc:
        pyqsim.load(bad)
    assert str(bad) in str(exc.value)


@pytest.mark.parametrize("cut", [5, 100, -3])
def test_truncated_program_names_the_file(tmp_path, cut):
    import pyqsim

    tensors, prog = _program()
    p = tmp_path / "prog.pqs"
    save_params(p, tensors, {"program": prog})
    blob = p.read_bytes()
    p.write_bytes(blob[:cut])
    with pytest.raises(ParamFileError, match="truncated|JSON|data_offsets|checksum") as exc:
        pyqsim.load(p)
    assert str(p) in str(exc.value)
