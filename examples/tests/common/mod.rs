//! What the example tests share: the tiny fixture BERT and a tokenizer for it.

use std::path::{Path, PathBuf};

/// The tiny random BERT of peft-models' fixtures (CI has no pretrained model).
pub fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/peft-models/fixtures/bert/model")
}

/// Word-hashing tokenizer into the fixture's vocabulary of 100 (ids 1..100, 0 is padding).
pub fn tokenize(text: &str) -> anyhow::Result<Vec<i64>> {
    Ok(text
        .split_whitespace()
        .map(|w| {
            let h = w
                .bytes()
                .fold(17u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
            1 + (h % 99) as i64
        })
        .collect())
}
