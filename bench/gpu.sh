#!/usr/bin/env bash
# bench/gpu.sh ARCHIVE — everything the issue asks of one GPU (one H200, 16 CPU cores), in one
# log, within about 8 minutes:
#
#   (a) bench/bench_pipeline.py on CUDA at batch 128 on the full CIFAR-10-LT IF100 (12,406
#       images): the engine's and the usual DataLoader pipeline's training images/s, their
#       ratio, and whether the targets (>= 5x, >= 50,000 images/s) are met;
#   (b) the real workflow (snakemake) on CIFAR-10-LT IF100 built from ARCHIVE, with the
#       paper's recipe (workflow/studies/cifar10_jpeg_gpu.yaml: ResNet-32, 200 epochs, batch
#       128, lr 0.1, wd 2e-4, warm-up 5, lr x0.01 at 160 and x0.0001 at 180), softmax and CB
#       focal (beta 0.9999, gamma 1.0) as two concurrent jobs on the one GPU; prints each
#       one's wall time and test error beside the paper's 29.64% and 25.43%;
#   (c) the engine side of (a) again with torch.compile and CUDA graphs (engine only; last,
#       because compiling takes time and may fail where inductor cannot run).
#
# ARCHIVE: the CIFAR-10 JPEG ImageFolder archive (cifar10-jpeg.tar.gz: train/<class>/*.jpg,
# test/<class>/*.jpg). Nothing is read from ../shared and nothing is downloaded.
#
# Set-up on a bare machine: if $VENV (.venv) has no python, it is created with python3.11
# (else python3; the project needs 3.11) and --system-site-packages, so that a CUDA torch
# installed system-wide is reused, then `pip install -e . $PIP_ARGS` (pip reuses system
# packages that satisfy the pins; offline, it falls back to `pip install --no-deps -e .`
# against what the system has, and the import check below says what is missing).
#
# Environment overrides (defaults = the full GPU run):
#   DEVICE=cuda         cpu exercises the whole script on a CPU
#   EPOCHS=200          (b)'s training epochs; milestones, warm-up and evaluation period are
#                       scaled with them (200 = the paper's schedule unchanged)
#   MODEL=              (b)'s model instead of the recipe's resnet32 (e.g. resnet8 on a CPU)
#   COMPILE_B=0         1: (b)'s recipe gets compile: true, cuda_graphs: true (speed only)
#   BENCH_EPOCHS=3      (a)'s epochs of each side (the first is warm-up)
#   SUBSET=             (a)'s training images (empty = all 12,406)
#   BATCH=128  WORKERS= (a)'s DataLoader workers (empty = the benchmark's min(4, CPUs))
#   CORES=$(nproc)      snakemake --cores
#   PARTS=abc           any of a, b, c (c = the engine compiled, after (b), bounded by
#                       COMPILE_TIMEOUT=180 s, not fatal); the default on a CPU is ab
#   STUDY=cifar10_lt_gpu_bench   (b)'s study name: results under $WORK/results/$STUDY/
#   OUT_DIR=bench/out   where gpu.log, pipeline.json and gpu_summary.json go
#   WORK=$OUT_DIR/gpu_work   snakemake's working directory (emptied first if it holds an
#                       earlier run of this script, so the jobs run afresh)
#   VENV=.venv  PIP_ARGS=
#
#   bench/gpu.sh /data/cifar10-jpeg.tar.gz
#   DEVICE=cpu EPOCHS=1 MODEL=resnet8 SUBSET=512 BENCH_EPOCHS=2 bench/gpu.sh ../shared/data/cifar10-jpeg.tar.gz
set -euo pipefail

if [ $# -ne 1 ] || [ ! -f "$1" ]; then
    echo "usage: bench/gpu.sh ARCHIVE   (ARCHIVE: cifar10-jpeg.tar.gz, an ImageFolder of JPEGs)" >&2
    exit 2
fi
ARCHIVE=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-200}
MODEL=${MODEL:-}
COMPILE_B=${COMPILE_B:-0}
BENCH_EPOCHS=${BENCH_EPOCHS:-3}
SUBSET=${SUBSET:-}
BATCH=${BATCH:-128}
WORKERS=${WORKERS:-}
CORES=${CORES:-$(nproc)}
PARTS=${PARTS:-$([ "$DEVICE" = cuda ] && echo abc || echo ab)}
COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-180}
STUDY=${STUDY:-cifar10_lt_gpu_bench}
OUT_DIR=${OUT_DIR:-bench/out}
WORK=${WORK:-$OUT_DIR/gpu_work}
VENV=${VENV:-.venv}
PIP_ARGS=${PIP_ARGS:-}

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/gpu.log
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
# The jobs log to the study's own sqlite store, never to a server named in the environment.
unset MLFLOW_TRACKING_URI

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
T_ALL=$(now)
echo "== bench/gpu.sh $(date '+%Y-%m-%d %H:%M:%S') on $(hostname)"
echo "archive $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1))"
echo "DEVICE=$DEVICE EPOCHS=$EPOCHS COMPILE_B=$COMPILE_B COMPILE_TIMEOUT=$COMPILE_TIMEOUT MODEL=${MODEL:-recipe} BENCH_EPOCHS=$BENCH_EPOCHS SUBSET=${SUBSET:-all}" \
     "BATCH=$BATCH WORKERS=${WORKERS:-default} CORES=$CORES PARTS=$PARTS STUDY=$STUDY"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (dirty)')"

