"""Data sources: the embedded MNIST copy, the usual on-disk formats, normalisation, streaming.

Never imports TensorFlow: this package sits on the inference path.

:func:`open_dataset` finds a source's kind in the registry (:mod:`.sources`) and
returns a :class:`Dataset`, whose images are read lazily (positioned reads for
``.npy``, plain IDX and CSV, sequential reads for gzipped IDX, one file at a time
for image folders), so a bulk job can stream millions of images in bounded memory.

Supported sources, one module each:

* ``mnist`` / ``mnist:test`` / ``mnist:train``: the embedded MNIST copy (:mod:`.embedded`);
* ``file.npz``: keras layout (``x_train, y_train, x_test, y_test``), ``--split`` picks (:mod:`.embedded`);
* ``dir/`` or ``file-images-idx3-ubyte[.gz]``: IDX files, labels found beside them (:mod:`.idx`);
* ``file.npy``: an array of images, ``(N, 28, 28)``, ``(N, 28, 28, 1)`` or flattened
  ``(N, 784)``; optional labels ``.npy`` (:mod:`.npy`);
* ``file.csv``: Kaggle's MNIST layout (``label,pixel0..pixel783`` or just the pixels,
  with or without a header), read row ranges at a time (:mod:`.csvfile`);
* ``dir/`` of image files (PNG, JPEG, BMP, TIFF, GIF) of any size and colour, brought
  to MNIST's format; labels from digit-named sub-folders (:mod:`.images`).

Each source has one :meth:`~.sources.Source.identity`, which names the data for a
resumed job's fingerprint, for metrics.json and for Dask workers.
"""

from ..engine.preprocess import NORMALIZATIONS, check_finite, normalize
from . import csvfile, idx, images, npy  # noqa: F401  (each registers its source kinds)
from .dataset import Dataset
from .embedded import EMBEDDED_MNIST, EMBEDDED_MNIST_SHA256, load_mnist, verify_embedded
from .idx import read_idx, read_idx_header, write_idx
from .sources import Identity, OpenOptions, Source, find_source, open_dataset, source

__all__ = ["EMBEDDED_MNIST", "EMBEDDED_MNIST_SHA256", "NORMALIZATIONS", "Dataset", "Identity", "OpenOptions",
           "Source", "check_finite", "find_source", "load_mnist", "normalize", "open_dataset", "read_idx",
           "read_idx_header", "source", "verify_embedded", "write_idx"]
