"""Spec §9.1: a float32 integer output stage followed by a product with a power of two runs as one output stage.

The oracle is the unfused arithmetic evaluated in NumPy float32 (each product one IEEE rounding) and, for whole
programs, the same program run with every node's own value kept (``execute(keep=True)`` does not fold); compared
with ``==`` on the float32 bit patterns.
"""
from __future__ import annotations

import numpy as np
from hypothesis import assume, example, given
from hypothesis import strategies as st

from pyqsim.program.program import Program, _folded_scale, _pow2_product

F32 = np.float32
TINY = float(np.finfo(F32).tiny)
FMAX = float(np.finfo(F32).max)


def _bits(a):
    return np.ascontiguousarray(a, F32).view(np.uint32)


@given(a=st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=40),
       s=st.floats(-FMAX, FMAX, width=32, allow_nan=False, allow_infinity=False).filter(lambda v: v != 0),
       e=st.integers(-149, 127), div=st.booleans())
@example(a=[1, -1, 2**31 - 1, -2**31, 0], s=TINY, e=0, div=False)        # smallest normal scale, c = 1
@example(a=[1, -1, 3, 0], s=TINY * 8, e=-3, div=False)                    # s * c = 2^-126 exactly: folds
@example(a=[1, -1, 3, 0], s=TINY * 4, e=-3, div=False)                    # s * c subnormal: refused
@example(a=[2**31 - 1, -2**31], s=2.0**96, e=0, div=False)                 # 2^31 * s = 2^127 < FLT_MAX: folds
@example(a=[2**31 - 1, -2**31], s=2.0**96, e=1, div=False)                 # refused: could overflow
@example(a=[12345, -7], s=0.1, e=3, div=True)
@example(a=[1, -2**31], s=TINY, e=-149, div=True)                          # dividing by the smallest subnormal
def test_folded_scale_equals_the_two_products(a, s, e, div):
    """The literal c = 2^e is a float32; the unfused node computes fl32(fl32(fl32(a) * s) * c) (or / c)."""
    c = F32(2.0**e)
    cc = 1.0 / float(c) if div else float(c)  # what _pow2_product passes on
    folded = _folded_scale(np.array(s, F32), cc)
    assume(folded is not None)
    acc = np.array(a, np.int64)
    with np.errstate(over="ignore"):
        y = acc.astype(F32) * F32(s)
        two = y / c if div else y * c
    one = acc.astype(F32) * folded
    assert np.array_equal(_bits(one), _bits(two))


@given(s=st.floats(-FMAX, FMAX, width=32, allow_nan=False, allow_infinity=False).filter(lambda v: v != 0),
       e=st.integers(-149, 127))
@example(s=TINY * 4, e=-3)
@example(s=2.0**96, e=1)
def test_folded_scale_refuses_exactly_outside_the_normal_range(s, e):
    c = 2.0**e
    mag = abs(s)
    inside = min(mag, mag * c) >= TINY and 2.0**31 * max(mag, mag * c) < FMAX
    assert (_folded_scale(np.array(s, F32), c) is not None) == inside


def _node(name, kind, args, attrs=None, tensors=None):
    n = {"name": name, "kind": kind, "args": args}
    if attrs:
        n["attrs"] = attrs
    if tensors:
        n["tensors"] = tensors
    return n


def test_pow2_product_recognises_only_literal_powers_of_two():
    ref = {"@": "y"}
    assert _pow2_product(_node("m", "binary", [ref, 0.125], {"op": "mul"})) == ("y", 0.125)
    assert _pow2_product(_node("m", "binary", [-4, ref], {"op": "mul"})) == ("y", -4.0)
    assert _pow2_product(_node("m", "binary", [ref, 8.0], {"op": "div"})) == ("y", 0.125)
    for args, op in [([ref, 0.1], "mul"), ([8.0, ref], "div"), ([ref, ref], "mul"), ([ref, 0.0], "mul"),
                     ([ref, 2.0**-150], "mul"), ([ref, 0.5], "add")]:
        assert _pow2_product(_node("m", "binary", args, {"op": op})) == (None, None)
    assert _pow2_product(_node("m", "binary", [ref, 0.5], {"op": "mul", "alpha": 2})) == (None, None)


