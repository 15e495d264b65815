"""Reading pretrained weights from local folders: a `config.json` and `*.safetensors` files.

Used by the T5/UMT5 text encoders (`sora_jax.text.t5`) and the Wan VAE import
(`sora_jax.models.vae_convert`). Tensors are read lazily, slice by slice, so a loader can fetch
just one device's shard of each tensor.
"""

import glob
import json
import os

from sora_jax import UsageError


def read_config(path: str, what: str) -> tuple[dict, str]:
  """(the parsed `config.json` of folder `path`, its file name); `what` names the expected folder."""
  config_file = os.path.join(path, 'config.json')
  if not os.path.exists(config_file):
    raise UsageError(f'{path}: no config.json (expected {what})')
  try:
    with open(config_file) as f:
      return json.load(f), config_file
  except (OSError, json.JSONDecodeError) as e:
    raise UsageError(f'{config_file}: cannot read it: {e}') from None


class SafetensorsFolder:
  """Lazy access to the tensors of the `*.safetensors` files of a folder (one or many shards)."""

  def __init__(self, path: str):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    files = sorted(glob.glob(os.path.join(path, '*.safetensors')))
    if not files:
      raise UsageError(f'{path}: no *.safetensors weights (convert .bin checkpoints with safetensors first)')
    self._handles = {}
    for file in files:
      try:
        handle = safe_open(file, framework='numpy')
      except Exception as e:  # noqa: BLE001 -- a truncated or foreign file: say which
        raise UsageError(f'{file}: not a readable safetensors file ({e})') from None
      for name in handle.keys():
        self._handles[name] = (handle, file)

  def names(self) -> set[str]:
    return set(self._handles)

  def find(self, name: str, alias: str | None = None):
    """(slice accessor, file) of tensor `name` (or `alias`); KeyError if neither is stored."""
    for candidate in (name, alias):
      if candidate in self._handles:
        handle, file = self._handles[candidate]
        return handle.get_slice(candidate), file
    raise KeyError(name)


def flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
  """A nested dict (e.g. `nnx.State.to_pure_dict()`) -> {path tuple: leaf}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def unflatten(flat: dict[tuple, object]) -> dict:
  """The inverse of `flatten`."""
  out = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out
