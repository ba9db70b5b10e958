#!/usr/bin/env bash
# The AdvMask experiment sweep: PROTOCOL × DATASETS × SHOTS × SEEDS, one advmask.py run per cell, then the
# aggregated tables. Every cell's run is called: a run folder keeps its mask and finished cells and evaluates only
# the cells its results.json lacks, so a stopped sweep continues where it stopped and new flags add their cells.
set -euo pipefail
# advmask.py beside this script, called by its path: relative paths given (--runs, -- --data-root) are the caller's
ADVMASK="$(cd "$(dirname "$0")" && pwd)/advmask.py"

usage() {
  cat <<'EOF'
usage: run_all.sh [--datasets "a b"] [--shots "1 2"] [--seeds "1 2 3"] [--protocol "P Q"] [--gpus "0 1"]
                  [--runs DIR] [--python PATH] [--dry-run] [-- ARGS FOR advmask.py]

Runs advmask.py once per (dataset, shots, seed) into RUNS/PROTOCOL/DATASET/<K>shot/seed<S>/ (seed<S>-weights/ for
-- --tune weights, so both arms share a root; its log appended to log.txt there). A run that is done reuses its mask
and evaluates only what the flags ask for and its results.json lacks (a stopped sweep continues, -- --attack pgd,cw
adds the CW cells). Then writes RUNS/summary.md and RUNS/summary.csv (mean ± std over seeds; missing cells shown as
missing).

Every option can also be set by the environment variable of the same name (flags win):
  DATASETS  default: the 11 datasets of the paper
  SHOTS     default: "1 2 4 8 16"
  SEEDS     default: "1 2 3"
  PROTOCOL  few_shot (default), base2new, transfer, or several, e.g. "few_shot base2new"
  GPUS      e.g. "0 1 2 3": one job per GPU in parallel (CUDA_VISIBLE_DEVICES); empty: one job at a time
  RUNS      default: runs (runs_dry with --dry-run)
  PYTHON    the interpreter that runs advmask.py, e.g. venv/bin/python (default: python on PATH)
--dry-run   a tiny CPU sweep with advmask.py --dry-run (synthetic data): by default oxford_pets dtd × 1 2 shots ×
            seeds 1 2 into runs_dry; --datasets, --shots, --seeds and --runs given with it still apply
Arguments after -- go to every advmask.py run, e.g. -- --data-root /data --baseline --attack pgd,aa; advmask.py's
parser checks every cell's flags before any cell runs, so a typo stops the sweep at once, in one line
CoOp's exact splits for the whole sweep: -- --data-root /data --split-dir /data/coop_splits
EOF
}

DATASETS=${DATASETS:-}
SHOTS=${SHOTS:-}
SEEDS=${SEEDS:-}
PROTOCOL=${PROTOCOL:-few_shot}
GPUS=${GPUS:-}
RUNS=${RUNS:-}
PYTHON=${PYTHON:-python}
DRY=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in --datasets|--shots|--seeds|--protocol|--gpus|--runs|--python)
    [ $# -ge 2 ] || { echo "run_all.sh: $1 needs a value; see run_all.sh --help" >&2; exit 2; } ;;
  esac
  case "$1" in
    --datasets) DATASETS=$2; shift 2 ;;
    --shots) SHOTS=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --protocol) PROTOCOL=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --python) PYTHON=$2; shift 2 ;;
    --dry-run) GPUS=""; DRY=1; EXTRA+=(--dry-run --device cpu); shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) echo "run_all.sh: unknown option $1; see run_all.sh --help" >&2; exit 2 ;;
  esac
done

# after --, a flag the sweep sets per cell would give every cell one value (one seed filed under three seed folders);
# the --tune weights arm trains into a folder of its own beside the mask's, as advmask.py's default folder does
# ${EXTRA[@]+...}: bash before 4.4 (macOS's 3.2, CentOS 7's 4.2) takes an empty array for an unset one under set -u
ARM=""
for i in ${EXTRA[@]+"${!EXTRA[@]}"}; do
  case "${EXTRA[$i]}" in
    --protocol|--protocol=*|--dataset|--dataset=*|--shots|--shots=*|--seed|--seed=*|--out-dir|--out-dir=*)
      echo "run_all.sh: ${EXTRA[$i]%%=*} after -- would give every cell the same value; use run_all.sh's own" \
           "option; see run_all.sh --help" >&2
      exit 2 ;;
  esac
  next=${EXTRA[$((i + 1))]:-}
  if [ "${EXTRA[$i]}" = --tune=weights ] || { [ "${EXTRA[$i]}" = --tune ] && [ "$next" = weights ]; }; then
    ARM=-weights
  fi
done

# what was not given: the paper's sweep, or with --dry-run a tiny one
if [ "$DRY" = 1 ]; then
  DATASETS=${DATASETS:-"oxford_pets dtd"}; SHOTS=${SHOTS:-"1 2"}; SEEDS=${SEEDS:-"1 2"}; RUNS=${RUNS:-runs_dry}
else
  DATASETS=${DATASETS:-"imagenet caltech101 oxford_pets stanford_cars flowers102 food101 fgvc_aircraft sun397 dtd eurosat ucf101"}
  SHOTS=${SHOTS:-"1 2 4 8 16"}; SEEDS=${SEEDS:-"1 2 3"}; RUNS=${RUNS:-runs}
