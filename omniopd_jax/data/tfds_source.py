"""Prepared TFDS datasets, read by random access with no TensorFlow and never downloaded, and
their preparation from local files (`prepare_local_tfds`, `prepare_gsm8k`)."""

import os

from omniopd_jax.data import rows

LOCAL_TFDS_NAME = "omniopd_local_math"


def _tfds():
  import tensorflow_datasets as tfds

  return tfds


def data_source(cfg, split: str):
  """Random-access source of a prepared TFDS dataset; never downloads."""
  tfds = _tfds()
  data_dir = cfg.tfds_data_dir or os.path.expanduser("~/tensorflow_datasets")
  if cfg.tfds_name == "gsm8k":
    import tensorflow_datasets.text.gsm8k  # noqa: F401  (registers the builder)
  elif cfg.tfds_name == LOCAL_TFDS_NAME:
    _local_builder_class()
  builder = tfds.builder(cfg.tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    hint = (
      'prepare it once where the internet is reachable:\n  python -c "import tensorflow_datasets '
      f"as tfds; tfds.builder('{cfg.tfds_name}', data_dir='{data_dir}', file_format='array_record')"
      '.download_and_prepare()"'
    )
    if cfg.tfds_name == "gsm8k":
      hint += (
        "\nor from local copies of openai/grade-school-math's train.jsonl and test.jsonl:\n"
        f"  python -c \"from omniopd_jax.data import prompts; prompts.prepare_gsm8k('DIR', '{data_dir}')\""
      )
    elif cfg.tfds_name == LOCAL_TFDS_NAME:
      hint = (
        "prepare it with omniopd_jax.data.prompts.prepare_local_tfds("
        f"{{'train': 'FILE.jsonl'}}, '{data_dir}')"
      )
    raise FileNotFoundError(
      f"TFDS dataset {cfg.tfds_name!r} is not prepared under {builder.data_dir}; {hint}"
    )
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
      f"{builder.data_dir} holds {builder.info.file_format.value} files, which need TensorFlow; "
      "prepare the dataset again with file_format='array_record' (random access, no TensorFlow)"
    )
  return builder.as_data_source(split)


# ----------------------------------------------------------------------------- preparation


_LOCAL_BUILDER = None


def _local_builder_class():
  """A GeneratorBasedBuilder over local JSONL files (registered as LOCAL_TFDS_NAME on first use)."""
  global _LOCAL_BUILDER
  if _LOCAL_BUILDER is not None:
    return _LOCAL_BUILDER
  tfds = _tfds()

  class OmniopdLocalMath(tfds.core.GeneratorBasedBuilder):
    """Math problems {question, answer} read from local JSONL files, one file per split."""

    name = LOCAL_TFDS_NAME
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, jsonl_paths=None, fields=("question", "answer"), **kwargs):
      self._jsonl_paths = dict(jsonl_paths or {})
      self._fields = fields
      super().__init__(**kwargs)

    def _info(self):
      text = tfds.features.Text()
      features = tfds.features.FeaturesDict({"question": text, "answer": text})
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      if not self._jsonl_paths:
        raise ValueError(f"{LOCAL_TFDS_NAME} needs jsonl_paths={{split: file}} to be prepared")
      return {split: self._generate_examples(path) for split, path in self._jsonl_paths.items()}

    def _generate_examples(self, path):
      qf, af = self._fields
      for i, (where, row) in enumerate(rows.file_rows(path)):
        try:
          question = rows.text_field(row, qf, "question", max_chars=0, numbers_ok=False)
          answer = rows.text_field(row, af, "answer", max_chars=0, numbers_ok=True)
        except rows.BadRowError as e:
          raise ValueError(f"{where}: {e}") from None
        yield i, {"question": question, "answer": answer}

  _LOCAL_BUILDER = OmniopdLocalMath
  return _LOCAL_BUILDER


def prepare_local_tfds(jsonl_paths: dict[str, str], data_dir: str, fields=("question", "answer")):
  """Write local JSONL files ({split: path}) as the array_record TFDS dataset LOCAL_TFDS_NAME.

  Read it with source="tfds", tfds_name=LOCAL_TFDS_NAME, tfds_data_dir=data_dir. Returns the
  dataset directory.
  """
  tfds = _tfds()
  builder = _local_builder_class()(
    jsonl_paths=jsonl_paths, fields=tuple(fields), data_dir=data_dir, file_format="array_record"
  )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return str(builder.data_dir)


def prepare_gsm8k(jsonl_dir: str, data_dir: str, splits=("train", "test")) -> str:
  """Prepare TFDS `gsm8k` (array_record) from local copies of openai/grade-school-math's
  `{split}.jsonl` files, with no download. Returns the dataset directory."""
  tfds = _tfds()
  from tensorflow_datasets.text.gsm8k import gsm8k

  paths = {split: os.path.join(jsonl_dir, f"{split}.jsonl") for split in splits}
  for path in paths.values():
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: prepare_gsm8k needs each split's jsonl in {jsonl_dir}")

  with tfds.core.registered.skip_registration():

    class LocalGsm8k(gsm8k.Gsm8k):
      name = "gsm8k"  # same name, features and version: tfds.builder("gsm8k") reads it back

      def _split_generators(self, dl_manager):
        return {split: self._generate_examples(path) for split, path in paths.items()}

  builder = LocalGsm8k(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return str(builder.data_dir)
