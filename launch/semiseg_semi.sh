#!/usr/bin/env bash
# Semi-supervised SCOAT-Net from labelled and unlabelled 8-bit CT slices, in one command:
#
#   bash launch/semiseg_semi.sh LABELLED UNLABELLED WORKDIR [options] [--config.FIELD=VALUE ...]
#
# LABELLED holds Imgs/<k>.jpg and GT/<k>.png (COVID-SemiSeg's labelled layout);
# UNLABELLED holds Imgs/<scan>_<k>.jpg and, optionally, InfNet-pseudo/<scan>_<k>.png
# (Semi-Inf-Net's confidence maps). The last line printed is the final model's
# folder, which `python -m scoat_jax.predict --checkpoint=` takes.
#
# Stages (each is a documented command; a finished stage is skipped when the
# script runs again, and training resumes from its latest checkpoint):
#   1. build the datasets into WORKDIR/data (covid_semiseg, unlabelled_slices);
#   2. soft labels of the unlabelled slices: InfNet-pseudo/ when UNLABELLED has it
#      (and --self_training is not given), else a teacher trained on the labelled
#      slices (launch/semiseg_all.cfg's recipe) labels them (python -m scoat_jax.pseudo_label
#      --match_intensity: every scan's grey levels matched to the labelled slices);
#   3. the student: with --method=pretrain (the default, Semi-Inf-Net's protocol)
#      it trains on the soft labels alone (launch/semiseg_pretrain.cfg), then
#      fine-tunes from that on the labelled slices (launch/semiseg_all.cfg with
#      --config.init_from); with --method=mix it trains on both at once, half of
#      every batch unlabelled (launch/semiseg_semi.cfg). With --rounds=N > 1 each
#      student labels the slices for the next one (self-training rounds). A student
#      of our own labels sees the matched slices its teacher labelled.
#
# Options:
#   --self_training  ignore InfNet-pseudo/ and use own teachers
#   --method=M       pretrain (default) or mix: how the student uses the soft labels
#   --rounds=N       students trained in sequence (default 1)
#   --fold=K         cross-validation: teacher and students train on fold K's
#                    training slices only and are scored on its validation slices
#   --gpu            the recipe sized for one GPU (512 px, the paper's 50 epochs)
#   --classes=3      ground glass and consolidation apart (launch/semiseg_semi_3class.sh):
#                    the student fine-tunes 3 classes from the 1-class pre-training
#   --dry_run        print the commands without running them
# Further --config.* flags go to every training command.
#
# Timing (benchmarks/README.md), 2-core CPU with InfNet-pseudo/: 69 minutes with the default
# --method=pretrain on a 2-core AMD EPYC (an estimated 35 on a 2-core Xeon, twice as fast);
# --method=mix about 80 on the EPYC; --self_training adds a teacher and its labels (1 hour).
set -euo pipefail

usage() { echo "usage: bash $0 LABELLED UNLABELLED WORKDIR [--self_training] [--method=pretrain|mix] [--rounds=N] [--fold=K] [--gpu] [--classes=3] [--dry_run] [--config.FIELD=VALUE ...]" >&2; exit 2; }
[[ $# -ge 3 ]] || usage
LABELLED=$1 UNLABELLED=$2 WORKDIR=$3
shift 3
SELF=0 METHOD=pretrain ROUNDS=1 FOLD=all GPU=0 CLASSES=1 DRY=0 EXTRA=()
for arg in "$@"; do
  case $arg in
    --self_training) SELF=1 ;;
    --method=*) METHOD=${arg#*=} ;;
    --rounds=*) ROUNDS=${arg#*=} ;;
    --fold=*) FOLD=${arg#*=} ;;
    --gpu) GPU=1 ;;
    --classes=*) CLASSES=${arg#*=} ;;
    --dry_run) DRY=1 ;;
    --config.*) EXTRA+=("$arg") ;;
    *) echo "error: unknown option $arg; see the options at the top of $0" >&2; exit 2 ;;
  esac
done
[[ $METHOD == pretrain || $METHOD == mix ]] || { echo "error: --method=$METHOD must be pretrain or mix" >&2; exit 2; }
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "error: --rounds=$ROUNDS must be a positive integer" >&2; exit 2; }
[[ $FOLD == all || $FOLD =~ ^[0-9]+$ ]] || { echo "error: --fold=$FOLD must be all or a fold number" >&2; exit 2; }
[[ $CLASSES == 1 || $CLASSES == 3 ]] || { echo "error: --classes=$CLASSES must be 1 or 3" >&2; exit 2; }
for d in "$LABELLED/Imgs" "$LABELLED/GT" "$UNLABELLED/Imgs"; do
  [[ -d $d ]] || { echo "error: $d is not a folder; LABELLED needs Imgs/ and GT/, UNLABELLED needs Imgs/" >&2; exit 2; }
