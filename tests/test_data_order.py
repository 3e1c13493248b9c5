"""Every dataset in a class-mixed, content-determined order; subsets stratified."""

import numpy as np
import pytest

from jcompress import data
from jcompress.data import order


@pytest.mark.parametrize("name", ["mnist", "cifar10", "mnist_sample", "moving_mnist"])
def test_every_subset_of_100_or_more_holds_every_class(name, data_dir):
  ds = data.load(name, data_dir, verbose=False)
  classes = data.spec(name).num_classes
  for labels in (ds.train_labels, ds.test_labels):
    for n in sorted({100, min(1000, len(labels)), len(labels)}):
      assert len(np.unique(labels[order.stratified(labels, n)])) == classes
    assert len(np.unique(labels[:100])) == classes  # the stored order is mixed too


def test_order_depends_on_contents_not_on_the_source_order():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (500, 4, 4, 1), dtype=np.uint8)
  labels = np.sort(rng.integers(0, 5, 500)).astype(np.int32)  # class by class
  shuffled = rng.permutation(500)
  a = order.mixed_order(images, labels)
  b = order.mixed_order(images[shuffled], labels[shuffled])
  np.testing.assert_array_equal(images[a], images[shuffled][b])
  assert len(np.unique(labels[a][:50])) == 5


def test_stratified_counts_are_exact_and_proportional():
  labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
  sub = order.stratified(labels, 10)
  assert np.bincount(labels[sub]).tolist() == [7, 2, 1]
  assert len(order.stratified(labels, 33)) == 33
  assert np.all(np.diff(sub) > 0)
  with pytest.raises(ValueError, match="a subset of 0 examples"):
    order.stratified(labels, 0)
