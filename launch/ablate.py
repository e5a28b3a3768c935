"""Ablations in one command: sweeps over any train flag, and the transfer study.

    # which blocks to unfreeze, three seeds each (train flags after --)
    python -m launch.ablate --root=runs/unfreeze --sweep=unfreeze:none,top:1,top:2,all --sweep=seed:0,1,2 -- \\
        --dataset=folder:../shared/data/hymenoptera --backbone=mobilenet --alpha=0.25 --weights=... \\
        --head_epochs=5 --finetune_epochs=5 --finetune_lr=1e-4

    # choose among four recipes by 5-fold cross-validation; report the pick's fold ensemble and refit on test
    python -m launch.ablate --root=runs/cv --folds=5 --sweep=image_size:224,320 --sweep=finetune_epochs:8,16 \\
        --sweep=seed:0,1,2 -- --dataset=folder:../shared/data/hymenoptera --test=val --backbone=mobilenet ...

    # the Keras guide's model.fit recipe vs the defaults and another recipe, on the same data and seeds
    python -m launch.ablate --study=recipes --root=runs/recipes --recipe='adapt:--bn=adapt' -- \\
        --dataset=folder:../shared/data/hymenoptera --test=val --backbone=mobilenet --alpha=0.25 \\
        --weights=... --head_epochs=4 --lr=1e-3 --finetune_epochs=4 --finetune_lr=1e-4

    # Yosinski et al. (2014) at small scale, on the embedded digits (~10 min on 2 CPU cores)
    python -m launch.ablate --study=transfer

    # what the head reads: the top, the probes' peak, lower blocks, several blocks
    python -m launch.ablate --study=features --root=runs/features --specs=top,auto,conv_dw_9,conv_dw_11+conv_dw_13 \\
        -- --dataset=... --head_epochs=8 --finetune_epochs=8

    # which parameters at which budget: top:K and all against norm, bias and LoRA
    python -m launch.ablate --study=peft --root=runs/peft -- --dataset=... --head_epochs=8 --finetune_epochs=8

Writes results.csv (every trial), summary.csv, results.md and results.png (per row
of seeds: the test metric's mean, 95 % t-interval, n, and the paired difference
against the --baseline row), and transfer.md, transfer.png for the study, in
--root; `tensorboard --logdir ROOT` shows every trial, with the HParams
dashboard. Re-running skips finished trials and resumes unfinished ones; trials
that ran with other settings are refused (or run again with --rerun).
"""

from __future__ import annotations

import sys

from absl import app, flags

from launch import common

F = flags.FLAGS
flags.DEFINE_string("root", None, "Sweep directory (default: /tmp/ablate_<study>).")
flags.DEFINE_multi_string("sweep", [], "KEY:V1,V2,... over any launch.train flag (repeat for a grid; "
                          "use ';' between values that contain commas).")
flags.DEFINE_enum("study", "sweep", ["sweep", "transfer", "recipes", "probe", "peft", "features", "dip"],
                  "sweep: the --sweep grid; "
                  "transfer: Yosinski et al.; recipes: the Keras guide's model.fit recipe vs the defaults and any "
                  "--recipe; probe: linear probes per block and --auto specs against the sweep over --specs; "
                  "peft: block unfreezing against norm, bias and LoRA specs (--specs) at their parameter budgets; "
                  "features: the head on other blocks (--specs: --features values), head-only and head-then-all; "
                  "dip: the first fine-tuning epoch step by step on validation, the defaults on each --specs "
                  "(default all,top:2) and each --recipe on the first.")
flags.DEFINE_integer("parallel", 1, "Trials run at the same time (subprocesses).")
flags.DEFINE_string("seeds", "0,1,2", "Transfer, recipes, probe, peft, features and dip studies: seeds.")
flags.DEFINE_string("specs", "", "Probe and peft studies: the unfreeze specs swept (';' between specs that contain "
                    "commas; default: none,top:1,top:2,top:4,all for probe, "
                    "none,norm,bias,lora:4,lora:16,top:1,top:2,top:4,all for peft). Features study: the "
                    "--features values (default: top,auto). Dip study: the specs the defaults run (default: all,top:2; each "
                    "--recipe runs on the first).")
flags.DEFINE_string("auto", "auto:rgn:2,auto:probe:2", "Probe study: the auto specs judged against the sweep.")
flags.DEFINE_multi_string("recipe", [], "Recipes and dip studies: NAME:FLAGS, a recipe run beside the guide's and the "
                          "defaults, e.g. 'adapt:--bn=adapt --schedule=constant' (repeat for more).")
flags.DEFINE_string("classes_a", "0-4", "Transfer study: the classes of half A.")
flags.DEFINE_string("classes_b", "5-9", "Transfer study: the classes of half B.")
flags.DEFINE_integer("epochs", 10, "Transfer study: epochs of every run (bases and transfers).")
flags.DEFINE_string("baseline", None, "KEY:VALUE, the sweep row the others are compared with, seed by seed "
                    "(default: the first value of the first --sweep).")
flags.DEFINE_integer("folds", 0, "Sweep: choose by K-fold cross-validation. Every row runs on each of K folds of the "
                     "training pool (x seeds) and on the single split (--split_seeds); the table reports the CV score "
                     "with its corrected interval, the chosen row's final models are built (--final) and scored once "
                     "on test, and a section says whether CV ranked the rows as test does.")