done

HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}
DATA=$WORKDIR/data
SUFFIX=$([[ $GPU == 1 ]] && echo _gpu || true)
TEACHER_CFG=$HERE/semiseg_all$SUFFIX.cfg
STUDENT_CFG=$HERE/semiseg_semi$SUFFIX.cfg
PRETRAIN_CFG=$HERE/semiseg_pretrain$SUFFIX.cfg
COMMON=(--config.data.data_dir="$DATA" --config.data.fold="$FOLD")
# The student's classes. With --classes=3 teachers and pre-training stay 1-class (the
# soft labels are of any opacity); the fine-tuning starts from the pre-trained 1-class
# head expanded to 3 classes (config.init_head=expand).
CLASS_FLAGS=() INIT_HEAD=()
if [[ $CLASSES == 3 ]]; then
  CLASS_FLAGS=(--config.num_classes=3 --config.loss=ce_dice --config.loss_kwargs.alpha=1.0)
  INIT_HEAD=(--config.init_head=expand)
fi
[[ $FOLD == all ]] || COMMON+=(--config.eval_every_epochs=50)

stage() { echo "[semiseg_semi $(date +%H:%M:%S)] $*" >&2; }
run() {
  echo "+ $*" >&2
  if [[ $DRY == 0 ]]; then "$@" >&2; fi
}
train() {  # flagfile workdir [flags...]
  local cfg=$1 workdir=$2
  shift 2
  run "$PY" -m scoat_jax.main --flagfile="$cfg" "${COMMON[@]}" "$@" "${EXTRA[@]}" --workdir="$workdir"
}
label() {  # teacher output
  if [[ -d $2 ]]; then stage "soft labels $2 exist; kept"; return; fi
  run "$PY" -m scoat_jax.pseudo_label --teacher="$1" --data=unlabelled_slices --data_dir="$DATA" \
    --match_intensity --output="$2"
}
# Our own teachers label, and their students train on, every unlabelled scan with its grey
# levels matched to the labelled slices: COVID-SemiSeg's unlabelled scans mix two export
# windows, and unmatched a teacher calls about 39% of their pixels opacity (soft tissue
# under the wide window) instead of 8-12% (docs/results_semiseg.md). Semi-Inf-Net's maps
# were made on the slices as they are and are used unmatched.
MATCH=()

if [[ $DRY == 0 ]]; then mkdir -p "$WORKDIR"; fi
stage "1/3 datasets in $DATA"
run "$PY" -m scoat_jax.datasets.build covid_semiseg --manual_dir="$LABELLED" --data_dir="$DATA"
run "$PY" -m scoat_jax.datasets.build unlabelled_slices --manual_dir="$UNLABELLED" --data_dir="$DATA"

if [[ $SELF == 0 && -d $UNLABELLED/InfNet-pseudo ]]; then
  SOFT=$UNLABELLED/InfNet-pseudo
  stage "2/3 soft labels: $SOFT (Semi-Inf-Net's maps)"
else
  stage "2/3 teacher on the labelled slices, then its soft labels"
  train "$TEACHER_CFG" "$WORKDIR/teacher"
  SOFT=$WORKDIR/soft_round1
  label "$WORKDIR/teacher" "$SOFT"
  MATCH=(--config.unlabelled.match_intensity=True)
fi

for ((r = 1; r <= ROUNDS; r++)); do
  STUDENT=$WORKDIR/student_round$r
  if [[ $METHOD == mix ]]; then
    stage "3/3 student $r/$ROUNDS on the labelled slices and $SOFT"
    train "$STUDENT_CFG" "$STUDENT" "${CLASS_FLAGS[@]}" --config.unlabelled.soft_labels="$SOFT" "${MATCH[@]}"
  else
    stage "3/3 student $r/$ROUNDS: pre-training on $SOFT alone"
    train "$PRETRAIN_CFG" "$WORKDIR/pretrain_round$r" --config.unlabelled.soft_labels="$SOFT" "${MATCH[@]}"
    stage "3/3 student $r/$ROUNDS: fine-tuning on the labelled slices"
    train "$TEACHER_CFG" "$STUDENT" "${CLASS_FLAGS[@]}" "${INIT_HEAD[@]}" \
      --config.init_from="$WORKDIR/pretrain_round$r"
  fi
  if (( r < ROUNDS )); then
    SOFT=$WORKDIR/soft_round$((r + 1))
    label "$STUDENT" "$SOFT"
    MATCH=(--config.unlabelled.match_intensity=True)
  fi
done
stage "done: the final model is $STUDENT"
echo "$STUDENT"