fi
# under --gpus a cell runs on its GPU or not at all: --device cuda, after the flags given so that it wins, fails in one
# line a cell whose process sees no GPU, where the default device would train on the CPU, unsaid
if [ -n "$GPUS" ]; then EXTRA+=(--device cuda); fi
# a value given twice would run its cells twice, at once under --gpus (where the folder's lock refuses the second)
for option in datasets:DATASETS shots:SHOTS seeds:SEEDS protocol:PROTOCOL; do
  name=${option#*:}
  twice=$(printf '%s\n' ${!name} | sort | uniq -d | head -n 1)
  if [ -n "$twice" ]; then
    echo "run_all.sh: --${option%%:*} lists $twice twice; give each value once; see run_all.sh --help" >&2
    exit 2
  fi
done

cells=()
for protocol in $PROTOCOL; do for dataset in $DATASETS; do for shots in $SHOTS; do for seed in $SEEDS; do
  cells+=("$protocol $dataset $shots $seed")
done; done; done; done
# every cell's flags through advmask.py's own parser before any cell runs: a typo (--datasets oxford_pest, -- --attack
# fgsm) is one line and exit 2 here, not a sweep of failed cells whose folders a summary would show as rows of dashes
# and every --gpus id among the GPUs this job may use: each cell's CUDA_VISIBLE_DEVICES replaces the job's, so an id
# outside a Slurm job's list would run cells on another job's GPU where devices are not fenced off, unsaid
"$PYTHON" - "$(dirname "$ADVMASK")" "$GPUS" "${#EXTRA[@]}" ${EXTRA[@]+"${EXTRA[@]}"} ${cells[@]+"${cells[@]}"} \
    <<'EOF' || exit 2
import contextlib, io, os, sys
sys.path.insert(0, sys.argv[1])
try:
    import advmask
except ImportError as e:  # an interpreter without requirements.txt's packages
    sys.exit(f"run_all.sh: {sys.executable} has no {e.name}, which advmask.py needs; pass --python the interpreter "
             f"that requirements.txt was installed into; see run_all.sh --help")
visible, count = os.environ.get("CUDA_VISIBLE_DEVICES"), advmask.torch.cuda.device_count()
for gpu in sys.argv[2].split():  # ids as CUDA_VISIBLE_DEVICES takes them: the job's list, else 0 .. count - 1
    if gpu not in (visible.replace(" ", "").split(",") if visible is not None else [str(i) for i in range(count)]):
        job = f"CUDA_VISIBLE_DEVICES={visible}" if visible is not None else f"{count} GPUs visible"
        sys.exit(f"run_all.sh: --gpus lists {gpu}, which is not a GPU of this job ({job}); pass ids of its GPUs; "
                 f"see run_all.sh --help")
n = int(sys.argv[3])
extra, cells = sys.argv[4:4 + n], sys.argv[4 + n:]
for cell in cells:
    protocol, dataset, shots, seed = cell.split()
    err = io.StringIO()  # its warnings go to each cell's log.txt; here only an error is said
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            advmask.parse_args([*extra, "--protocol", protocol, "--dataset", dataset, "--shots", shots, "--seed", seed])
    except SystemExit as e:
        if e.code:  # parse_args's one line: advmask: error: ...
            error = err.getvalue().strip().splitlines()[-1].removeprefix("advmask: error: ")
            sys.exit(f"run_all.sh: the cell {protocol} {dataset} {shots}-shot seed {seed}: {error}; see "
                     f"run_all.sh --help")
EOF
# this sweep's failed cells, one a line, shared by its parallel GPU jobs: a file of its own, so that sweeps sharing
# RUNS (a Slurm array, one cell a task) never report each other's failures
mkdir -p "$RUNS" 2> /dev/null && failed=$(mktemp "$RUNS/.failed_cells.XXXXXX" 2> /dev/null) || {
  echo "run_all.sh: cannot write to $RUNS; pass --runs a folder you can write to; see run_all.sh --help" >&2; exit 2; }
trap 'rm -f "$failed"' EXIT

run_cell() {  # protocol dataset shots seed [gpu]
  local out="$RUNS/$1/$2/${3}shot/seed$4$ARM"
  mkdir -p "$out"
  echo "run  $out"
  # TQDM_DISABLE: no carriage-return progress bars in log.txt, which each rerun of the cell appends to. The cell's
  # own flags come last: argparse takes the last, so no abbreviation after -- (--see 7) can override them
  if TQDM_DISABLE=1 CUDA_VISIBLE_DEVICES=${5:-${CUDA_VISIBLE_DEVICES:-}} "$PYTHON" "$ADVMASK" \
      ${EXTRA[@]+"${EXTRA[@]}"} --protocol "$1" --dataset "$2" --shots "$3" --seed "$4" --out-dir "$out" \
      >> "$out/log.txt" 2>&1; then
    tail -n 1 "$out/log.txt"
  else
    echo "FAILED $out (see $out/log.txt)"
    echo "$out" >> "$failed"
  fi
}

if [ -z "$GPUS" ]; then
  for cell in "${cells[@]}"; do run_cell $cell; done
else  # GPU g takes every n-th cell, so that the GPUs share the sweep without a job queue
  gpus=($GPUS)
  for g in "${!gpus[@]}"; do
    (for i in "${!cells[@]}"; do
       if [ $((i % ${#gpus[@]})) -eq "$g" ]; then run_cell ${cells[$i]} "${gpus[$g]}"; fi
     done) &
  done
  wait
fi

# what finished, even after failures; a summary that summarize refuses (its one line says why) leaves none behind,
# so that no stale table is taken for this sweep's
rm -f "$RUNS/summary.md" "$RUNS/summary.csv" "$RUNS/summary.png"
status=0
if "$PYTHON" "$ADVMASK" summarize "$RUNS" > /dev/null; then
  echo "wrote $RUNS/summary.md and $RUNS/summary.csv"
else
  status=1
fi
if [ -s "$failed" ]; then
  echo "$(wc -l < "$failed") cell(s) failed:" >&2
  cat "$failed" >&2
  status=1
fi
exit $status
