"""Builds the embedded ``mnist_sample`` from the real MNIST IDX files.

The sample is the first 2,000 training and the first 500 test images of MNIST, in
file order (``load`` puts them in its class-mixed order), stored compressed in ``jcompress/data/sample/mnist_sample.npz``::

  python -m jcompress.data.make_sample --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import os
import pathlib

import numpy as np

from jcompress import atomic
from jcompress.data import sources

NUM_TRAIN, NUM_TEST = 2000, 500
SAMPLE_PATH = pathlib.Path(__file__).parent / "sample" / sources.SAMPLE_FILE


def build(data_dir: str | os.PathLike, out: pathlib.Path = SAMPLE_PATH) -> pathlib.Path:
  """Writes the sample from the MNIST files under ``data_dir`` to ``out``.

  Args:
    data_dir: a data directory holding ``mnist/`` (or the MNIST folder itself).
    out: the ``.npz`` to write.

  Returns:
    ``out``.
  """
  ds, _ = sources.read_offline("mnist", data_dir)  # file order, as the sample always was
  out.parent.mkdir(parents=True, exist_ok=True)
  with atomic.atomic_open(out, "wb") as f:
    np.savez_compressed(f, train_images=ds.train_images[:NUM_TRAIN],
                        train_labels=ds.train_labels[:NUM_TRAIN],
                        test_images=ds.test_images[:NUM_TEST],
                        test_labels=ds.test_labels[:NUM_TEST])
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", default=os.environ.get(sources.DATA_DIR_ENV),
                      help=f"folder holding mnist/ (default ${sources.DATA_DIR_ENV})")
  parser.add_argument("--out", type=pathlib.Path, default=SAMPLE_PATH)
  args = parser.parse_args(argv)
  if not args.data_dir:
    parser.error(f"pass --data-dir or set {sources.DATA_DIR_ENV}")
  path = build(args.data_dir, args.out)
  print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