# ---------------------------------------------------------------------------- set-up
T=$(now)
if [ ! -x "$VENV/bin/python" ]; then
    PY=$(command -v python3.11 || command -v python3)
    echo "== no $VENV: creating it with $PY ($($PY --version)) --system-site-packages"
    "$PY" -m venv --system-site-packages "$VENV"
    # shellcheck disable=SC2086
    if ! "$VENV/bin/pip" install --quiet -e . $PIP_ARGS; then
        echo "== full install failed (offline?): installing finetail alone against the system's packages"
        "$VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e .
    fi
fi
PYBIN=$VENV/bin/python
"$PYBIN" - <<'EOF'
import importlib.util, sys
missing = [m for m in ("torch", "torchvision", "PIL", "numpy", "pandas", "yaml", "snakemake", "mlflow", "finetail")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing in the environment: {missing}")
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
EOF
[ -x "$VENV/bin/snakemake" ] || { echo "no $VENV/bin/snakemake"; exit 1; }
echo "set-up: $(since "$T") s"

echo "== machine"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu,clocks.max.sm --format=csv || true
    nvidia-smi || true
else
    echo "no nvidia-smi on this machine"
fi
echo "CPUs $(nproc), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo) memory"

# ---------------------------------------------------------------------------- (a)
A_S=skipped
if [[ $PARTS == *a* ]]; then
    echo
    echo "== (a) engine vs the usual DataLoader pipeline: ResNet-32, CIFAR-10-LT IF100, batch $BATCH, $DEVICE"
    T=$(now)
    ARGS=(--archive "$ARCHIVE" --device "$DEVICE" --batch-size "$BATCH" --epochs "$BENCH_EPOCHS"
          --out "$OUT_DIR/pipeline.json")
    [ -n "$SUBSET" ] && ARGS+=(--subset "$SUBSET")
    [ -n "$WORKERS" ] && ARGS+=(--workers "$WORKERS")
    "$PYBIN" bench/bench_pipeline.py "${ARGS[@]}"
    A_S=$(since "$T")
    echo "(a) wall: $A_S s"
fi

# ---------------------------------------------------------------------------- (b)
B_S=skipped
if [[ $PARTS == *b* ]]; then
    echo
    echo "== (b) the workflow: CIFAR-10-LT IF100 softmax and CB focal, $EPOCHS epochs, $DEVICE, two concurrent jobs"
    T=$(now)
    if [ -e "$WORK" ] && [ ! -f "$WORK/.finetail-gpu-bench" ]; then
        echo "WORK=$WORK exists and was not made by this script: refusing to empty it"
        exit 1
    fi
    rm -rf "$WORK"
    mkdir -p "$WORK"
    touch "$WORK/.finetail-gpu-bench"
    WORK=$(cd "$WORK" && pwd)
    STUDY_FILE=$WORK/study.yaml
    "$PYBIN" - "$ROOT/workflow/studies/cifar10_jpeg_gpu.yaml" "$STUDY_FILE" "$STUDY" "$ARCHIVE" "$EPOCHS" "$MODEL" "$COMPILE_B" <<'EOF'
import sys
import yaml
src, dst, study, archive, epochs, model, compile_b = sys.argv[1:]
cfg = yaml.safe_load(open(src))
cfg["study"] = study
cfg["datasets"]["cifar10"]["source"] = archive
r = cfg["cbloss"]["recipe"]
epochs = int(epochs)
if epochs != r["epochs"]:  # a reduced run: the same schedule, shrunk
    f = epochs / r["epochs"]
    r["milestones"] = [max(0, min(epochs, round(m * f))) for m in r["milestones"]]
    r["warmup_epochs"] = r["warmup_epochs"] * f
    r["eval_every"] = max(1, round(r["eval_every"] * f))
    r["epochs"] = epochs
if model:
    r["model"] = model
if compile_b == "1":
    r["compile"] = r["cuda_graphs"] = True
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
print(f"study file {dst}: recipe {r}")
EOF
    FINETAIL_DEVICE=$DEVICE "$VENV/bin/snakemake" -s "$ROOT/Snakefile" --directory "$WORK" \
        --configfile "$STUDY_FILE" --cores "$CORES" --printshellcmds
    B_S=$(since "$T")
    echo "(b) wall: $B_S s"
    for f in "$WORK"/logs/"$STUDY"/cbloss/cifar10/if100/*/seed*.log; do
        echo "-- tail of $f"
        tail -n 4 "$f"
    done
fi

# ---------------------------------------------------------------------------- (c)
# The engine compiled (TrainConfig.compile, + cuda_graphs on CUDA), engine side only: its
# figure is compared with (a)'s pipeline. Last, optional, bounded and not fatal: it needs
# inductor (a C compiler on a CPU, Triton on CUDA) and compiling takes a minute or two.
C_S=skipped
if [[ $PARTS == *c* ]]; then
    echo
    echo "== (c) the engine compiled (--compile --cuda-graphs), engine only, $DEVICE, at most $COMPILE_TIMEOUT s"
    T=$(now)
    ARGS=(--archive "$ARCHIVE" --device "$DEVICE" --batch-size "$BATCH" --epochs "$BENCH_EPOCHS" --only engine
          --compile --cuda-graphs --out "$OUT_DIR/pipeline_compiled.json")
    [ -n "$SUBSET" ] && ARGS+=(--subset "$SUBSET")
    if ! timeout "$COMPILE_TIMEOUT" "$PYBIN" bench/bench_pipeline.py "${ARGS[@]}"; then
        echo "(c) failed or ran past $COMPILE_TIMEOUT s: no compiled figure"
        rm -f "$OUT_DIR/pipeline_compiled.json"
    fi
    C_S=$(since "$T")
    echo "(c) wall: $C_S s"
fi

# ---------------------------------------------------------------------------- summary
echo
echo "== summary"
"$PYBIN" - "$OUT_DIR" "${WORK:-}" "$STUDY" "$PARTS" "$A_S" "$B_S" "$C_S" "$(since "$T_ALL")" <<'EOF'
import json, sys
from pathlib import Path
out_dir, work, study, parts, a_s, b_s, c_s, total = sys.argv[1:]
summary = {"parts": parts, "wall_s": {"a": a_s, "b": b_s, "c": c_s, "total": total}}
if "a" in parts:
    p = json.loads((Path(out_dir) / "pipeline.json").read_text())
    summary["pipeline"] = {k: p.get(k) for k in ("device", "device_name", "torch", "cpu_count", "train_images",
                                                  "batch_size", "ratio", "targets")}
    summary["pipeline"]["engine_images_per_s"] = p["engine"]["images_per_s"]
    summary["pipeline"]["pipeline_images_per_s"] = p["pipeline"]["images_per_s"]
    print(f"(a) {p['device']} {p['device_name']}: engine {p['engine']['images_per_s']:,.0f} images/s, "
          f"pipeline {p['pipeline']['images_per_s']:,.0f} images/s, ratio {p['ratio']:.2f} "
          f"({p['train_images']} images, batch {p['batch_size']})")
    for t in p["targets"]:
        print(f"    target {t['target']}: {t['value']} -> {'MET' if t['met'] else 'NOT MET'}")
compiled = Path(out_dir) / "pipeline_compiled.json"
if "c" in parts and compiled.exists():
    c = json.loads(compiled.read_text())
    row = {"engine_images_per_s": c["engine"]["images_per_s"], "compile": c["engine"]["compile"],
           "train_images": c["train_images"]}
    line = f"(c) engine compiled ({row['compile']}): {row['engine_images_per_s']:,.0f} images/s"
    if "pipeline" in summary:
        row["ratio"] = round(row["engine_images_per_s"] / summary["pipeline"]["pipeline_images_per_s"], 3)
        line += f", ratio {row['ratio']:.2f} to (a)'s pipeline"
    summary["compiled"] = row
    print(line)
elif "c" in parts:
    print("(c) no compiled figure")
if "b" in parts:
    paper = {"softmax": 29.64, "cb_focal": 25.43}
    base = Path(work) / "results" / study / "cbloss" / "cifar10" / "if100"
    summary["cbloss"] = {}
    print(f"(b) {'loss':10s} {'test error %':>12s} {'paper %':>8s} {'wall s':>8s} {'images/s':>9s} epochs device")
    for loss, ref in paper.items():
        m = json.loads((base / loss / "seed0" / "metrics.json").read_text())
        err = 100 * m["final"]["top1_error"]
        row = {"top1_error_pct": round(err, 2), "paper_pct": ref, "wall_s": m["wall_s"],
               "mean_images_per_s": m["mean_images_per_s"], "epochs": m["epochs"], "device": m["device"],
               "num_train": m["num_train"], "metrics": str(base / loss / "seed0" / "metrics.json")}
        summary["cbloss"][loss] = row
        print(f"    {loss:10s} {err:12.2f} {ref:8.2f} {m['wall_s']:8.1f} {m['mean_images_per_s']:9.0f} "
              f"{m['epochs']:6d} {m['device']}")
sec = lambda v: v if v == "skipped" else f"{v} s"
print(f"wall: (a) {sec(a_s)}, (b) {sec(b_s)}, (c) {sec(c_s)}, total {total} s" + ("  -- over the 8-minute budget" if float(total) > 480 else ""))
(Path(out_dir) / "gpu_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"wrote {Path(out_dir) / 'gpu_summary.json'} and {Path(out_dir) / 'gpu.log'}")
EOF
