r"""Runs a multi-process (multi-host) training job on this machine: the real multi-host code path.

  python experiments/launch_local.py --num_processes=2 --devices_per_process=4 -- \
      --config=configs/shapes.py:tiny --workdir=runs/mp
  python experiments/launch_local.py --num_processes=2 --module=sora_jax.encode -- \
      --config=configs/shapes.py:tiny --workdir=runs/latents    # latent precompute, shards split

Starts `python -m sora_jax.main <main flags>` N times, each with a process id, a coordinator on
localhost and `devices_per_process` simulated CPU devices (gloo collectives between processes), so
the job sees N x devices_per_process devices, exactly as N hosts of a pod would. Process 0's output
is streamed here; every process's output is also in --logs/process_I.log.

- SIGTERM or SIGINT (Ctrl-C) here is sent to every process as SIGTERM, what a TPU maintenance event
  does: all of them save the same step and exit 0, and the same command resumes there.
- As soon as one process fails, the others are stopped (SIGTERM, then SIGKILL after --grace_s) and
  this exits with the failed process's code: no hang.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags, logging

flags.DEFINE_integer('num_processes', 2, 'Processes (simulated hosts).')
flags.DEFINE_integer('devices_per_process', 4, 'Simulated CPU devices per process.')
flags.DEFINE_string('logs', None, 'Directory for process_I.log (default: a new temporary directory).')
flags.DEFINE_float('grace_s', 10.0, 'After a failure, seconds the other processes get to exit before SIGKILL.')
flags.DEFINE_integer('port', 0, 'Coordinator port on localhost (0: a free one).')
flags.DEFINE_string('module', 'sora_jax.main', 'What each process runs: sora_jax.main (training) or '
                    'sora_jax.encode (latent precompute, shards split over the processes).')
FLAGS = flags.FLAGS


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(devices_per_process: int) -> dict:
  env = dict(os.environ)
  xla_flags = [f for f in env.get('XLA_FLAGS', '').split() if 'xla_force_host_platform_device_count' not in f]
  env['XLA_FLAGS'] = ' '.join(xla_flags + [f'--xla_force_host_platform_device_count={devices_per_process}'])
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def stream(pipe, log_path: str, echo: bool):
  """Copies a process's output to its log file (and to our stdout for process 0)."""
  with open(log_path, 'wb') as log:
    for line in iter(pipe.readline, b''):
      log.write(line)
      log.flush()
      if echo:
        sys.stdout.buffer.write(line)
        sys.stdout.flush()


def tail(path: str, lines: int = 5) -> str:
  with open(path, 'rb') as f:
    return b''.join(f.readlines()[-lines:]).decode(errors='replace').rstrip()


def launch(main_args: list[str], num_processes: int, devices_per_process: int, log_dir: str,
           grace_s: float, port: int = 0, module: str = 'sora_jax.main') -> int:
  """Runs the job; returns 0 if every process succeeded, else the first failure's exit code."""
  port = port or free_port()
  env = process_env(devices_per_process)
  procs, threads, logs = [], [], []
  for i in range(num_processes):
    cmd = [sys.executable, '-m', module, f'--coordinator_address=127.0.0.1:{port}',
           f'--num_processes={num_processes}', f'--process_id={i}', *main_args]
    logs.append(os.path.join(log_dir, f'process_{i}.log'))
    # Own process groups: a Ctrl-C in the terminal reaches only us, and we decide what they get.
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  start_new_session=True))
    threads.append(threading.Thread(target=stream, args=(procs[-1].stdout, logs[-1], i == 0), daemon=True))
    threads[-1].start()
  logging.info('%d processes x %d devices, coordinator 127.0.0.1:%d, logs in %s, pids %s', num_processes,
               devices_per_process, port, log_dir, ' '.join(str(p.pid) for p in procs))

  def forward(signum, frame):
    del frame
    logging.warning('%s: sending SIGTERM to all %d processes', signal.Signals(signum).name, num_processes)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)

  previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
      if failed:
        i = failed[0]
        logging.error('process %d exited with code %d; stopping the others. Its last lines:\n%s',
                      i, codes[i], tail(logs[i]))
        stop_all(procs, grace_s)
        return codes[i]
      if all(code == 0 for code in codes):
        return 0
      time.sleep(0.2)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    for t in threads:
      t.join(timeout=5)


def stop_all(procs, grace_s: float):
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def main(argv):
  main_args = argv[1:]
  if not main_args:
    sys.exit('error: give sora_jax.main flags after "--", e.g. -- --config=configs/shapes.py:tiny --workdir=DIR')
  if FLAGS.num_processes < 1 or FLAGS.devices_per_process < 1:
    sys.exit('error: --num_processes and --devices_per_process must be at least 1')
  log_dir = FLAGS.logs or tempfile.mkdtemp(prefix='launch_local_')
  os.makedirs(log_dir, exist_ok=True)
  sys.exit(launch(main_args, FLAGS.num_processes, FLAGS.devices_per_process, log_dir, FLAGS.grace_s, FLAGS.port,
                  FLAGS.module))


if __name__ == '__main__':
  app.run(main)
