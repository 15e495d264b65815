"""Import a Wan 2.1 video VAE saved in the diffusers layout (`AutoencoderKLWan`) into `vae.VideoVAE`.

  vae = vae_convert.load_wan('/models/Wan2.1-T2V-1.3B-Diffusers/vae')   # config.json + safetensors

Each diffusers tensor becomes one parameter of ours, at the same module path: convolution weights
[out, in, (t,) h, w] are transposed to channels-last kernels [(t,) h, w, in, out], norm scales
[c, 1, 1(, 1)] are flattened, and the `Sequential` index of the resamplers (`resample.1`) is
dropped. Every parameter must be filled and every stored tensor used, or the import fails naming
the tensor. The latent statistics (`latents_mean`, `latents_std`) come from `config.json`.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax import UsageError, pretrained
from sora_jax.models import vae


def config_from_diffusers(hf: dict, source: str = 'config.json') -> vae.VAEConfig:
  """The `VAEConfig` of an `AutoencoderKLWan` config.json (Wan 2.1; 2.2's residual VAE is refused)."""
  if hf.get('_class_name', 'AutoencoderKLWan') != 'AutoencoderKLWan':
    raise UsageError(f'{source}: _class_name={hf["_class_name"]!r}, expected "AutoencoderKLWan"')
  if hf.get('is_residual') or hf.get('patch_size'):
    raise UsageError(f'{source}: a Wan 2.2 VAE (is_residual / patch_size); only the Wan 2.1 VAE is supported')
  if hf.get('attn_scales'):  # Wan's VAEs have none (and diffusers' chunked encoder cannot run them)
    raise UsageError(f'{source}: attn_scales={hf["attn_scales"]}: attention in the down blocks is not supported')
  if hf.get('in_channels', 3) != hf.get('out_channels', 3):
    raise UsageError(f'{source}: in_channels={hf.get("in_channels")} differs from out_channels={hf.get("out_channels")}')
  return vae.VAEConfig(
      base_dim=hf.get('base_dim', 96), decoder_base_dim=hf.get('decoder_base_dim'), z_dim=hf.get('z_dim', 16),
      dim_mult=tuple(hf.get('dim_mult', (1, 2, 4, 4))), num_res_blocks=hf.get('num_res_blocks', 2),
      temporal_downsample=tuple(hf.get('temperal_downsample', (False, True, True))),  # sic, diffusers' name
      in_channels=hf.get('in_channels', 3),
      latents_mean=tuple(hf['latents_mean']) if hf.get('latents_mean') else None,
      latents_std=tuple(hf['latents_std']) if hf.get('latents_std') else None)


def our_path(name: str) -> tuple:
  """diffusers tensor name -> our parameter path, e.g. 'decoder.up_blocks.0.upsamplers.0.resample.1.weight'
  -> ('decoder', 'up_blocks', 0, 'upsamplers', 0, 'resample', 'kernel')."""
  parts = name.split('.')
  out = []
  for i, part in enumerate(parts):
    if part == '1' and i > 0 and parts[i - 1] == 'resample':
      continue  # nn.Sequential(Upsample | ZeroPad2d, Conv2d): the conv is our `resample`
    out.append(int(part) if part.isdigit() else part)
  if out[-1] == 'weight':
    out[-1] = 'kernel'
  return tuple(out)


def to_ours(array: np.ndarray) -> np.ndarray:
  """A torch layout tensor -> ours: conv kernels channels-last, norm scales flat."""
  if array.ndim == 5:
    return array.transpose(2, 3, 4, 1, 0)
  if array.ndim == 4 and array.shape[1:] == (1, 1, 1):  # a 3D norm's gamma [c, 1, 1, 1]
    return array.reshape(-1)
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 3:  # a 2D norm's gamma [c, 1, 1]
    return array.reshape(-1)
  return array


def load_wan(path: str, dtype=jnp.float32, abstract: bool = False) -> vae.VideoVAE:
  """The VAE of a diffusers `AutoencoderKLWan` folder, parameters in `dtype`; `abstract=True` reads
  only config.json and gives a model whose parameters are shapes (`nnx.eval_shape`)."""
  hf, config_file = pretrained.read_config(path, 'a diffusers AutoencoderKLWan folder')
  cfg = config_from_diffusers(hf, config_file)
  model = nnx.eval_shape(lambda: vae.VideoVAE(cfg, rngs=nnx.Rngs(0)))
  if abstract:
    return model
  graphdef, abstract = nnx.split(model)
  expected = pretrained.flatten(abstract.to_pure_dict())
  tensors = pretrained.SafetensorsFolder(path)
  flat = {}
  for name in sorted(tensors.names()):
    ours = our_path(name)
    if ours not in expected:
      raise UsageError(f'{path}: tensor {name!r} has no place in the VAE that config.json describes')
    tensor, file = tensors.find(name)
    value = to_ours(np.asarray(tensor[:]))
    if value.shape != expected[ours].shape:
      raise UsageError(f'{file}: {name} has shape {tuple(tensor.get_shape())}, config.json implies '
                       f'{expected[ours].shape} (ours, channels-last)')
    flat[ours] = jnp.asarray(value, dtype)
  missing = sorted('.'.join(map(str, p)) for p in set(expected) - set(flat))
  if missing:
    raise UsageError(f'{path}: the weights lack {len(missing)} tensors the config implies, e.g. {missing[:3]}')
  abstract.replace_by_pure_dict(pretrained.unflatten(flat))
  return nnx.merge(graphdef, abstract)
