#!/usr/bin/env bash
# Before (fc59805, /tmp/old) and after (HEAD, /work/main) of issue 29's refactors: the same bench,
# run A B A B, eager (compiled programs are keyed by the traced code, which changed).
# Set up the before side first: git worktree add /tmp/old fc59805
set -e
cd /tmp
for round in 1 2; do
  for side in before after; do
    if [ $side = before ]; then pp=/tmp/old; else pp=/work/main; fi
    PYTHONPATH=$pp /work/main/.venv/bin/python -m trimode bench --enforce-eager --modes ar,selfspec \
      --batch-sizes 1,16 --block-lengths 16 --num-prompts 32 --max-tokens 48 --warmup 1 --repeats 3 \
      --out /tmp/bench-$side-$round > /tmp/bench-$side-$round.log 2>&1
    echo "$side $round done"
  done
done
