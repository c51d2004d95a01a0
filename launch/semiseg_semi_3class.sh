#!/usr/bin/env bash
# launch/semiseg_semi.sh with ground glass and consolidation apart. Same arguments and
# options. The soft labels are of any opacity, so the pre-training (and any teacher) is
# the 1-class one; the fine-tuning on the labelled slices trains 3 classes (softmax
# CE-Dice) from it, its 1-class head expanded to 3 (config.init_head=expand:
# P(opacity) = 1 - P(background) starts as the pre-trained sigmoid, the split even).
# With --method=mix the student trains 3 classes on both at once (the soft labels
# train P(opacity) = 1 - P(background)). Five-fold cross-validation at a short budget
# (docs/results_semiseg.md): any opacity 0.649, GGO 0.527, consolidation 0.319, 0.014
# behind labelled-only 3-class training of the same steps (p 0.46); pre-training 3
# classes on the maps instead lost consolidation (0.02 on one fold).
#   bash launch/semiseg_semi_3class.sh LABELLED UNLABELLED WORKDIR [options]
exec bash "$(dirname "$0")/semiseg_semi.sh" "$@" --classes=3