def _bmm_program(scale: float, factor, extra_user: bool = False):
    """codes a, b -> int_bmm (float32 out) -> * factor (-> + itself when ``extra_user``)."""
    tensors = {"s": np.array(scale, F32)}
    nodes = [_node("qk", "int_bmm", [{"@": "a"}, {"@": "b"}], {"a_zero_point": 3, "b_zero_point": 250},
                   {"out_scale": "s"}),
             _node("mul", "binary", [{"@": "qk"}, factor], {"op": "mul", "dtype": "float32"})]
    out = "mul"
    if extra_user:
        nodes.append(_node("sum", "binary", [{"@": "mul"}, {"@": "qk"}], {"op": "add", "dtype": "float32"}))
        out = "sum"
    prog = {"inputs": [{"name": "a", "dtype": "uint8", "shape": [None, 5, 7]},
                       {"name": "b", "dtype": "uint8", "shape": [None, 6, 7]}],
            "nodes": nodes, "outputs": [{"name": "y", "value": {"@": out}}]}
    return Program(tensors, {"program": prog})


def _both(p, a, b, backend):
    folded = p.run(a, b, backend=backend)
    kept, _ = p.execute((a, b), None, backend, keep=True)
    return folded, kept[0]


@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(2.0**-100, 2.0**90, width=32),
       e=st.integers(-20, 20), backend=st.sampled_from(["reference", "auto"]))
@example(seed=0, scale=2.0**-123, e=-3, backend="auto")   # s * c = 2^-126: the edge that still folds
def test_folded_program_equals_the_unfolded_run(seed, scale, e, backend):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (2, 5, 7), dtype=np.uint8)
    b = rng.integers(0, 256, (2, 6, 7), dtype=np.uint8)
    p = _bmm_program(scale, 2.0**e)
    scales, alias = p._scale_folds()
    assert (alias == {"mul": "qk"}) == (_folded_scale(np.array(scale, F32), 2.0**e) is not None)
    folded, kept = _both(p, a, b, backend)
    assert np.array_equal(_bits(folded), _bits(kept))


def test_no_fold_when_the_product_is_not_the_only_user():
    p = _bmm_program(0.01, 0.125, extra_user=True)
    assert p._scale_folds() == ({}, {})
    a = np.full((1, 5, 7), 7, np.uint8)
    b = np.full((1, 6, 7), 9, np.uint8)
    folded, kept = _both(p, a, b, "auto")
    assert np.array_equal(_bits(folded), _bits(kept))


# --------------------------------------------------------------------------- §15.9: a float stage's codes


def _stage_program(kind, quant, extra_user=False, gap=False, identities=0):
    """x -> float stage (-> identity nodes) -> quantize / quantize_log (-> + the stage's value when ``extra_user``;
    an add between the two when ``gap``)."""
    stage_args = {"softmax": [{"@": "x"}, -1], "layer_norm": [{"@": "x"}, [7]],
                  "group_norm": [{"@": "x"}, 7]}.get(kind, [{"@": "x"}])
    nodes = [_node("f", kind, stage_args)]
    last = "f"
    for i in range(identities):
        nodes.append(_node(f"id{i}", "identity", [{"@": last}]))
        last = f"id{i}"
    if gap:
        nodes.append(_node("g", "binary", [{"@": "x"}, {"@": "x"}], {"op": "add", "dtype": "float32"}))
    if quant == "quantize":
        nodes.append(_node("q", "quantize", [{"@": last}], {"bits": 6}, {"scale": "s", "zero_point": "z"}))
    else:
        nodes.append(_node("q", "quantize_log", [{"@": last}], {"bits": 4, "mode": "sqrt2"}, {"delta": "d"}))
    outs = [{"name": "y", "value": {"@": "q"}}]
    if extra_user:
        outs.append({"name": "f", "value": {"@": "f"}})
    prog = {"inputs": [{"name": "x", "dtype": "float32", "shape": [None, 7]}], "nodes": nodes, "outputs": outs}
    tensors = {"s": np.array(0.03, F32), "z": np.array(20, np.int32), "d": np.array(0.75, F32)}
    return Program(tensors, {"program": prog})


