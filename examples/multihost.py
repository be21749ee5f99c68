"""Multi-host data parallelism: UPGrad over every process's devices.

Two tasks share an MLP trunk: a 4-class classification and a regression whose
targets are 100x larger. The mesh spans the devices of all processes; the
parameters are replicated on it and each global batch is sharded along its
rows, every process holding only its own slice. One jit-compiled step takes
the per-task gradients of the global batch (``mtl.value_and_jacobian``),
balances the shared trunk's with ``mtl.upgrad()`` (the heads get their own
task's gradient) and applies Adam. Every process runs the same program; the
update is the one a single device would compute on the whole batch.

Launch one process per host, host 0 being the coordinator::

  python examples/multihost.py --coordinator HOST0:1234 --num-processes N --process-id I

(or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID). Without
them it runs as one process over the local devices. Two processes on one CPU
machine, two devices each, over the loopback interface::

  for i in 0 1; do python examples/multihost.py --coordinator localhost:12355 \\
      --num-processes 2 --process-id $i --cpu-devices 2 & done; wait

Run:  python examples/multihost.py        (a few seconds on a CPU)
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import optax_mtl as mtl

FEATURES, HIDDEN, CLASSES = 16, 64, 4
TARGET_SCALE = 100.0


def make_data(num_examples=2048, seed=0):
  """The whole data set, identical on every process (a fixed seed)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_examples, FEATURES)).astype(np.float32)
  mixing = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
  labels = np.argmax(x @ mixing, axis=1).astype(np.int32)
  targets = TARGET_SCALE * np.sin(x[:, 0] + x[:, 1] * x[:, 2]).astype(np.float32)
  return x, labels, targets


def init_params(key):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  dense = lambda k, m, n: jax.random.normal(k, (m, n)) / np.sqrt(m)
  return {"trunk": {"w1": dense(k1, FEATURES, HIDDEN), "b1": jnp.zeros(HIDDEN),
                    "w2": dense(k2, HIDDEN, HIDDEN), "b2": jnp.zeros(HIDDEN)},
          "heads": {"classes": dense(k3, HIDDEN, CLASSES),
                    "target": dense(k4, HIDDEN, 1)}}


def task_losses(params, x, labels, targets):
  """[T] losses of the batch: cross-entropy, mean squared error."""
  trunk = params["trunk"]
  h = jax.nn.relu(x @ trunk["w1"] + trunk["b1"][None, :])
  h = jax.nn.relu(h @ trunk["w2"] + trunk["b2"][None, :])
  logits = h @ params["heads"]["classes"]
  pred = (h @ params["heads"]["target"])[:, 0]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return jnp.stack([ce, jnp.mean((pred - targets) ** 2)])


def make_optimizer():
  return optax.chain(mtl.upgrad(shared={"trunk": True, "heads": False}),
                     optax.adam(3e-3))


def train_step(tx, params, opt_state, x, labels, targets):
  losses, task_grads = mtl.value_and_jacobian(task_losses)(params, x, labels,
                                                           targets)
  updates, opt_state = tx.update(task_grads, opt_state, params, losses=losses)
  return optax.apply_updates(params, updates), opt_state, losses


def parse_args(argv=None):
  env = os.environ.get
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--coordinator", default=env("JAX_COORDINATOR_ADDRESS"),
                      help="host:port of process 0 (omit for one process)")
  parser.add_argument("--num-processes", type=int,
                      default=int(env("JAX_NUM_PROCESSES", "1")))
  parser.add_argument("--process-id", type=int,
                      default=int(env("JAX_PROCESS_ID", "0")))
  parser.add_argument("--cpu-devices", type=int, default=None,
                      help="simulate this many CPU devices per process")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch", type=int, default=256, help="global batch size")
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args(argv)
  if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
    parser.error(f"--process-id must be in [0, --num-processes), got "
                 f"{args.process_id} with {args.num_processes} processes.")
  if args.num_processes > 1 and not args.coordinator:
    parser.error("several processes need --coordinator host:port (the address "
                 "of process 0, reachable from every host).")
  return args


def main(argv=None):
  """Trains; returns the [steps, T] losses of the global batches."""
  args = parse_args(argv)
  if args.cpu_devices is not None:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  if args.num_processes > 1:
    jax.distributed.initialize(args.coordinator, args.num_processes,
                               args.process_id)

  num_devices = jax.device_count()
  if args.batch % num_devices:
    raise ValueError(f"--batch {args.batch} must be divisible by the "
                     f"{num_devices} devices of the mesh.")
  # One axis over every device of every process.
  mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(AxisType.Explicit,))
  rows = NamedSharding(mesh, P("data"))
  tx = make_optimizer()
  data = make_data()
  local = args.batch // jax.process_count()
  history = []
  with jax.set_mesh(mesh):
    params = jax.jit(init_params, out_shardings=NamedSharding(mesh, P()))(
        jax.random.key(0))
    opt_state = jax.jit(tx.init)(params)
    step = jax.jit(lambda *a: train_step(tx, *a), donate_argnums=(0, 1))
    for i in range(args.steps):
      # This process's rows of the i-th global batch; the global array is
      # their concatenation in process order.
      mine = (i * args.batch + jax.process_index() * local
              + np.arange(local)) % len(data[0])
      batch = [jax.make_array_from_process_local_data(rows, d[mine])
               for d in data]
      params, opt_state, losses = step(params, opt_state, *batch)
      history.append(np.asarray(losses))  # replicated: every process reads it
      if not args.quiet and jax.process_index() == 0 and i % 50 == 0:
        print(f"step {i:4d}  losses {np.round(history[-1], 4).tolist()}")
  history = np.stack(history)
  if jax.process_index() == 0:
    print(json.dumps({"processes": jax.process_count(), "devices": num_devices,
                      "first": history[0].tolist(), "last": history[-1].tolist()}))
  return history


if __name__ == "__main__":
  main()
