#!/usr/bin/env bash
# `make demo`: every stage on the embedded data, on CPU, in about 13 minutes on 2 idle cores (docs/demo.md):
#   data -> tokenizer -> base -> vision_pretrain -> sft -> rl -> eval -> a chat about a held-out image.
# After each stage the held-out visual-QA accuracy is printed beside chance; the last eval repeats it with
# every image blanked, where a model that learned to look falls to about chance.
# Everything goes to runs/demo/ (DEMO_OUT), wiped at the start, so the demo can be re-run as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-runs/demo}
DATA=$OUT/data
TOK=$OUT/tokenizer
export DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
# The vision tower grown on the base model. DEMO_TOWER=vlm_tiny_cnn grows a small CNN instead; its earlier,
# stride-8 form saw shapes from scratch far better than vlm_tiny's one-block ViT in tower-only probes
# (docs/demo.md, "Learning to look"). Both presets' models export to transformers (docs/interop.md).
TOWER=${DEMO_TOWER:-vlm_tiny}

rm -rf "$OUT"
mkdir -p "$OUT/logs"
TIMES=$OUT/stage_times.tsv
: > "$TIMES"

banner() { printf '\n==================== %s ====================\n' "$*"; }

# stage NAME CMD...: run CMD with a banner, log it to $OUT/logs/NAME.log and record its wall time.
stage() {
  local name=$1 start=$SECONDS
  shift
  banner "$name"
  "$@" 2>&1 | tee "$OUT/logs/$name.log"
  printf '%s\t%s\n' "$name" $((SECONDS - start)) >> "$TIMES"
}

# train STAGE ARGS...: recipes/demo_STAGE.toml holds the stage's settings (one CPU process, ZeRO-1, checkpoint
# only at the end); ARGS are this run's paths, and any flag given here overrides the recipe's value.
train() {
  local stage=$1
  shift
  python launch/train.py --config "recipes/demo_$stage.toml" --tokenizer "$TOK" "$@"
}

# Held-out accuracy of a checkpoint (test split; text bpb for the base model, which has no vision tower).
evaluate() {
  local ckpt=$1
  shift
  python launch/eval.py --ckpt "$ckpt" --data "$DATA" "$OUT/tokens" --split test --max-samples 400 --seq-len 128 "$@"
}

prepare_data() {
  python -m data_prep.synth --out "$DATA"
  python launch/tok_train.py --input "$DATA/text" --vocab-size 1024 --out "$TOK"
  python -m data_prep.text_shards --input "$DATA/text" --tokenizer "$TOK" --out "$OUT/tokens" --val-docs 200
  # Vision alignment trains the whole small LLM on captions; one batch in five is the base model's own
  # text (text-tokens rows) so it keeps modelling language. SFT mixes visual QA with captions-as-chat and
  # calculator arithmetic (docs/demo.md says why not text there). RL runs on the QA.
  mkdir -p "$OUT/vp_mix" "$OUT/sft_mix"
  echo '{"datasets": [{"dir": "../data/captions", "weight": 4}, {"dir": "../tokens", "weight": 1}]}' \
    > "$OUT/vp_mix/mixture.json"
  echo '{"datasets": [{"dir": "../data/vqa", "weight": 8}, {"dir": "../data/capchat", "weight": 1},
                      {"dir": "../data/arith", "weight": 1}]}' > "$OUT/sft_mix/mixture.json"
}

base() {
  train base --data "$OUT/tokens" --out "$OUT/base"
  echo "sampled continuations:"
  python launch/sample.py --ckpt "$OUT/base"
  evaluate "$OUT/base" --no-report
}

vision_pretrain() {
  # A fresh $TOWER tower on the base LLM. The encoder has no pretrained weights offline, so it trains
  # too (--encoder-lr), and so does the small LLM: captions name every colour, shape and the left-to-right
  # order, ~15 supervised tokens per image, the cheapest way on CPU to learn to look.
  train vision_pretrain --model "$TOWER" --init-from "$OUT/base" --data "$OUT/vp_mix" --out "$OUT/vision_pretrain"
  evaluate "$OUT/vision_pretrain" --no-report
}

