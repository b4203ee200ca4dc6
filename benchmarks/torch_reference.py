r"""Side by side: our MSLM train step against a PyTorch eager Hugging Face `BertForMaskedLM` step.

The TKRE reference trains with PyTorch eager and HF's `BertForMaskedLM`-style heads: AdamW, and the
MLM logits over the FULL vocabulary at EVERY position (HF computes `[batch, seq_len, vocab]` and
ignores the unmasked positions in the loss). This script times, on one machine in one run:

  * torch, as users run it: `BertForMaskedLM(input_ids, attention_mask, labels=labels).loss`, all
    positions' logits, backward, global-norm clipping at 1.0, `torch.optim.AdamW`;
  * torch with the masked-position trick our step uses (the engine comparison): the encoder, then
    the MLM head on the gathered masked positions only (`max_predictions` slots per sequence);
  * ours: the `bench` row of the MSLM step with the same shape (`--ours=ROW.json`, or run here with
    `--ours_python`, which runs `python -m tkre_jax.main --stage=bench` on the CPU),

all with random weights of the same shape (MiniLM-L6 by default: hidden 384, 6 layers, 12 heads,
vocab 30,522), batch 16, sequence 128, float32, dropout on (train mode), `max_predictions` = 32
masked slots per sequence, and prints steps/s of each and the two ratios ours / torch.

    python benchmarks/torch_reference.py                       # runs our bench as well
    python benchmarks/torch_reference.py --ours=runs/bench/rows/cpux1-dp_mslm_minilm-l6_float32_b16x128.json

torch is an optional extra: `pip install -e ".[torch]"` (or `pip install torch transformers`). When
the project's virtual environment lacks it, run this script with another Python that has torch and
point `--ours_python` at the project's (e.g. `--ours_python=.venv/bin/python`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
INSTALL_HINT = ("torch is not installed in this Python ({python}). Install the optional extra: "
                "`pip install -e \".[torch]\"` from the repository root, or `pip install torch "
                "transformers` (CPU wheels: `pip install torch --index-url "
                "https://download.pytorch.org/whl/cpu`).")

# The BERT shapes of `tkre_jax.benchmarking.flops.ENCODER_SHAPES` (tests check they agree).
SHAPES = {
    "minilm-l6": dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                      num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512),
    "bert-base": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                      num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512),
}
MASK_ID = 103  # [MASK] of BERT's uncased vocabulary


def synthetic_mlm_batch(batch: int, seq_len: int, vocab: int, slots: int, seed: int = 0):
  """numpy `input_ids` (with [MASK] at the slots), `attention_mask` (all 1), `positions`
  int[batch, slots] (distinct, never position 0 or seq_len-1), `labels` int[batch, slots] (the
  original ids) and `full_labels` int[batch, seq_len] (-100 off the slots, HF's convention)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, (batch, seq_len)).astype(np.int64)
  positions = np.stack([np.sort(rng.choice(np.arange(1, seq_len - 1), slots, replace=False))
                        for _ in range(batch)])
  labels = np.take_along_axis(ids, positions, axis=1)
  full = np.full((batch, seq_len), -100, np.int64)
  np.put_along_axis(full, positions, labels, axis=1)
  masked = ids.copy()
  np.put_along_axis(masked, positions, MASK_ID, axis=1)
  return {"input_ids": masked, "attention_mask": np.ones_like(ids), "positions": positions,
          "labels": labels, "full_labels": full}


def time_torch(model_name: str, batch: int, seq_len: int, slots: int, steps: int, warmup: int,
               trick: bool, threads: int = 0) -> dict:
  """Median seconds per step of the PyTorch eager MLM step (`trick`: logits at the slots only)."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import BertConfig, BertForMaskedLM  # pylint: disable=import-outside-toplevel
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = BertForMaskedLM(BertConfig(**SHAPES[model_name], hidden_act="gelu"))
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=5e-5, eps=1e-6, weight_decay=0.01)
  b = {k: torch.from_numpy(v) for k, v in synthetic_mlm_batch(
      batch, seq_len, SHAPES[model_name]["vocab_size"], slots).items()}
  rows = torch.arange(batch)[:, None]

  def step():
    if trick:
      hidden = model.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"])[0]
      logits = model.cls(hidden[rows, b["positions"]])  # [batch, slots, vocab]
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               b["labels"].reshape(-1))
    else:
      loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   labels=b["full_labels"]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)

  for _ in range(warmup):
    step()
  seconds = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    seconds.append(time.perf_counter() - t0)
  med = statistics.median(seconds)
  return {"median_seconds": med, "steps_per_second": 1.0 / med, "steps": steps,
          "threads": torch.get_num_threads(), "torch": torch.__version__,
          "logits": "masked slots" if trick else "all positions (HF default)"}


def run_ours(python: str, model: str, batch: int, seq_len: int, steps: int, warmup: int) -> dict:
  """Runs our bench's MSLM step with `python` (the project's environment) and returns its row."""
  with tempfile.TemporaryDirectory(prefix="tkre_bench_") as tmp:
    cmd = [python, "-m", "tkre_jax.main", "--stage=bench", "--mesh=cpu", f"--workdir={tmp}",
           "--config.bench.stage=mslm", f"--config.bench.model={model}",
           f"--config.bench.batch_size={batch}", f"--config.bench.seq_len={seq_len}",
           f"--config.bench.steps={steps}", f"--config.bench.warmup_steps={warmup}",
           "--config.bench.input_batches=0", "--config.bench.dtype=float32"]
    print("ours:", " ".join(cmd), file=sys.stderr)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f"our bench failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    (row_file,) = pathlib.Path(tmp, "rows").glob("*.json")
    return json.loads(row_file.read_text())


def check_row(row: dict, model: str, batch: int, seq_len: int, where: str) -> None:
  """Raises ValueError when `row` is not an MSLM float32 row of this shape."""
  got = (row.get("stage"), row.get("model"), row.get("batch_size"), row.get("seq_len"),
         row.get("dtype"))
  want = ("mslm", model, batch, seq_len, "float32")
  if got != want:
    raise ValueError(f"{where}: a row of (stage, model, batch, seq_len, dtype) = {got}, expected "
                     f"{want}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="minilm-l6", choices=sorted(SHAPES))
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--slots", type=int, default=32, help="masked positions per sequence "
                 "(config.mslm.max_predictions)")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
  p.add_argument("--ours", default="", help="our bench row (JSON) of the same MSLM shape")
  p.add_argument("--ours_python", default=sys.executable,
                 help="Python of the project's environment, to run our bench when --ours is not "
                      "given")
  p.add_argument("--out", default="", help="write the comparison as JSON here")
  args = p.parse_args(argv)
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import transformers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    print("error: " + INSTALL_HINT.format(python=sys.executable), file=sys.stderr)
    return 2
  if args.ours:
    row = json.loads(pathlib.Path(args.ours).read_text())
    where = args.ours
  else:
    row = run_ours(args.ours_python, args.model, args.batch, args.seq_len, args.steps,
                   args.warmup)
    where = "our bench run"
  try:
    check_row(row, args.model, args.batch, args.seq_len, where)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  shape = (args.model, args.batch, args.seq_len, args.slots, args.steps, args.warmup)
  default = time_torch(*shape, trick=False, threads=args.threads)
  trick = time_torch(*shape, trick=True, threads=args.threads)
  ours = row["steps_per_second"]
  result = {
      "shape": {"model": args.model, "batch": args.batch, "seq_len": args.seq_len,
                "slots": args.slots, "dtype": "float32"},
      "ours_steps_per_second": ours,
      "ours_row": where,
      "torch_default_steps_per_second": default["steps_per_second"],
      "torch_trick_steps_per_second": trick["steps_per_second"],
      "ratio_vs_torch_default": ours / default["steps_per_second"],
      "ratio_vs_torch_trick": ours / trick["steps_per_second"],
      "torch": {"default": default, "trick": trick},
  }
  print(f"{args.model} MSLM train step, batch {args.batch} x {args.seq_len}, float32, "
        f"{args.slots} masked slots per sequence")
  print(f"  ours (JAX, {row.get('platform')} x{row.get('num_devices')}):   {ours:7.3f} steps/s")
  print(f"  torch eager, HF default (all logits): {default['steps_per_second']:7.3f} steps/s  "
        f"-> ours / torch = {result['ratio_vs_torch_default']:.2f}x")
  print(f"  torch eager, masked slots only:       {trick['steps_per_second']:7.3f} steps/s  "
        f"-> ours / torch = {result['ratio_vs_torch_trick']:.2f}x")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
