"""Datasets (`shapes`, `folder`), the input pipeline, packing and buckets."""

import contextlib
import importlib.util
import os
import types

from absl import logging


class _NeverRaised(Exception):
  """Stands in for tf.errors.ResourceExhaustedError, which plain file writes never raise."""


@contextlib.contextmanager
def _tfds_spill_without_tensorflow():
  """TFDS's writer keeps up to 1 GB of examples in memory, then spills them to temporary bucket
  files through `tf.io.gfile`: without TensorFlow a dataset over 1 GB fails at that point with
  "No module named 'tensorflow'". Those buckets are plain local files, so Python's file functions
  serve them (only while a dataset is being built, and only when TensorFlow is absent)."""
  from tensorflow_datasets.core import shuffle  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('tensorflow') is not None:
    yield
    return
  gfile = types.SimpleNamespace(GFile=open, exists=os.path.exists, remove=os.remove)
  shim = types.SimpleNamespace(io=types.SimpleNamespace(gfile=gfile),
                               errors=types.SimpleNamespace(ResourceExhaustedError=_NeverRaised))
  saved = shuffle.__dict__.get('tf')
  shuffle.tf = shim
  try:
    yield
  finally:
    shuffle.tf = saved


def prepare(make_builder):
  """Builds the dataset of `make_builder()` (a TFDS builder) as array_record, of any size with or
  without TensorFlow, and returns a builder that reads it.

  Two runs that start together on one machine both build the same dataset, each in a directory of
  its own that is renamed into place at the end; the later rename fails. The dataset is then there,
  whole (the rename is atomic): that process reads it instead of failing."""
  builder = make_builder()
  try:
    with _tfds_spill_without_tensorflow():
      builder.download_and_prepare(file_format='array_record')
  except Exception:  # noqa: BLE001 -- TFDS raises its file system's error
    if not make_builder().is_prepared():
      raise
    logging.info('%s: built by another process meanwhile; reading it', builder.data_dir)
    return make_builder()
  return builder
