"""A crafted pickle that would run a command is refused, and the command does not run."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from aemt.data.mmsa import read_labeled
from aemt.data.safe_pickle import safe_load_pickle
from aemt.errors import UnsafePickleError
from conftest import make_labeled, write_pickle


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused_and_command_not_run(tmp_path):
    marker = tmp_path / "pwned"
    data = make_labeled()
    data["train"]["id"] = _Exploit(marker)
    path = write_pickle(tmp_path / "evil.pkl", data)
    with pytest.raises(UnsafePickleError) as info:
        read_labeled(path)
    assert "evil.pkl" in str(info.value) and "system" in str(info.value)
    assert not marker.exists()
    # sanity: the plain unpickler WOULD have run it
    with open(path, "rb") as handle:
        pickle.load(handle)
    assert marker.exists()


def test_eval_builtin_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (eval, ("1+1",))
    path = write_pickle(tmp_path / "eval.pkl", {"train": Evil()})
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        safe_load_pickle(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_and_containers_allowed(tmp_path, protocol):
    obj = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [1, "x", 2.5], "c": np.float64(3.0),
           "d": np.array(["s1", "s2"], dtype=object), "e": (np.int64(4), None)}
    path = tmp_path / "ok.pkl"
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=protocol)
    out = safe_load_pickle(path)
    assert np.array_equal(out["a"], obj["a"]) and out["b"] == obj["b"] and out["c"] == 3.0
    assert list(out["d"]) == ["s1", "s2"]
