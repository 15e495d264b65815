"""Evaluation during training, and the analysis notebook run top to bottom on a fresh tiny workdir."""

import json
import os
import re

import numpy as np
import pytest

from sora_jax import UsageError, train

NOTEBOOK = os.path.join(os.path.dirname(__file__), '..', 'experiments', 'notebooks', 'analysis.ipynb')


@pytest.fixture(scope='module')
def evaluated_workdir(data_dir, tmp_path_factory):
  """A tiny run with evaluation after steps 2 and 4."""
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import shapes as shapes_config
  config = shapes_config.get_config('tiny')
  config.data.data_dir = data_dir
  config.eval.every_steps = 2
  workdir = str(tmp_path_factory.mktemp('evaluated'))
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow
def test_training_logs_timestep_losses_fvd_adherence_and_videos(evaluated_workdir):
  with open(os.path.join(evaluated_workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  evals = [r for r in rows if 'eval/fvd' in r]
  assert [r['step'] for r in evals] == [2, 4]
  for r in evals:
    t_keys = sorted(k for k in r if k.startswith('eval/loss_t'))
    assert t_keys == ['eval/loss_t0.12', 'eval/loss_t0.38', 'eval/loss_t0.62', 'eval/loss_t0.88']
    assert r['eval/loss'] == pytest.approx(np.mean([r[k] for k in t_keys]))
    assert r['eval/fvd'] > 0 and np.isfinite(r['eval/fvd'])
    for kind in ('adherence', 'learned_adherence'):
      assert {f'eval/{kind}/{k}' for k in ('color', 'shape', 'direction', 'all')} <= set(r)
      assert all(0 <= r[f'eval/{kind}/{k}'] <= 1 for k in ('color', 'shape', 'direction', 'all'))
  # The sample videos went to TensorBoard next to the scalars (GIFs in the image tab).
  tags = event_tags(evaluated_workdir)
  assert any(tag.startswith('eval/00_') and kind == 'image' for tag, kind in tags)
  assert ('eval/fvd', 'simple_value') in tags


def event_tags(workdir: str) -> set[tuple[str, str]]:
  """(tag, value kind) of every summary in a workdir's TensorBoard event files (TFRecord framing)."""
  import struct
  from tensorboardX.proto import event_pb2
  tags = set()
  for name in os.listdir(workdir):
    if name.startswith('events.out.tfevents'):
      data = open(os.path.join(workdir, name), 'rb').read()
      pos = 0
      while pos < len(data):
        (length,) = struct.unpack('<Q', data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        tags |= {(v.tag, v.WhichOneof('value')) for v in event.summary.value}
  return tags


@pytest.mark.slow
def test_analysis_notebook_runs_top_to_bottom(evaluated_workdir, monkeypatch, tmp_path):
  import nbclient
  import nbformat
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not c.get('outputs') and c.get('execution_count') is None for c in nb.cells if c.cell_type == 'code'), \
      'commit the notebook with its outputs cleared'
  monkeypatch.setenv('SORA_WORKDIR', evaluated_workdir)
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()
  outputs = [o for c in nb.cells for o in c.get('outputs', [])]
  assert not [o for o in outputs if o['output_type'] == 'error']
  text = ''.join(o.get('text', '') for o in outputs if o['output_type'] == 'stream')
  assert re.search(r'step 4: [\d.]+M parameters', text)
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 3  # curves, loss per timestep, attention maps
  assert any('data:image/gif' in o.get('data', {}).get('text/html', '') for o in outputs)  # the samples


@pytest.mark.parametrize('field,value,message', [
    ('every_steps', -1, 'config.eval.every_steps=-1'),
    ('features', 'inception', "config.eval.features='inception'"),
    ('num_videos', 1, 'config.eval.num_videos=1'),
    ('features', 'i3d', 'config.eval.i3d_path'),
])
def test_bad_eval_config_is_a_one_line_error(tiny_config, field, value, message):
  tiny_config.eval.every_steps = 2
  tiny_config.eval[field] = value
  with pytest.raises(UsageError, match=re.escape(message)) as e:
    train.validate_config(tiny_config, 8)
  assert '\n' not in str(e.value)
