"""Device and host memory of the hypergradient against T: pure reversal, segments, offload.

For the digits MLP (64-50-50-10) trained ``T`` steps by momentum SGD at
momentum 0.5 (1 bit of buffer per parameter per step), the compiled
hypergradient's ``memory_analysis()``: device temp and host temp bytes, for

* pure reversal (the buffer of all ``T`` steps on the device);
* ``segment_steps=K`` (``ceil(T/K)`` exact states and ``K`` steps of buffer on the device);
* ``segment_steps=K, offload_buffer=True`` (finished segments' rows and states in host memory).

Compile only (nothing runs).  XLA:CPU has one memory, so there the offloaded
rows are counted as device memory; on a GPU or TPU they move to host memory.

Usage::

  python benchmarks/offload_memory.py [--steps 2000,8000,32000] [--segment 1000] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common
import jax
import jax.numpy as jnp

import revoptax

HERE = Path(__file__).resolve().parent


def analysis(num_steps, segment_steps, offload):
  params, _, (batches, labels), (x_val, y_val) = common.setup("digits", num_steps, 0.5)

  def val_loss(log_lr):
    trained = revoptax.train(
      lambda p, hp, b: common.cross_entropy(p, *b),
      params,
      log_lr,
      (batches, labels),
      num_steps=num_steps,
      segment_steps=segment_steps,
      offload_buffer=offload,
      learning_rate=lambda hp, t: jnp.exp(hp),
      momentum=lambda hp, t: 0.5,
    )
    return common.cross_entropy(trained, x_val, y_val)

  memory = jax.jit(jax.grad(val_loss)).lower(jnp.log(0.01)).compile().memory_analysis()
  return {
    "device_temp_bytes": memory.temp_size_in_bytes,
    "host_temp_bytes": memory.host_temp_size_in_bytes,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", default="2000,8000,32000")
  parser.add_argument("--segment", type=int, default=1000)
  parser.add_argument("--out", type=Path, default=HERE / "results" / "offload_memory.json")
  args = parser.parse_args(argv)
  rows = []
  for num_steps in (int(s) for s in args.steps.split(",")):
    for name, k, offload in (
      ("reversal", None, False),
      ("segments", args.segment, False),
      ("segments + offload", args.segment, True),
    ):
      row = {"T": num_steps, "method": name, "segment_steps": k, **analysis(num_steps, k, offload)}
      print(row, flush=True)
      rows.append(row)
  result = {
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "rows": rows,
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
