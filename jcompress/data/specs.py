"""Static facts about each dataset: shape, classes, normalisation, augmentation."""

from __future__ import annotations

from typing import NamedTuple


class DatasetSpec(NamedTuple):
  """What a model and the input pipeline need to know about a dataset.

  Attributes:
    name: the public name (``jcompress train --dataset NAME``).
    image_shape: ``(H, W, C)`` of one image (``(T, H, W, C)`` for video).
    num_classes: number of labels, ids ``0 .. num_classes - 1``.
    mean: per-channel training-set mean on the 0-1 scale.
    std: per-channel training-set standard deviation on the 0-1 scale.
    augment: whether training uses random crop + horizontal flip.
    class_names: the classes' names where the source gives them (tfds datasets).
  """
  name: str
  image_shape: tuple[int, ...]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment: bool
  class_names: tuple[str, ...] = ()


# MNIST: 33.318 / 255 and 78.567 / 255 (see shared/data/README.md). Fashion-MNIST
# and CIFAR-10 are the published training-set statistics of the original files.
_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)
_SPECS = {
    "cifar10": DatasetSpec("cifar10", (32, 32, 3), 10, (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616), augment=True),
    "fashion_mnist": DatasetSpec("fashion_mnist", (28, 28, 1), 10, (0.2860,), (0.3530,),
                                 augment=False),
    "mnist": DatasetSpec("mnist", (28, 28, 1), 10, _MNIST_MEAN, _MNIST_STD, augment=False),
    # One MNIST digit moving across 8 frames of 32x32 (jcompress.data.moving_mnist).
    "moving_mnist": DatasetSpec("moving_mnist", (8, 32, 32, 1), 10, (0.1000,), (0.2752,),
                                augment=False),
    "mnist_sample": DatasetSpec("mnist_sample", (28, 28, 1), 10, _MNIST_MEAN, _MNIST_STD,
                                augment=False),
}


def names() -> list[str]:
  """The valid dataset names, sorted."""
  return sorted(_SPECS)


def is_user(name: str) -> bool:
  """Whether ``name`` names the user's own data, ``npz:PATH`` or ``folder:PATH``."""
  return (isinstance(name, str) and name.startswith(("npz:", "folder:"))
          and bool(name.split(":", 1)[1]))


def is_tfds(name: str) -> bool:
  """Whether ``name`` names a tfds dataset read generically, ``tfds:NAME[;options]``
  (:mod:`jcompress.data.tfds_generic`)."""
  return isinstance(name, str) and name.startswith("tfds:") and len(name) > len("tfds:")


def check_name(name: str) -> None:
  """Raises ValueError unless ``name`` is a known dataset, ``npz:PATH`` / ``folder:PATH``
  or a well-formed ``tfds:NAME[;options]``."""
  if is_tfds(name):
    from jcompress.data import tfds_generic  # pylint: disable=import-outside-toplevel
    tfds_generic.parse(name)
  elif not (name in _SPECS or is_user(name)):
    raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(names())}, "
                     "npz:PATH, folder:PATH, tfds:NAME (any tfds image-classification "
                     "dataset)")


def spec(name: str, data_dir: str | None = None) -> DatasetSpec:
  """The :class:`DatasetSpec` of dataset ``name``.

  Args:
    name: one of :func:`names`, or ``npz:PATH`` / ``folder:PATH`` (the user's own
      data, :mod:`jcompress.data.user`: shape, classes and statistics are read from
      the data, loading it once a process), or ``tfds:NAME[;options]`` (any tfds
      image-classification dataset, :mod:`jcompress.data.tfds_generic`).
    data_dir: where a ``tfds:`` dataset is prepared (default: see that module).

  Returns:
    The dataset's static description.

  Raises:
    ValueError: ``name`` is not a known dataset.

  >>> spec("mnist").image_shape
  (28, 28, 1)
  """
  if is_user(name):  # npz:PATH, folder:PATH: read from the data (jcompress.data.user)
    from jcompress.data import sources  # pylint: disable=import-outside-toplevel
    return sources.user_spec(name)
  if is_tfds(name):
    from jcompress.data import tfds_generic  # pylint: disable=import-outside-toplevel
    return tfds_generic.spec(name, data_dir)
  if name not in _SPECS:
    raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(names())}, "
                     "npz:PATH, folder:PATH, tfds:NAME (any tfds image-classification "
                     "dataset)")
  return _SPECS[name]