@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["gelu", "silu", "softmax", "layer_norm", "group_norm"]),
       quant=st.sampled_from(["quantize", "quantize_log"]), backend=st.sampled_from(["reference", "auto"]),
       extra_user=st.booleans(), gap=st.booleans(), identities=st.integers(0, 2))
def test_stage_codes_equal_the_unfused_run(seed, kind, quant, backend, extra_user, gap, identities):
    """A float stage whose only reader is the quantize node right after it (past identity nodes) computes that node's
    codes (§15.9); the result equals the run that keeps every value (no fusion), and nothing else is fused."""
    assume(quant == "quantize" or kind == "softmax")  # log codes need p >= 0
    p = _stage_program(kind, quant, extra_user, gap, identities)
    assert (set(p._code_fusions()) == {"q"}) == (not extra_user and not gap)
    x = (np.random.default_rng(seed).standard_normal((3, 7)) * 4).astype(F32)
    fused = p.run(x, backend=backend)
    kept, _ = p.execute((x,), None, backend, keep=True)
    got = fused[0] if extra_user else fused
    assert got.dtype == np.uint8 and np.array_equal(got, kept[0])


# --------------------------------------------------------------------------- §9.2: quantize before a move


def _move_program(move, arg, value, bits, extra_user=False):
    """x [N, C, H, W] -> pad (widths ``arg``, ``value``) or upsample_nearest (``arg``: scales or a size) -> quantize."""
    if move == "pad":
        node = _node("m", "pad", [{"@": "x"}, arg] + ([] if value is None else [value]), {"dtype": "float32"})
    elif isinstance(arg, tuple):
        node = _node("m", "upsample_nearest", [{"@": "x"}, None], {"dtype": "float32", "scales": list(arg)})
    else:
        node = _node("m", "upsample_nearest", [{"@": "x"}, arg], {"dtype": "float32"})
    nodes = [node, _node("q", "quantize", [{"@": "m"}], {"bits": bits}, {"scale": "s", "zero_point": "z"})]
    outs = [{"name": "y", "value": {"@": "q"}}] + ([{"name": "m", "value": {"@": "m"}}] if extra_user else [])
    prog = {"inputs": [{"name": "x", "dtype": "float32", "shape": [None, None, None, None]}], "nodes": nodes,
            "outputs": outs}
    tensors = {"s": np.array(0.05, F32), "z": np.array(2**bits // 3, np.int32)}
    return Program(tensors, {"program": prog})


def _oracle(move, x, arg, value):
    """The move on float32 values, written out: NumPy's pad, or the floor(i * in / out) index of nearest upsampling."""
    if move == "pad":
        width = [(0, 0)] * 2 + [(arg[2], arg[3]), (arg[0], arg[1])]
        return np.pad(x, width, constant_values=0 if value is None else value).astype(F32)
    size = [int(np.floor(s * f)) for s, f in zip(x.shape[2:], arg)] if isinstance(arg, tuple) else arg
    for ax, (src, dst) in enumerate(zip(x.shape[2:], size)):
        x = np.take(x, np.minimum(np.floor(np.arange(dst) * (src / dst)).astype(np.int64), src - 1), axis=2 + ax)
    return x


MOVES = st.one_of(
    st.tuples(st.just("pad"), st.lists(st.integers(0, 3), min_size=4, max_size=4),
              st.none() | st.floats(width=32, allow_nan=False, allow_infinity=False) | st.integers(-300, 300)),
    st.tuples(st.just("upsample"), st.tuples(st.integers(1, 3), st.integers(1, 3)).map(lambda t: (float(t[0]), float(t[1])))
              | st.lists(st.integers(1, 9), min_size=2, max_size=2), st.none()))


@given(seed=st.integers(0, 2**32 - 1), move=MOVES, bits=st.integers(2, 8), shape=st.tuples(
    st.integers(1, 2), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)), backend=st.sampled_from(
    ["reference", "auto"]), extra_user=st.booleans())
@example(seed=1, move=("pad", [0, 1, 0, 1], None), bits=8, shape=(2, 3, 4, 4), backend="auto", extra_user=False)
@example(seed=2, move=("pad", [1, 1, 1, 1], FMAX), bits=2, shape=(1, 1, 2, 3), backend="auto", extra_user=False)
@example(seed=3, move=("upsample", (2.0, 2.0), None), bits=8, shape=(2, 3, 4, 4), backend="auto", extra_user=False)
@example(seed=4, move=("upsample", [7, 3], None), bits=4, shape=(1, 2, 3, 2), backend="auto", extra_user=False)
def test_quantize_before_a_move_equals_the_kept_run(seed, move, bits, shape, backend, extra_user):
    """§9.2: the quantize that alone reads a pad / upsample_nearest runs first and the move on its codes (the pad
    value replaced by its code); the codes equal the kept run's and the oracle's (quantize of the moved floats)."""
    kind, arg, value = move
    p = _move_program(kind, arg, value, bits, extra_user)
    assert (set(p._moves({})) == {"q"}) == (not extra_user)
    x = (np.random.default_rng(seed).standard_normal(shape) * 3).astype(F32)
    got = p.run(x, backend=backend)
    got = got[0] if extra_user else got
    kept, _ = p.execute((x,), None, backend, keep=True)
    from pyqsim import ops
    want = ops.quantize(_oracle(kind, x, arg, value), 0.05, 2**bits // 3, "uint8", bits=bits, backend="reference")
    assert got.dtype == np.uint8 and np.array_equal(got, kept[0]) and np.array_equal(got, want)


def test_runs_in_any_order_of_modes_backends_and_profiles():
    """One program run fused, kept, folded, on each backend and under another profile, in turn and again: each run
    equals the same run of a fresh program (a step's kept op call never serves another mode, backend or profile)."""
    from pyqsim import ops
    backends = ["reference"] + (["cpu"] if ops.unavailable_reason("cpu") == "" else [])
    x = (np.random.default_rng(5).standard_normal((3, 7)) * 4).astype(F32)
    a = np.random.default_rng(6).integers(0, 256, (2, 5, 7), dtype=np.uint8)
    b = np.random.default_rng(7).integers(0, 256, (2, 6, 7), dtype=np.uint8)
    def stage():
        return _stage_program("gelu", "quantize")

    def bmm():
        return _bmm_program(0.01, 0.125)

    runs = [(lambda p, be: p.run(x, backend=be), stage),
            (lambda p, be: p.execute((x,), None, be, keep=True)[0][0], stage),
            (lambda p, be: p.run(a, b, backend=be), bmm),
            (lambda p, be: p.execute((a, b), None, be, keep=True)[0][0], bmm)]
    shared = {id(make): make() for make in (stage, bmm)}
    for _ in range(2):
        for be in backends:
            for run, make in runs:
                assert np.array_equal(run(shared[id(make)], be), run(make(), be))
    p = _stage_program("gelu", "quantize")
    for numerics in ("pyqsim", "onnxruntime", "pyqsim"):
        assert np.array_equal(p.run(x, numerics=numerics), _stage_program("gelu", "quantize").run(x, numerics=numerics))


def test_no_move_when_the_widths_are_computed_in_the_run():
    """A pad whose widths name a value of the run (a list holding a reference) stays before its quantize (§9.2
    needs literal widths); the run equals the kept run and the oracle."""
    from pyqsim import ops
    from pyqsim.program.program import Program
    nodes = [_node("n", "size", [{"@": "x"}, 0]),
             _node("m", "pad", [{"@": "x"}, [0, {"@": "n"}, 1, 0]], {"dtype": "float32"}),
             _node("q", "quantize", [{"@": "m"}], {"bits": 8}, {"scale": "s", "zero_point": "z"})]
    prog = {"inputs": [{"name": "x", "dtype": "float32", "shape": [None, None, None, None]}], "nodes": nodes,
            "outputs": [{"name": "y", "value": {"@": "q"}}]}
    p = Program({"s": np.array(0.05, F32), "z": np.array(9, np.int32)}, {"program": prog})
    assert p._moves({}) == {}
    x = (np.random.default_rng(8).standard_normal((2, 3, 4, 5)) * 3).astype(F32)
    kept, _ = p.execute((x,), None, "auto", keep=True)
    want = ops.quantize(np.pad(x, [(0, 0), (0, 0), (1, 0), (0, 2)]), 0.05, 9, "uint8", backend="reference")
    assert np.array_equal(p.run(x), kept[0]) and np.array_equal(p.run(x), want)
