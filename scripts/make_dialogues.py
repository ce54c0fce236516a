"""Write the synthetic dialogue -> summary set (gpt2_jax.data.dialogues) as SAMSum-style jsonl files.

    python scripts/make_dialogues.py --out data/dialogues_raw --train 4000 --test 200

Each row is {"dialogue": ..., "summary": ...}; the summary is a deterministic function of the
dialogue's facts (who, where, when, yes or no). test.jsonl is drawn with another seed.
"""

import argparse
import os

from gpt2_jax.data.dialogues import synthetic_dialogues, write_jsonl

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--out", required=True)
p.add_argument("--train", type=int, default=4000)
p.add_argument("--test", type=int, default=200)
args = p.parse_args()
os.makedirs(args.out, exist_ok=True)
write_jsonl(os.path.join(args.out, "train.jsonl"), synthetic_dialogues(args.train, seed=0))
write_jsonl(os.path.join(args.out, "test.jsonl"), synthetic_dialogues(args.test, seed=1))
print(f"wrote {args.train} + {args.test} dialogues to {args.out}")
