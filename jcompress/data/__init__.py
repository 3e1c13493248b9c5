"""Datasets: offline and tfds readers, a decode-once cache, and batching.

Datasets are ``mnist``, ``fashion_mnist``, ``cifar10`` and ``mnist_sample``. Each
of the first three is read from one of two sources, tried in this order:

1. Offline files, when a data directory is given (``load(data_dir=...)``, CLI
   ``--data-dir``, or ``$JCOMPRESS_DATA_DIR``), holding the standard public files:

   * ``DIR/mnist/`` and ``DIR/fashion_mnist/``: the four MNIST-format files
     ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``, or directly in ``DIR``
     when it is the dataset's own folder.
   * ``DIR/cifar10/`` (or ``DIR``): the original ``cifar-10-batches-py/`` or
     ``cifar-10-python.tar.gz``, else the image-folder archive
     ``cifar10-jpeg.tar.gz`` (``{train,test}/<class>/NNNN.jpg``; classes in
     alphabetical order are the label ids). The original pixels are preferred.

2. tfds, via ``tfds.data_source`` (random-access ``array_record`` files, which
   need no TensorFlow), when tfds has already prepared the dataset in its data
   directory (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). tfds is asked to
   download and prepare it only when ``JCOMPRESS_TFDS_DOWNLOAD=1``, which needs
   internet and TensorFlow (tfds's generators read files with ``tf.io``); otherwise
   this source is skipped at once, so an offline machine never waits on a
   download. A dataset that tfds prepared as ``tfrecord`` (``tfds.load``'s default)
   is not readable without TensorFlow; such failures are recorded and reported.

The user's own data is ``npz:PATH`` or ``folder:PATH`` (:mod:`jcompress.data.user`):
its shape, classes and normalisation come from the data itself. Any other tfds
image-classification dataset is ``tfds:NAME`` (the CLI's ``--dataset NAME``), read
offline from tfds's data directory with its shape, classes and statistics from the
builder and one pass over the data (:mod:`jcompress.data.tfds_generic`), streamed
when too large to decode into memory.

Without a data directory only tfds is tried. When no source works,
``FileNotFoundError`` lists what was tried and which files are expected where.
``mnist_sample`` (2,000 train / 500 test real MNIST images) ships inside the
package, so demos run on a fresh offline machine; rebuild it with
``python -m jcompress.data.make_sample --data-dir ../shared/data``.

Decoded arrays are cached as ``.npz`` in ``cache_dir``, else jcompress's cache folder
(``$JCOMPRESS_CACHE_DIR``, ``$XDG_CACHE_HOME/jcompress`` or ``~/.cache/jcompress``),
keyed by the source files' path, size and mtime, and
written atomically (:mod:`jcompress.atomic`). A cache file is checked like a
source when read; one that fails is discarded with a warning and rebuilt from the
source (see :func:`load`).

>>> from jcompress import data
>>> ds = data.load("mnist_sample", verbose=False)
>>> s = data.spec("mnist_sample")
>>> batch = next(data.batches(ds.train_images, ds.train_labels, 128, mean=s.mean,
...                           std=s.std, seed=0, epoch=0))
>>> batch["image"].shape, batch["label"].dtype
((128, 28, 28, 1), dtype('int32'))
"""

from jcompress.data.pipeline import batches, num_batches
from jcompress.data.sources import Dataset, load
from jcompress.data.specs import DatasetSpec, check_name, is_tfds, is_user, names, spec

__all__ = ["Dataset", "DatasetSpec", "batches", "check_name", "is_tfds", "is_user", "load",
           "names", "num_batches", "spec"]