flags.DEFINE_enum("select", "cv", ["cv", "split"], "With --folds: what chooses the row (cv: the CV score; split: the "
                  "single split's validation, for comparison).")
flags.DEFINE_list("final", ["ensemble", "refit"], "With --folds: the chosen row's final models: ensemble (the fold "
                  "models' mean probabilities, exported) and/or refit (the whole pool, the folds' median best epochs).")
flags.DEFINE_list("split_seeds", None, "With --folds: seeds of the single-split trials (default: the swept seeds; "
                  "'' for none).")
flags.DEFINE_list("final_seeds", None, "With --folds: seeds of the final models (default: the swept seeds).")
flags.DEFINE_bool("rerun", False, "Run again, from scratch, trials that ran before with other settings "
                  "(default: refuse, naming the difference).")



def _split(text: str) -> list[str]:
    """`a,b` or, when the specs hold commas, `a;b`."""
    return [s.strip() for s in (text.split(";") if ";" in text else text.split(",")) if s.strip()]


def _seeds() -> list[str]:
    return [s.strip() for s in F.seeds.split(",") if s.strip()]


def main(argv):
    from launch.train import config_from_args
    from research.studies import ablation

    # Trials are compared, not shipped: skip the export unless asked (--export after --).
    train_flags = ["--noexport", *argv[1:]]
    if any(a.startswith("--workdir") for a in train_flags):
        common.die("do not pass --workdir: each trial gets ROOT/trials/NAME", common.EXIT_USER_ERROR)
    root = F.root or f"/tmp/ablate_{F.study}"
    if F.folds and F.study != "sweep":
        common.die(f"--folds cross-validates a --sweep; --study={F.study} does not take it", common.EXIT_USER_ERROR)
    cv_only = [n for n in ("select", "final", "split_seeds", "final_seeds") if F[n].present]
    if cv_only and not F.folds:
        common.die(f"--{cv_only[0]} belongs to a cross-validated sweep: add --folds=K", common.EXIT_USER_ERROR)
    if F.study not in ("sweep", "peft", "features", "dip"):  # the studies build backbones in this process
        common.start_tensorflow_quietly()
    if F.study == "transfer":
        from research.studies import transfer
        rows, _ = transfer.run_transfer_study(
            root, train_flags, config_from_args, seeds=_seeds(),
            classes_a=F.classes_a, classes_b=F.classes_b, epochs=F.epochs, parallel=F.parallel, rerun=F.rerun)
        report = "transfer.md"
    elif F.study == "probe":
        from research.studies import probe
        rows, _ = probe.run_probe_study(root, train_flags, config_from_args, seeds=_seeds(),
                                           specs=_split(F.specs or "none,top:1,top:2,top:4,all"),
                                           autos=_split(F.auto), parallel=F.parallel, rerun=F.rerun)
        report = "probe_study.md"
    elif F.study == "peft":
        from research.studies import peft
        rows = peft.run_peft_study(root, train_flags, config_from_args, seeds=_seeds(),
                                   specs=_split(F.specs) or peft.SPECS, parallel=F.parallel, rerun=F.rerun,
                                   ready=common.start_tensorflow_quietly)
        report = "peft.md"
    elif F.study == "features":
        from research.studies import features
        rows = features.run_features_study(root, train_flags, config_from_args, seeds=_split(F.seeds),
                                           features=_split(F.specs) or features.FEATURES, parallel=F.parallel,
                                           rerun=F.rerun, ready=common.start_tensorflow_quietly)
        report = "features.md"
    elif F.study == "dip":
        from research.studies import dip
        rows = dip.run_dip_study(root, train_flags, config_from_args, seeds=_seeds(), recipes=F.recipe,
                                 specs=_split(F.specs) or dip.SPECS, parallel=F.parallel, rerun=F.rerun,
                                 ready=common.start_tensorflow_quietly)
        report = "dip.md"
    elif F.study == "recipes":
        rows = ablation.run_recipe_study(root, train_flags, config_from_args, seeds=_seeds(),
                                         recipes=F.recipe, parallel=F.parallel, rerun=F.rerun)
        report = "results.md"
    elif F.folds:
        from research.studies import cv
        rows = cv.run_cv_sweep(root, F.sweep, train_flags, config_from_args, folds=F.folds, select=F.select,
                               finals=F.final, split_seeds=F.split_seeds, final_seeds=F.final_seeds,
                               baseline=F.baseline, parallel=F.parallel, rerun=F.rerun,
                               ready=common.start_tensorflow_quietly)
        report = "results.md"
    else:
        if not F.sweep:
            common.die("give at least one --sweep=KEY:V1,V2 (or --study=transfer)", common.EXIT_USER_ERROR)
        # Every trial is checked before TensorFlow starts: a bad sweep value costs no start-up.
        rows = ablation.run_sweep(root, F.sweep, train_flags, config_from_args, parallel=F.parallel,
                                  rerun=F.rerun, baseline=F.baseline, ready=common.start_tensorflow_quietly)
        report = "results.md"
    with open(f"{root}/{report}") as f:
        print(f.read())
    failed = [r for r in rows if r["status"] != "done"]
    print(f"{len(rows) - len(failed)} trials done, {len(failed)} failed; tables and plots in {root}")
    print(f"inspect: tensorboard --logdir {root}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    app.run(common.guarded(main), flags_parser=common.parse_own_flags_then_passthrough)
