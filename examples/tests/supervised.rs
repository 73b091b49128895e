//! The `supervised` example (burn-train's runner) on the tiny fixture BERT: every method
//! trains through it, and a run stopped after epoch 1 and resumed from burn-train's checkpoint
//! ends where the run that did not stop ends.

mod common;

use std::path::Path;

use burn_peft_examples::finetune::{Args, MethodArg, Report, SelectionArg};
use burn_peft_examples::supervised::{SupervisedArgs, run_with};

use common::{model, tokenize};

fn args(
    method: MethodArg,
    run_dir: &Path,
    resume: Option<usize>,
    stop_after: Option<usize>,
) -> SupervisedArgs {
    SupervisedArgs {
        run: Args {
            model: Some(model()),
            method,
            epochs: 2,
            batch: 16,
            lr: Some(3e-3),
            rank: 4,
            alpha: 8.0,
            budget: None,
            seed: 3,
            out: None,
            dropout: Some(0.0),
            quiet: true,
            density: 0.05,
            rosa_warmup: 2,
            selection: SelectionArg::Rigl,
        },
        run_dir: Some(run_dir.into()),
        resume,
        stop_after,
    }
}

fn run(method: MethodArg, dir: &Path, resume: Option<usize>, stop_after: Option<usize>) -> Report {
    run_with(&args(method, dir, resume, stop_after), &model(), &tokenize).unwrap()
}

#[test]
fn every_method_trains_with_burn_train_and_resumes_where_it_stopped() {
    for method in [
        MethodArg::Lora,
        MethodArg::Adalora,
        MethodArg::Rosa,
        MethodArg::Sft,
        MethodArg::Id3,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let straight = run(method, &dir.path().join("straight"), None, None);
        assert!(
            straight.loss.1 < straight.loss.0,
            "{method:?}: the training loss fell, {:?}",
            straight.loss
        );
        assert!(straight.trainable.0 > 0 && straight.trainable.0 < straight.trainable.1);

        let stopped = dir.path().join("stopped");
        run(method, &stopped, None, Some(1));
        assert!(
            stopped.join("checkpoint/model-1.bpk").exists(),
            "{method:?}"
        );
        let resumed = run(method, &stopped, Some(1), None);
        assert_eq!(
            (
                resumed.loss.1.to_bits(),
                resumed.after.to_bits(),
                resumed.trainable
            ),
            (
                straight.loss.1.to_bits(),
                straight.after.to_bits(),
                straight.trainable
            ),
            "{method:?}: the resumed run ends where the straight one does"
        );
    }
}

#[test]
fn resuming_without_a_checkpoint_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = run_with(
        &args(MethodArg::Lora, dir.path(), Some(1), None),
        &model(),
        &tokenize,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("no checkpoint of epoch 1"),
        "{err}"
    );
}
