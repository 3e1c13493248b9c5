import numpy as np
import pytest

from jcompress.transforms import select as sel


def _params():
  return {"conv1": {"kernel": np.zeros((5, 5, 1, 20)), "bias": np.zeros(20)},
          "block1": {"dw": {"kernel": np.zeros((3, 3, 1, 20))}, "bn": {"scale": np.ones(20)}},
          "fc1": {"kernel": np.zeros((800, 500)), "bias": np.zeros(500)},
          "fc2": {"kernel": np.zeros((500, 10)), "bias": np.zeros(10)}}


def test_flatten_keeps_creation_order_and_roundtrips():
  flat = sel.flatten(_params())
  assert list(flat)[:3] == ["conv1/kernel", "conv1/bias", "block1/dw/kernel"]
  assert sel.flatten(sel.unflatten(flat)).keys() == flat.keys()


@pytest.mark.parametrize("kw, expected", [
    ({}, ["conv1/kernel", "block1/dw/kernel", "fc1/kernel", "fc2/kernel"]),
    ({"pattern": "^fc"}, ["fc1/kernel", "fc2/kernel"]),
    ({"min_size": 500}, ["fc1/kernel", "fc2/kernel"]),
    ({"min_size": 5000}, ["fc1/kernel"]),
    ({"keep_ends": True}, ["block1/dw/kernel", "fc1/kernel"]),
    ({"pattern": "dw|fc", "keep_ends": True}, ["block1/dw/kernel", "fc1/kernel"]),
])
def test_select_rules(kw, expected):
  assert sel.select(_params(), **kw) == expected


def test_select_nothing_lists_paths():
  with pytest.raises(ValueError, match=r"(?s)--select 'conv9' selects no tensor.*conv1/kernel \(5, 5, 1, 20\).*fc2/kernel"):
    sel.select(_params(), "conv9")


def test_mask_tree():
  m = sel.mask_tree(_params(), ["fc1/kernel"])
  assert m["fc1"]["kernel"] is True and m["fc1"]["bias"] is False and m["block1"]["bn"]["scale"] is False
