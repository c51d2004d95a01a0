#!/usr/bin/env bash
# launch/semiseg_semi.sh with ground glass and consolidation apart (3 classes,
# softmax CE-Dice on the labelled slices; the unlabelled slices' soft labels, of
# any opacity, train P(opacity) = 1 - P(background)). Same arguments and options.
# The maps do not tell the classes apart: at the short cross-validation budget the
# fine-tuned model lost consolidation on the fold measured (docs/results_semiseg.md).
#   bash launch/semiseg_semi_3class.sh LABELLED UNLABELLED WORKDIR [options]
exec bash "$(dirname "$0")/semiseg_semi.sh" "$@" --classes=3