sft() {
  train sft --init-from "$OUT/vision_pretrain" --data "$OUT/sft_mix" --out "$OUT/sft"
  evaluate "$OUT/sft" --no-report
}

rl() {
  train rl --init-from "$OUT/sft" --data "$DATA/vqa" --out "$OUT/rl"
}

final_eval() {
  python launch/eval.py --ckpt "$OUT/rl" --data "$DATA" "$OUT/tokens" --split test --max-samples 800 --seq-len 128 --blank-images
}

# A held-out test image and its question, asked through the terminal chat (stdin-driven).
chat() {
  local question
  question=$(python - "$DATA/vqa/test" "$OUT/test_image.png" <<'EOF'
import json, sys, tarfile
from pathlib import Path
shard = sorted(Path(sys.argv[1]).glob("*.tar"))[0]
with tarfile.open(shard) as tar:
    members = {m.name: m for m in tar.getmembers()}
    key = sorted(n[: -len(".json")] for n in members if n.endswith(".json"))[0]
    Path(sys.argv[2]).write_bytes(tar.extractfile(members[f"{key}.0.png"]).read())
    record = json.load(tar.extractfile(members[f"{key}.json"]))
print(record["messages"][0]["content"].split("\n", 1)[1])
EOF
)
  echo "(feeding the chat: /image $OUT/test_image.png, then \"$question\", then \"describe the image.\")"
  printf '/image %s\n%s\n/clear\n/image %s\ndescribe the image.\n' \
    "$OUT/test_image.png" "$question" "$OUT/test_image.png" \
    | python launch/chat_cli.py --ckpt "$OUT/rl" --temperature 0 --max-new-tokens 48
}

t0=$SECONDS
stage data prepare_data
stage base base
stage vision_pretrain vision_pretrain
stage sft sft
stage rl rl
stage eval final_eval
stage chat chat
printf 'total\t%s\n' $((SECONDS - t0)) >> "$TIMES"

banner summary
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
times = dict(line.split("\t") for line in (out / "stage_times.tsv").read_text().splitlines())
evals = {"base": "base", "vision_pretrain": "vision_pretrain", "sft": "sft", "rl": "rl"}
types = ("colour", "count", "shape", "position")
rows = [f"| stage | time | {' | '.join(types)} | overall | text bpb |", "| --- |" + " ---: |" * (len(types) + 3)]
for stage in ("data", "base", "vision_pretrain", "sft", "rl", "eval", "chat"):
    cells = [stage, f"{int(times.get(stage, 0))} s"] + ["" ] * (len(types) + 2)
    path = out / evals.get(stage, "-") / "eval.json"
    if path.is_file():
        r = json.loads(path.read_text())
        per_type = r.get("vqa", {}).get("per_type", {})
        cells[2:2 + len(types)] = [f"{per_type[t]['accuracy']:.0%}" if t in per_type else "-" for t in types]
        cells[-2] = f"{r['vqa']['overall']['accuracy']:.0%}" if "vqa" in r else "-"
        cells[-1] = f"{r['text']['bpb']:.2f}" if "text" in r else "-"
    rows.append("| " + " | ".join(cells) + " |")
final = json.loads((out / "rl" / "eval.json").read_text())
def line(name, res):
    per_type = res["per_type"]
    return f"| {name} | | " + " | ".join(f"{per_type[t]['accuracy']:.0%}" for t in types) + \
        f" | {res['overall']['accuracy']:.0%} | |"
rows.append(line("final, n=%d" % final["vqa"]["overall"]["n"], final["vqa"]))
rows.append(line("final, image blanked", final["vqa_blank"]))
rows.append("| chance | | " + " | ".join(f"{final['vqa']['per_type'][t]['chance']:.0%}" for t in types) +
            f" | {final['vqa']['overall']['chance']:.0%} | |")
rows.append(f"| **total** | {int(times['total'])} s | | | | | | |")
print("\n".join(rows))
print(f"\nreport card: {out / 'rl' / 'report.md'}; logs: {out / 'logs'}")
EOF
