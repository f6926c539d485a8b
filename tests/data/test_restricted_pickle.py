"""The restricted unpickler: builds arrays, sparse matrices and containers, never runs code."""

from __future__ import annotations

import ast
import collections
import os
import pathlib
import pickle

import numpy as np
import pytest
import scipy.sparse as sp

from abkd_deploy.data.restricted_pickle import load_restricted
from abkd_deploy.errors import DatasetError

CORA_FILES = ("x", "tx", "allx", "y", "ty", "ally", "graph")
DEEP = b"]" * 50_000 + b"a" * 49_999 + b"."  # lists nested 50,000 deep


class Payload:
    """Unpickling it calls ``func(*args)``: how a crafted data file runs code."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _write(path: pathlib.Path, obj, protocol: int = 2) -> pathlib.Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def _same(a, b) -> bool:
    if sp.issparse(b):
        return sp.issparse(a) and a.shape == b.shape and (a != b).nnz == 0
    if isinstance(b, np.ndarray):
        return type(a) is np.ndarray and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


@pytest.mark.parametrize("name", CORA_FILES)
@pytest.mark.filterwarnings("ignore:Please import `csr_matrix`:DeprecationWarning")
def test_real_cora_files_load_like_pickle(planetoid_root, name):
    path = planetoid_root / "Cora" / "raw" / f"ind.cora.{name}"
    with open(path, "rb") as f:  # the trusted shared fixture: the reference reading
        expected = pickle.load(f, encoding="latin1")
    got = load_restricted(path)
    assert _same(got, dict(expected) if name == "graph" else expected)
    assert type(got) is (dict if name == "graph" else type(expected))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_allowed_kinds_round_trip(tmp_path, protocol):
    eye = np.eye(3, dtype=np.float32)
    objects = [
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.ones((2, 3), order="F"),
        np.arange(4, dtype=">i4"),  # big-endian: byte order comes from the dtype's state
        np.array([True, False]),
        np.zeros((0, 5), dtype=np.float16),
        np.float32(2.5),
        sp.csr_matrix(eye),
        sp.csc_matrix(eye),
        sp.coo_matrix(eye),
        {"a": [1, (2.0, "x")], 3: {4, 5}, 6: frozenset([7]), 8: None, 9: b"raw"},
        collections.defaultdict(list, {0: [1, 2], 1: [0]}),
    ]
    for obj in objects:
        got = load_restricted(_write(tmp_path / "o.pkl", obj, protocol))
        assert _same(got, dict(obj) if isinstance(obj, dict) else obj), (protocol, obj)
    lil = load_restricted(_write(tmp_path / "lil.pkl", sp.lil_matrix(eye), protocol))
    assert _same(lil, sp.csr_matrix(eye))  # lil comes back as csr


def test_shared_references_stay_shared(tmp_path):
    inner = [1, 2]
    got = load_restricted(_write(tmp_path / "o.pkl", [inner, inner]))
    assert got == [[1, 2], [1, 2]] and got[0] is got[1]


@pytest.mark.parametrize(
    "payload",
    [
        Payload(os.system, "touch {marker}"),
        Payload(open, "{marker}", "w"),
        Payload(pathlib.Path.touch, pathlib.Path("{marker}")),
        Payload(eval, "open({marker!r}, 'w')"),
    ],
    ids=["os.system", "open", "Path.touch", "eval"],
)
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_code_in_a_pickle_never_runs(tmp_path, payload, protocol):
    marker = tmp_path / "pwned"
    args = tuple(
        a.format(marker=str(marker)) if isinstance(a, str) else pathlib.Path(str(marker))
        for a in payload.args
    )
    # Hidden inside an allowed container, as a crafted data file would do.
    path = _write(tmp_path / "ind.cora.x", {"x": [Payload(payload.func, *args)]}, protocol)
    with pytest.raises(DatasetError) as err:
        load_restricted(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg and "not a numpy array" in msg
    assert not marker.exists()


def test_refused_data(tmp_path):
    cases = {
        "object array": np.array([{"a": 1}, None], dtype=object),
        "structured dtype": np.zeros(2, dtype=[("a", "i4"), ("b", "O")]),
        "datetime dtype": np.array(["2020-01-01"], dtype="datetime64[D]"),
        "set of a class": Payload(set, [int]),
        "defaultdict factory": collections.defaultdict(dict),
        "self-referencing": (lambda lst: (lst.append(lst), lst)[1])([]),
    }
    for what, obj in cases.items():
        try:
            raw = pickle.dumps(obj, protocol=2)
        except Exception:  # pragma: no cover - every case is picklable
            pytest.fail(what)
        path = tmp_path / "bad.pkl"
        path.write_bytes(raw)
        with pytest.raises(DatasetError, match=r"refusing to unpickle .*bad\.pkl") as err:
            load_restricted(path)
        assert "\n" not in str(err.value), what


def test_sparse_indices_out_of_range_are_refused(tmp_path):
    good = sp.csr_matrix(np.eye(3))
    bad = sp.csr_matrix(np.eye(3))
    bad.indices = bad.indices.copy()
    bad.indices[1] = 7  # column 7 of a 3-column matrix: would write outside memory in C
    load_restricted(_write(tmp_path / "good.pkl", good))
    with pytest.raises(DatasetError, match=r"bad\.pkl.*(column|indices)"):
        load_restricted(_write(tmp_path / "bad.pkl", bad))


def test_globals_cannot_be_mutated(tmp_path):
    # GLOBAL numpy.dtype, then BUILD with a state: would set attributes on the resolver.
    raw = b"\x80\x02cnumpy\ndtype\n}b."
    path = tmp_path / "build.pkl"
    path.write_bytes(raw)
    with pytest.raises(DatasetError, match="has no state"):
        load_restricted(path)
    assert load_restricted(_write(tmp_path / "ok.pkl", np.zeros(2))).dtype == np.float64


@pytest.mark.parametrize(
    "raw",
    [b"", b"not a pickle", b"\x80\x02]q\x00(K\x01", b"(" * 1000 + b".", DEEP],
    ids=["empty", "text", "truncated", "marks", "deep"],
)
def test_malformed_files_are_one_line(tmp_path, raw):
    path = tmp_path / "junk.pkl"
    path.write_bytes(raw)
    with pytest.raises(DatasetError, match=r"junk\.pkl") as err:
        load_restricted(path)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match=r"cannot read .*nope\.pkl"):
        load_restricted(tmp_path / "nope.pkl")


FULL_UNPICKLERS = {
    (owner, attr)
    for owner in ("pickle", "cPickle", "_pickle", "dill", "joblib", "pd", "pandas")
    for attr in ("load", "loads", "Unpickler", "read_pickle")
}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name):
                yield owner.id, node.func.attr, node


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def test_package_never_unpickles_unrestricted():
    """Every load in the package is restricted: the mechanism, not one call site."""
    package = pathlib.Path(__file__).resolve().parents[2] / "abkd_deploy"
    bad = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(package.parent)
        for owner, attr, call in _calls(tree):
            line = f"{where}:{call.lineno}: {owner}.{attr}"
            if (owner, attr) in FULL_UNPICKLERS:
                bad.append(line)
            elif owner == "torch" and attr == "load" and _keyword(call, "weights_only") is not True:
                bad.append(line + " without weights_only=True")
            elif (
                owner in ("np", "numpy")
                and attr == "load"
                and _keyword(call, "allow_pickle") is not False
            ):
                bad.append(line + " without allow_pickle=False")
    assert bad == []


def test_array_data_must_fit_its_shape(tmp_path):
    raw = pickle.dumps(np.arange(4, dtype=np.int64), protocol=2)
    # Claim 40 elements while the data holds 4: numpy's own __setstate__ is never given it.
    forged = raw.replace(b"K\x04\x85", b"K(\x85", 1)
    assert forged != raw
    path = tmp_path / "forged.pkl"
    path.write_bytes(forged)
    with pytest.raises(DatasetError, match="does not fit its shape"):
        load_restricted(path)
